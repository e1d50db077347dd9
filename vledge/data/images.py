"""Training-side image decoding and preprocessing (PIL + torchvision), following a PreprocessSpec.

The runtime reimplements the same spec with OpenCV; both must agree within 1/255.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from vledge.config import PreprocessSpec
from vledge.errors import ImageError

MAX_PIXELS = 64_000_000

_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
_PIL_RESAMPLE = {"bilinear_pil": Image.Resampling.BILINEAR, "bicubic_pil": Image.Resampling.BICUBIC}


def _to_rgb(image: Image.Image) -> Image.Image:
    """EXIF-upright RGB; alpha is composited on white, 16-bit is scaled to 8-bit."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.rint(array * 255.0 / peak), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode a file path or encoded bytes; every failure is an ImageError naming the source."""
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    except OSError as exc:
        raise ImageError(f"cannot open image {name}: {exc.strerror or exc}") from None
    try:
        with handle, Image.open(handle) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"image {name} has {image.width}x{image.height} pixels, over the limit of {MAX_PIXELS}")
            image.load()
            return _to_rgb(image)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode image {name}: {exc}") from None


def resize_and_crop(image: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 [3, S, S] after the spec's resize and crop (before normalisation)."""
    size = spec.image_size
    new_h, new_w, top, left = spec.geometry(image.height, image.width)
    if spec.interpolation in _PIL_RESAMPLE:
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), _PIL_RESAMPLE[spec.interpolation])
        return TF.pil_to_tensor(image.crop((left, top, left + size, top + size)))
    tensor = TF.pil_to_tensor(image)
    if (new_h, new_w) != tuple(tensor.shape[-2:]):
        tensor = TF.resize(tensor, [new_h, new_w], interpolation=_INTERPOLATION[spec.interpolation], antialias=True)
    return TF.crop(tensor, top, left, size, size)


def normalize(pixels_uint8: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> float32 normalised pixel values."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    return (pixels_uint8.float() / 255.0 - mean) / std


def preprocess(source: str | Path | bytes, spec: PreprocessSpec) -> torch.Tensor:
    """One image file or bytes -> float32 [3, S, S] exactly as training feeds the model."""
    return normalize(resize_and_crop(load_rgb(source), spec), spec)
