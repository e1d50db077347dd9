"""Resampling: resize (and centre-crop) uint8 RGB images exactly as training's torchvision (or Pillow) does.

torch's uint8 antialiased kernels (the path torchvision takes on CPUs with AVX2/AVX512 or ARM) are
replayed: per-axis filter weights quantised to int16, an integer horizontal pass, rounding to
uint8, then an integer vertical pass; on such machines the result is bit-identical to training.
Where torchvision takes its float path instead (other x86 CPUs for bilinear, GPUs) the two differ
by about 0.15 grey levels on average. OpenCV's own resizers are not used: ``INTER_LINEAR`` does not
antialias and ``INTER_AREA`` is a box filter. A filter is a kernel function and its support
(``_FILTERS``); only the output pixels that survive the crop are computed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from vledge.config import PreprocessSpec
from vledge.errors import ImageError
from vledge.runtime.pil_resampling import PIL_FILTERS, pil_weights


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    a = -0.5  # Keys / Pillow; torch's antialiased bicubic uses the same
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


_FILTERS = {"bilinear": (_triangle, 2), "bicubic": (_keys_cubic, 4)}


# torchvision would materialise the whole resized image; refuse sizes no real photo needs.
_MAX_RESIZED_SIDE = 1 << 20
_WEIGHT_CHUNK = 1 << 16  # outputs whose float weights are computed at a time


def _float_weights(in_size: int, out_size: int, interpolation: str, lo: int, hi: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Normalised filter weights of outputs ``lo..hi`` (ATen ``_compute_indices_min_size_weights_aa``).

    The same double arithmetic in the same order as the C++ code, so the values are identical.
    """
    fn, interp_size = _FILTERS[interpolation]
    scale = in_size / out_size
    support = (interp_size * 0.5) * scale if scale >= 1.0 else interp_size * 0.5
    taps = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(lo, hi, dtype=np.float64) + 0.5)
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C++ casts truncate toward zero
    xsize = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin, 0, taps)
    j = np.arange(taps, dtype=np.int64)
    weights = fn(((j[None, :] + xmin[:, None]) - center[:, None] + 0.5) * invscale)
    weights[j[None, :] >= xsize[:, None]] = 0.0
    total = np.cumsum(weights, axis=1)[:, -1:]  # a sequential sum, like the C++ loop
    return xmin, np.divide(weights, total, out=weights, where=total != 0.0)


