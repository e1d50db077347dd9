"""Pillow's ``Image.resize`` of a whole RGB uint8 image (Resample.c), bit for bit, without Pillow.

Hugging Face's PIL-backend image processors resize with Pillow; Idefics3 / SmolVLM use its Lanczos
filter (support 3). Pillow computes double-precision filter weights per output pixel
(``precompute_coeffs``), quantises them to int32 with 22 fractional bits (``normalize_coeffs_8bpc``),
then runs two passes, each rounding and clipping to uint8; an axis whose size does not change is not
resampled at all. The order of the passes depends on the Pillow release (:data:`PASS_ORDERS`):
Pillow 12 and older always resample horizontally first; Pillow 13 resamples vertically first when
the height shrinks by more than twice as many pixels as the width does. The order changes some
pixels by a few grey levels, so it is an explicit choice here. This module repeats each step in the same order and
the same arithmetic: the weights use ``math.sin`` (the C library's ``sin``, as Pillow does) and the
sums are int32, as Pillow's (its 22 fractional bits leave room for 8-bit pixels and negative lobes).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from vledge.errors import ImageError
from vledge.runtime.pil_resampling import pil_weights

PRECISION_BITS = 32 - 8 - 2  # Resample.c: PRECISION_BITS

# Pillow's ``Image.Resampling`` values this module reproduces, with their names.
LANCZOS, BILINEAR, BICUBIC = 1, 2, 3
RESAMPLE_NAMES = {LANCZOS: "lanczos", BILINEAR: "bilinear", BICUBIC: "bicubic"}

# How each Pillow release orders the two passes.
PASS_ORDERS = ("pillow13", "pillow12")

_MAX_SIDE = 1 << 15  # far above any size an image processor asks for; bounds memory
_CHUNK = 1 << 21  # output values summed at a time (bounds the int32 accumulator's memory)


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    if -3.0 <= x < 3.0:  # truncated sinc; the bounds are asymmetric in Pillow too
        return _sinc(x) * _sinc(x / 3)
    return 0.0


_FILTERS = {LANCZOS: (_lanczos, 3.0)}
# Bilinear and bicubic weights are vledge.runtime.pil_resampling's (the same Resample.c arithmetic, vectorised).
_SHARED_FILTERS = {BILINEAR: "bilinear_pil", BICUBIC: "bicubic_pil"}


@functools.lru_cache(maxsize=64)
def _coefficients(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray]:
    """(first input index [out], int32 weights [out, taps]) of one axis, as Resample.c makes them.

    A pure function of its arguments, so this cache is the only shared state (lru_cache is thread-safe).
    """
    if resample in _SHARED_FILTERS:
        starts, quantised, _ = pil_weights(in_size, out_size, _SHARED_FILTERS[resample], 0, out_size)
        return _frozen(starts, quantised.astype(np.float64))
    fn, filter_support = _FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filter_support * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    ss = 1.0 / filterscale
    starts = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, taps), dtype=np.float64)
    one = 1 << PRECISION_BITS
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C casts truncate toward zero
        xmax = min(int(center + support + 0.5), in_size) - xmin
        row = [fn((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        total = 0.0
        for w in row:  # sequential sum, like the C loop
            total += w
        for x, w in enumerate(row):
            k = w / total if total != 0.0 else w
            weights[xx, x] = int(-0.5 + k * one) if k < 0 else int(0.5 + k * one)  # int() truncates, like C
        starts[xx] = xmin
    return _frozen(starts, weights)


def _frozen(starts: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, int32 weights) with the taps no output uses cut off, read-only (they are cached)."""
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    used = np.nonzero(weights.any(axis=0))[0]
    width = int(used.max()) + 1 if used.size else 1
    weights = np.ascontiguousarray(weights[:, :width].astype(np.int32))
    starts.setflags(write=False)
    weights.setflags(write=False)
    return starts, weights


def _pass(pixels: np.ndarray, starts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Resample uint8 [N, M, C] along axis 0 -> uint8 [out, M, C]: Pillow's int32 sums, one tap at a time,
    then its rounding and clipping (``clip8``)."""
    in_size = pixels.shape[0]
    flat = pixels.reshape(in_size, -1)
    count, taps = weights.shape
    rows = np.minimum(starts[:, None] + np.arange(taps), in_size - 1)  # zero-weight taps may point past the end
    out = np.empty((count, flat.shape[1]), dtype=np.uint8)
    step = max(1, _CHUNK // flat.shape[1])
    for begin in range(0, count, step):
        end = min(begin + step, count)
        acc = np.full((end - begin, flat.shape[1]), 1 << (PRECISION_BITS - 1), dtype=np.int32)
        for tap in range(taps):
            acc += weights[begin:end, tap, None] * flat[rows[begin:end, tap]]
        acc >>= PRECISION_BITS  # arithmetic shift: floor, as in C
        np.clip(acc, 0, 255, out=acc)
        out[begin:end] = acc
    return out.reshape((count,) + pixels.shape[1:])


def vertical_first(in_h: int, in_w: int, height: int, width: int, pass_order: str) -> bool:
    """Whether that Pillow release runs the vertical pass before the horizontal one for this resize."""
    return pass_order == "pillow13" and height < in_h and in_h - height > 2 * (in_w - width)


def pil_resize(rgb: np.ndarray, height: int, width: int, resample: int = LANCZOS,
               pass_order: str = "pillow13") -> np.ndarray:
    """RGB uint8 [H, W, 3] -> uint8 [height, width, 3], equal to ``Image.resize((width, height), resample)``
    of the Pillow release ``pass_order`` names."""
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
            and rgb.size):
        got = (f"<array shape={tuple(rgb.shape)} dtype={rgb.dtype}>" if isinstance(rgb, np.ndarray)
               else type(rgb).__name__)
        raise ImageError(f"pil_resize() needs an RGB uint8 HxWx3 array, got {got}")
    if resample not in RESAMPLE_NAMES:
        raise ImageError(f"pil_resize() reproduces resample {sorted(RESAMPLE_NAMES)} ({RESAMPLE_NAMES}), "
                         f"got {resample!r}")
    if pass_order not in PASS_ORDERS:
        raise ImageError(f"pil_resize() pass_order must be one of {PASS_ORDERS}, got {pass_order!r}")
    if not (0 < height <= _MAX_SIDE and 0 < width <= _MAX_SIDE):
        raise ImageError(f"cannot resize to {width}x{height}: each side must be 1..{_MAX_SIDE}")
    in_h, in_w = rgb.shape[:2]
    out = rgb
    steps = ["v", "h"] if vertical_first(in_h, in_w, height, width, pass_order) else ["h", "v"]
    for step in steps:
        if step == "h" and width != in_w:  # on the transpose: rows gather fast
            starts, weights = _coefficients(in_w, width, resample)
            out = _pass(np.ascontiguousarray(out.transpose(1, 0, 2)), starts, weights).transpose(1, 0, 2)
        elif step == "v" and height != in_h:
            starts, weights = _coefficients(in_h, height, resample)
            out = _pass(np.ascontiguousarray(out), starts, weights)
    return np.ascontiguousarray(out) if out is not rgb else rgb.copy()
