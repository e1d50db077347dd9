"""Training-side images: the runtime's one implementation of each PreprocessSpec, handed to torch.

Training, evaluation, calibration, parity and the runtime all decode, resize and crop through
``vledge.runtime`` (OpenCV + numpy, following Pillow's decoding rules and replaying torch's
antialiased uint8 kernels), so the pixels a model is trained on are the pixels it sees when
deployed, on every machine. Only the normalisation runs in torch here, on whole batches, as
``(x / 255 - mean) / std`` in float32 (the runtime's lookup table holds the same values).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vledge.config import PreprocessSpec
from vledge.runtime import resampling
from vledge.runtime.image_decoding import MAX_PIXELS, decode_image

__all__ = ["MAX_PIXELS", "TiledPixels", "load_rgb", "load_tiles", "normalize", "normalize_tiles", "preprocess",
           "preprocess_tiles", "resize_and_crop"]


def load_rgb(source: str | Path | bytes) -> np.ndarray:
    """Decode a file path or encoded bytes to upright RGB uint8 [H, W, 3]; failures are ImageErrors naming it."""
    return decode_image(source)


def resize_and_crop(rgb: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 [3, S, S] after the spec's resize and crop (before normalisation)."""
    pixels = resampling.resize_and_crop(rgb, spec)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def normalize(pixels_uint8: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> float32 normalised pixel values."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    return (pixels_uint8.float() / 255.0 - mean) / std


def preprocess(source: str | Path | bytes, spec: PreprocessSpec) -> torch.Tensor:
    """One image file or bytes -> float32 [3, S, S] exactly as training feeds the model."""
    return normalize(resize_and_crop(load_rgb(source), spec), spec)


def preprocess_tiles(source, spec: PreprocessSpec):
    """A tiled model's image (path, bytes or RGB array) -> ``Idefics3Images`` (tiles [n, 3, S, S] float32, rows,
    cols), through the runtime's own code so training, the export's checks and the runtime see the same pixels."""
    from vledge.runtime.preprocess import ImagePreprocessor

    return ImagePreprocessor(spec).tiles(source if not isinstance(source, Path) else str(source), "RGB")


@dataclass(frozen=True)
class TiledPixels:
    """A tiled model's image before normalisation, as training caches it (uint8 is a quarter of float32).

    Without ``tiles`` only its grid is held and :meth:`load` decodes ``source`` again (a dataset whose tiles
    do not fit the cache).
    """

    rows: int  # 0 and 0 when the image was not split
    cols: int
    count: int  # tiles: rows * cols + 1 (the global view), or 1
    tiles: torch.Tensor | None = None  # uint8 [count, 3, S, S]: the row-major tiles, then the global view
    source: str | None = None
    spec: PreprocessSpec | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return self.rows, self.cols

    def load(self) -> torch.Tensor:
        """The uint8 tiles [count, 3, S, S], held or decoded again."""
        return self.tiles if self.tiles is not None else load_tiles(self.source, self.spec).tiles

    def unloaded(self, source: str, spec: PreprocessSpec) -> TiledPixels:
        """The same image holding only its grid: ``load`` decodes ``source`` when asked."""
        return TiledPixels(self.rows, self.cols, self.count, None, source, spec)


def _tile_options(spec: PreprocessSpec):
    from vledge.runtime.idefics3_images import Idefics3ImageOptions

    return Idefics3ImageOptions.from_spec(spec)


def load_tiles(source: str | Path | bytes, spec: PreprocessSpec) -> TiledPixels:
    """One image -> its uint8 tiles and grid, the runtime's resizing and splitting (``preprocess_tiles`` before
    its rescale and normalisation)."""
    from vledge.runtime.idefics3_images import split_image

    tiles, rows, cols = split_image(np.ascontiguousarray(load_rgb(source)), _tile_options(spec))
    return TiledPixels(rows, cols, len(tiles), torch.from_numpy(np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))))


def normalize_tiles(tiles_uint8: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 tiles [n, 3, S, S] -> float32, in the processor's arithmetic (the runtime's own function), so the
    values equal ``preprocess_tiles``' to the bit."""
    from vledge.runtime.idefics3_images import normalise

    hwc = tiles_uint8.cpu().numpy().transpose(0, 2, 3, 1)
    return torch.from_numpy(normalise(hwc, _tile_options(spec)))
