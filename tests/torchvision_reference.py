"""The reference a PreprocessSpec is defined by: Pillow decoding and torchvision's antialiased resize.

vledge trains, evaluates and deploys with one implementation of each spec, the torch-free
runtime's (``vledge.runtime.preprocess``); this test-only module is the library behaviour that
implementation is held to (bit-identical where torch takes its uint8 kernels, within 1/255
elsewhere).
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

MAX_PIXELS = 64_000_000  # as in vledge.runtime.image_decoding

_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


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
    tensor = TF.pil_to_tensor(image)
    size = spec.image_size
    interpolation = _INTERPOLATION[spec.interpolation]
    if spec.resize == "squash":
        return TF.resize(tensor, [size, size], interpolation=interpolation, antialias=True)
    if min(tensor.shape[-2:]) != size:
        tensor = TF.resize(tensor, size, interpolation=interpolation, antialias=True)
    return TF.center_crop(tensor, [size, size])


def normalize(pixels_uint8: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> float32 normalised pixel values."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    return (pixels_uint8.float() / 255.0 - mean) / std


def preprocess(source: str | Path | bytes, spec: PreprocessSpec) -> torch.Tensor:
    """One image file or bytes -> float32 [3, S, S] exactly as training feeds the model."""
    return normalize(resize_and_crop(load_rgb(source), spec), spec)