def _int16_weights(in_size: int, out_size: int, interpolation: str, lo: int, hi: int
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """(starts, int16 weights as int32, precision) of outputs ``lo..hi``, as ATen's
    ``_compute_index_ranges_int16_weights`` quantises them: the precision depends on the largest
    weight of the whole axis, so that is found chunk by chunk without holding the axis in memory.
    """
    wt_max = 0.0
    for begin in range(0, out_size, _WEIGHT_CHUNK):
        _, chunk = _float_weights(in_size, out_size, interpolation, begin, min(begin + _WEIGHT_CHUNK, out_size))
        wt_max = max(wt_max, float(chunk.max(initial=0.0)))
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    starts, weights = _float_weights(in_size, out_size, interpolation, lo, hi)
    scaled = weights * (1 << precision)
    quantised = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    return starts, quantised, precision


# Largest gathered block (elements) one pass converts to float at a time: bounds memory for huge photos.
_CHUNK = 1 << 22


@dataclass(frozen=True)
class _Pass:
    """One resampling pass producing a run of outputs: the input rows it reads and its weights.

    The int16 weights are applied with BLAS in float32, which is exact while every partial sum
    stays below 2**24; larger sums split each weight into 256 * high + low parts (both exact),
    and only absurd downscales (over ~64x for bicubic) fall back to float64.
    """

    first: int  # first input row read
    stop: int  # one past the last input row read
    rows: np.ndarray  # int64 [outputs, taps]: input row of each tap, relative to ``first``
    weights: np.ndarray  # float [outputs, parts, taps]
    scales: tuple[int, ...]  # what each part is multiplied by
    precision: int


@functools.lru_cache(maxsize=256)
def _plan(in_size: int, out_size: int, interpolation: str, offset: int, count: int) -> _Pass:
    """Outputs ``offset .. offset+count`` of resizing an axis from ``in_size`` to ``out_size``.

    A pure function of its arguments, so this cache is the only shared state (lru_cache is thread-safe).
    """
    quantise = pil_weights if interpolation in PIL_FILTERS else _int16_weights
    starts, weights, precision = quantise(in_size, out_size, interpolation, offset, offset + count)
    used = np.nonzero(weights.any(axis=0))[0]
    taps = int(used.max()) + 1 if used.size else 1
    weights = weights[:, :taps]
    first = int(starts.min())
    stop = min(int(starts.max()) + taps, in_size)
    rows = np.minimum(starts[:, None] + np.arange(taps), in_size - 1) - first
    if 255 * int(np.abs(weights).sum(axis=1).max()) < (1 << 24):
        parts, scales = weights[:, None, :].astype(np.float32), (1,)
    elif 255 * 255 * taps < (1 << 24):
        high = weights >> 8  # floor, also for negative weights
        parts, scales = np.stack([high, weights - (high << 8)], axis=1).astype(np.float32), (256, 1)
    else:
        parts, scales = weights[:, None, :].astype(np.float64), (1,)
    rows.setflags(write=False)
    parts.setflags(write=False)
    return _Pass(first=first, stop=stop, rows=rows, weights=parts, scales=scales, precision=precision)


def _apply_pass(plan: _Pass, pixels: np.ndarray) -> np.ndarray:
    """Resample uint8 [rows first..stop, M, C] along axis 0 -> uint8 [outputs, M, C], as torch rounds."""
    flat = pixels.reshape(pixels.shape[0], -1)
    count, taps = plan.rows.shape
    out = np.empty((count, flat.shape[1]), dtype=np.uint8)
    step = max(1, _CHUNK // (taps * flat.shape[1]))
    for begin in range(0, count, step):
        end = min(begin + step, count)
        gathered = flat[plan.rows[begin:end]].astype(plan.weights.dtype)  # [n, taps, M]
        sums = np.einsum("npk,nkm->npm", plan.weights[begin:end], gathered)  # integer-valued [n, parts, M]
        acc = sums[:, 0].astype(np.int64) * plan.scales[0]
        for part in range(1, len(plan.scales)):
            acc += sums[:, part].astype(np.int64) * plan.scales[part]
        acc += 1 << (plan.precision - 1)
        acc >>= plan.precision
        np.clip(acc, 0, 255, out=acc)
        out[begin:end] = acc
    return out.reshape((count,) + pixels.shape[1:])


def output_geometry(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """(resized height, resized width, crop top, crop left), as the spec defines them."""
    return spec.geometry(height, width)


def resize_and_crop(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Upright RGB uint8 [H, W, 3] -> uint8 [S, S, 3] after the spec's resize and centre crop.

    Only the output pixels that survive the crop are computed, from the input rows they need.
    """
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
            and rgb.size):
        got = (f"<array shape={tuple(rgb.shape)} dtype={rgb.dtype}>" if isinstance(rgb, np.ndarray)
               else type(rgb).__name__)
        raise ImageError(f"resize_and_crop() needs an RGB uint8 HxWx3 array, got {got}")
    size = spec.image_size
    in_h, in_w = rgb.shape[:2]
    new_h, new_w, top, left = output_geometry(in_h, in_w, spec)
    if max(new_h, new_w) > _MAX_RESIZED_SIDE:
        raise ImageError(f"cannot preprocess a {in_w}x{in_h} image: its aspect ratio is too extreme "
                         f"(resizing to {new_w}x{new_h})")
    rows = _plan(in_h, new_h, spec.interpolation, top, size) if new_h != in_h else None
    cols = _plan(in_w, new_w, spec.interpolation, left, size) if new_w != in_w else None
    y0, y1 = (rows.first, rows.stop) if rows else (top, top + size)
    x0, x1 = (cols.first, cols.stop) if cols else (left, left + size)
    region = rgb[y0:y1, x0:x1]
    if cols is not None:  # torch resamples horizontally first (on the transpose: rows gather fast)
        region = cv2.transpose(_apply_pass(cols, cv2.transpose(np.ascontiguousarray(region))))
    if rows is not None:
        region = _apply_pass(rows, region)
    return np.ascontiguousarray(region)


def clear_weight_cache() -> None:
    """Forget the cached per-(size, interpolation) weights (they are a pure function of their key)."""
    _plan.cache_clear()
