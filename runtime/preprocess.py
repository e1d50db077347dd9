"""The runtime preprocessor: images -> the model's ``pixel_values``, following a PreprocessSpec exactly.

Training (``vledge.data.images``) decodes with Pillow and resizes with torchvision; the model only
sees what that pipeline produced, so the runtime reproduces it step by step, torch-free: decoding
(``image_decoding``, with the headers read by ``image_headers``), resizing and cropping
(``resampling``), then normalisation with a float32 lookup table computed the way torch computes
``(x/255-mean)/std``. Nothing here imports torch, torchvision or Pillow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vledge.config import PreprocessSpec, from_dict
from vledge.errors import ConfigError, ImageError
from vledge.runtime.idefics3_images import Idefics3ImageOptions, Idefics3Images
from vledge.runtime.idefics3_images import preprocess as tile_image
from vledge.runtime.image_decoding import CHANNEL_ORDERS, MAX_PIXELS, ImageSource, decode_image, pixel_limit
from vledge.runtime.resampling import resize_and_crop

__all__ = ["MAX_PIXELS", "ImagePreprocessor", "ImageSource", "decode_image"]


class ImagePreprocessor:
    """Decoded or encoded images -> the model's ``pixel_values``, following a PreprocessSpec exactly.

    Immutable after construction (safe to share between threads); the only shared state is the
    pure per-(size, interpolation) weight cache.
    """

    def __init__(self, spec: PreprocessSpec | Mapping[str, Any], max_pixels: int = MAX_PIXELS,
                 reduced_jpeg: bool = False) -> None:
        if isinstance(spec, Mapping):
            spec = from_dict(PreprocessSpec, spec)
        if not isinstance(spec, PreprocessSpec):
            raise ConfigError(f"ImagePreprocessor needs a PreprocessSpec, got {type(spec).__name__}")
        if spec.channel_order not in CHANNEL_ORDERS:
            raise ConfigError(f"unknown model channel_order {spec.channel_order!r} in the preprocessing spec")
        if len(spec.mean) != 3 or len(spec.std) != 3 or not all(s > 0 for s in spec.std):
            raise ConfigError(f"preprocessing spec needs three means and three positive stds, got "
                              f"mean={spec.mean} std={spec.std}")
        self.spec = spec
        self.reduced_jpeg = bool(reduced_jpeg)  # decode large JPEGs at 1/2 or 1/4 scale (see decode_image)
        self.max_pixels = pixel_limit(max_pixels)
        self.image_size = spec.image_size
        # (x / 255 - mean) / std for every uint8 value, in float32 as torch computes it.
        values = np.arange(256, dtype=np.float32) / np.float32(255.0)
        mean = np.asarray(spec.mean, dtype=np.float32)[:, None]
        std = np.asarray(spec.std, dtype=np.float32)[:, None]
        self._lut = ((values[None, :] - mean) / std).astype(np.float32)
        self._lut.setflags(write=False)
        self._tile_options = Idefics3ImageOptions.from_spec(spec) if spec.tiles is not None else None

    @property
    def tiled(self) -> bool:
        """The model sees each image as several tiles (Idefics3 / SmolVLM): use :meth:`tiles`."""
        return self._tile_options is not None

    def tiles(self, image: ImageSource, channel_order: str = "BGR") -> Idefics3Images:
        """One image -> its tiles float32 [n, 3, S, S] and its (rows, cols) grid, for a tiled model's spec."""
        if self._tile_options is None:
            raise ConfigError("this model reads one square image per picture, not tiles: use preprocess()")
        rgb = decode_image(image, channel_order=channel_order, max_pixels=self.max_pixels)  # RGB
        return tile_image(np.ascontiguousarray(rgb), self._tile_options)

    def _square_only(self) -> None:
        if self._tile_options is not None:
            raise ConfigError("this model splits each image into tiles (Idefics3 / SmolVLM): use tiles()")

    def __repr__(self) -> str:
        return f"ImagePreprocessor({self.spec!r}, max_pixels={self.max_pixels})"

    def __call__(self, image: ImageSource, channel_order: str = "BGR") -> np.ndarray:
        return self.preprocess(image, channel_order)

    def preprocess(self, image: ImageSource, channel_order: str = "BGR") -> np.ndarray:
        """One image (path, bytes or array) -> float32 [3, S, S], as training's ``preprocess`` returns."""
        self._square_only()
        rgb = decode_image(image, channel_order=channel_order, max_pixels=self.max_pixels,
                           reduce_for=self.image_size if self.reduced_jpeg else None)
        return self.normalize(self.resize_and_crop(rgb))

    def batch(self, images: Sequence[ImageSource] | np.ndarray, channel_order: str = "BGR") -> np.ndarray:
        """Several images -> float32 [N, 3, S, S]; a bad one raises ImageError naming its index."""
        self._square_only()
        if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike)) or (
                isinstance(images, np.ndarray) and images.ndim != 4):
            raise ImageError("batch() takes a sequence of images (or an N x H x W x C array); "
                             "use preprocess() for a single image")
        items = list(images)
        if not items:
            raise ImageError("batch() got no images")
        size = self.image_size
        out = np.empty((len(items), 3, size, size), dtype=np.float32)
        for index, image in enumerate(items):
            try:
                out[index] = self.preprocess(image, channel_order)
            except ImageError as exc:
                raise ImageError(f"image {index} of {len(items)}: {exc}") from exc
        return out

    def resize_and_crop(self, rgb: np.ndarray) -> np.ndarray:
        """Upright RGB uint8 [H, W, 3] -> uint8 [S, S, 3] after the spec's resize and centre crop."""
        return resize_and_crop(rgb, self.spec)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [S, S, 3] RGB -> float32 [3, S, S] in the model's channel order, (x/255 - mean)/std."""
        channels = pixels.transpose(2, 0, 1)
        if self.spec.channel_order == "BGR":
            channels = channels[::-1]
        out = np.empty(channels.shape, dtype=np.float32)
        for channel in range(3):
            np.take(self._lut[channel], channels[channel], out=out[channel])
        return out
