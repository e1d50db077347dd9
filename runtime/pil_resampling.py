"""Pillow's ``Image.resize`` filter weights (Resample.c), for specs whose interpolation ends in ``_pil``.

Hugging Face image processors (``CLIPImageProcessor`` and its kin with the PIL backend, and every
processor of transformers 4.x) resize with Pillow. Pillow runs the same two-pass scheme as torch's
uint8 kernels (horizontal pass, round to uint8, vertical pass), with its own filters and
fixed-point weights: 22 fractional bits in int32 instead of torch's int16 with a varying
precision. This module reproduces those weights bit for bit; the passes themselves are shared
with the torch replay in :mod:`vledge.runtime.resampling`. Nothing here imports Pillow.
"""

from __future__ import annotations

import math

import numpy as np

PIL_PRECISION_BITS = 32 - 8 - 2  # Resample.c: PRECISION_BITS


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a  # Pillow's own operation order (torch's differs in the last bits)
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


PIL_FILTERS = {"bilinear_pil": (_bilinear, 1.0), "bicubic_pil": (_bicubic, 2.0)}


def pil_weights(in_size: int, out_size: int, interpolation: str, lo: int, hi: int
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """(first input index, int32 weights [hi-lo, taps], precision) of outputs ``lo..hi``.

    ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` of Resample.c, in the same double arithmetic.
    """
    fn, filter_support = PIL_FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filter_support * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(lo, hi, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate toward zero
    xsize = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin, 0, taps)
    j = np.arange(taps, dtype=np.int64)
    weights = fn(((j[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    weights[j[None, :] >= xsize[:, None]] = 0.0
    total = np.cumsum(weights, axis=1)[:, -1:]  # a sequential sum, like the C loop
    weights = np.divide(weights, total, out=weights, where=total != 0.0)
    scaled = weights * (1 << PIL_PRECISION_BITS)
    quantised = np.where(scaled < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return xmin, quantised, PIL_PRECISION_BITS
