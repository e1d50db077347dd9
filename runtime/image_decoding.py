"""Image decoding: a path, encoded bytes or an array -> upright RGB uint8, as training's Pillow loader sees it.

``cv2.imdecode(IMREAD_UNCHANGED)`` keeps alpha and 16-bit samples; the EXIF orientation is read
from the header (``image_headers``) because ``IMREAD_UNCHANGED`` does not apply it (the other
flags apply it for only some formats); then 16-bit is reduced, alpha is composited on white and
the image is turned upright exactly as Pillow's ``exif_transpose`` + ``_to_rgb`` do. The pixel
limit is checked against the size in the file header, before anything is decoded.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Union

import cv2
import numpy as np

from vledge.errors import ConfigError, ImageError
from vledge.reads import MAX_IMAGE_FILE_BYTES, read_capped
from vledge.runtime.image_headers import Probe, probe_header

logger = logging.getLogger(__name__)

# Same limit as training (vledge.data.images.MAX_PIXELS): larger images are refused, not decoded.
MAX_PIXELS = 64_000_000

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray]

CHANNEL_ORDERS = ("BGR", "RGB")


# Reduced-scale JPEG decoding (libjpeg's DCT scaling) keeps at least this many times the target side:
# measured on a 12-megapixel JPEG resized to 224 px (bilinear, antialiased), decoding at 1/4 (750 px,
# 3.3x) differed from the full decode by 0.38 grey levels on average, 1/2 by 0.27, 1/8 (1.7x) by 1.9.
JPEG_REDUCE_MARGIN = 3
_JPEG_REDUCED = ((4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def decode_image(source: ImageSource, channel_order: str = "BGR", max_pixels: int = MAX_PIXELS,
                 reduce_for: int | None = None) -> np.ndarray:
    """Any supported source -> upright RGB uint8 [H, W, 3], as training's ``load_rgb`` would see it.

    ``source`` is a path, encoded bytes, or an array; ``channel_order`` says how a 3- or
    4-channel array is laid out ("BGR" as OpenCV produces it, or "RGB"); it is ignored for
    files and bytes, whose layout the decoder knows. ``reduce_for`` (a side in pixels the image
    will be resized to) lets a large JPEG be decoded at 1/2 or 1/4 scale, never below
    ``JPEG_REDUCE_MARGIN`` times that side: much faster, not bit-identical (within one grey level
    on average after the resize). Every failure is an ImageError that names the source.
    """
    order = _channel_order(channel_order)
    limit = pixel_limit(max_pixels)
    if isinstance(source, np.ndarray):
        return _from_array(source, order, limit, array_name(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _from_bytes(data, f"<{len(data)} bytes>", limit, reduce_for)
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        return _from_bytes(_read_file(name), str(name), limit, reduce_for)
    raise ImageError(
        f"unsupported image source of type {type(source).__name__}; "
        "pass a path, encoded bytes or a uint8/uint16 numpy array")


def _channel_order(value: Any) -> str:
    order = value.upper() if isinstance(value, str) else value
    if order not in CHANNEL_ORDERS:
        raise ImageError(f"unknown channel_order {value!r}; use 'BGR' (OpenCV arrays) or 'RGB'")
    return order


def pixel_limit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"max_pixels must be a positive integer, got {value!r}")
    return int(value)


def array_name(array: np.ndarray) -> str:
    return f"<array shape={tuple(array.shape)} dtype={array.dtype}>"


def _read_file(path: str) -> bytes:
    """A regular file of at most MAX_IMAGE_FILE_BYTES (a FIFO, a device or a larger file is an ImageError)."""
    return read_capped(path, MAX_IMAGE_FILE_BYTES, ImageError, "image")


def _check_pixels(width: int, height: int, limit: int, name: str) -> None:
    if width * height > limit:
        raise ImageError(f"image {name} has {width}x{height} pixels, over the limit of {limit}")


def _from_array(array: np.ndarray, order: str, limit: int, name: str) -> np.ndarray:
    """A caller's decoded frame (OpenCV layout by default) -> fresh upright RGB uint8."""
    if array.size == 0:
        raise ImageError(f"image {name} is empty")
    if array.dtype.kind != "u" or array.dtype.itemsize not in (1, 2):
        raise ImageError(f"image {name} has dtype {array.dtype}; expected uint8 (or uint16) pixel values, "
                         "e.g. np.clip(x * 255, 0, 255).round().astype(np.uint8) for floats in [0, 1]")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
        raise ImageError(f"image {name} has shape {tuple(array.shape)}; expected HxW (grey), HxWx1, "
                         "HxWx3 (colour) or HxWx4 (colour + alpha)")
    _check_pixels(array.shape[1], array.shape[0], limit, name)
    array = array.astype(np.uint8 if array.dtype.itemsize == 1 else np.uint16, copy=False)
    rgb = _to_rgb8(array, order, Probe(fmt=None), name)
    return rgb.copy() if np.may_share_memory(rgb, array) else rgb


def _jpeg_flag(probe: Probe, reduce_for: int | None) -> int:
    """The imdecode flags for this file: full decode, or the smallest DCT scale that keeps the margin."""
    if reduce_for and probe.fmt == "jpeg" and probe.size is not None:
        shortest = min(probe.size)
        for factor, flag in _JPEG_REDUCED:
            if shortest >= factor * JPEG_REDUCE_MARGIN * reduce_for:
                return flag | cv2.IMREAD_IGNORE_ORIENTATION  # the header's orientation is applied below
    return cv2.IMREAD_UNCHANGED


def _from_bytes(data: bytes, name: str, limit: int, reduce_for: int | None = None) -> np.ndarray:
    if not data:
        raise ImageError(f"cannot decode image {name}: the file is empty")
    probe = probe_header(data, name)
    if probe.size is not None:
        _check_pixels(probe.size[0], probe.size[1], limit, name)
    elif probe.fmt is None:
        logger.debug("image %s: unrecognised header, decoding without a size check first", name)
    try:
        raw = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _jpeg_flag(probe, reduce_for))
    except cv2.error as exc:
        raise ImageError(f"cannot decode image {name}: {_cv2_message(exc)}") from None
    if raw is None:
        what = "corrupt or unsupported " + probe.fmt.upper() if probe.fmt else "not a recognised image format"
        raise ImageError(f"cannot decode image {name}: {what}")
    if raw.ndim >= 2 and probe.size is None:
        _check_pixels(raw.shape[1], raw.shape[0], limit, name)
    rgb = _to_rgb8(raw, "BGR", probe, name)
    if probe.orientation != 1:
        logger.debug("image %s: applying EXIF orientation %d", name, probe.orientation)
        rgb = np.ascontiguousarray(_ORIENT[probe.orientation](rgb))
    return rgb


def _cv2_message(exc: cv2.error) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else "OpenCV error"


def _to_rgb8(raw: np.ndarray, order: str, probe: Probe, name: str) -> np.ndarray:
    """Grey, colour or colour+alpha at 8 or 16 bits -> RGB uint8, the way Pillow's modes convert."""
    if raw.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"image {name} has {raw.dtype} samples; only 8- and 16-bit images are supported")
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[:, :, 0]
    if raw.ndim == 2:
        grey = _grey16_to_8(raw, probe) if raw.dtype == np.uint16 else _rescale_maxval(raw, probe)
        return cv2.cvtColor(np.ascontiguousarray(grey), cv2.COLOR_GRAY2RGB)
    if raw.ndim != 3 or raw.shape[2] not in (3, 4):
        raise ImageError(f"image {name} has {raw.shape[2] if raw.ndim == 3 else raw.ndim} channels; "
                         "expected 1, 3 or 4")
    premultiplied = probe.premultiplied and raw.dtype == np.uint8
    colour = _colour16_to_8(raw, probe) if raw.dtype == np.uint16 else _rescale_maxval(raw, probe)
    colour = np.ascontiguousarray(colour)
    if colour.shape[2] == 3:
        return cv2.cvtColor(colour, cv2.COLOR_BGR2RGB) if order == "BGR" else colour
    rgb = cv2.cvtColor(colour, cv2.COLOR_BGRA2RGB if order == "BGR" else cv2.COLOR_RGBA2RGB)
    if premultiplied:  # colour already multiplied by alpha: add the white behind it
        alpha = colour[:, :, 3:].astype(np.int16)
        return np.clip(rgb.astype(np.int16) + (255 - alpha), 0, 255).astype(np.uint8)
    if probe.alpha:
        return _composite_on_white(rgb, colour[:, :, 3])
    return rgb


def _grey16_to_8(grey: np.ndarray, probe: Probe) -> np.ndarray:
    # Training: np.rint(x * 255 / peak) with peak 65535 for Pillow's "I;16" (PNG, TIFF); Pillow opens
    # 16-bit PGM as "I", where training uses peak 255 unless a value exceeds 255.
    if probe.maxval not in (None, 65535):
        return _rescale_maxval(grey, probe)
    peak = 255.0 if probe.fmt == "pnm" and int(grey.max()) <= 255 else 65535.0
    return np.clip(np.rint(grey.astype(np.float64) * 255.0 / peak), 0, 255).astype(np.uint8)


def _colour16_to_8(colour: np.ndarray, probe: Probe) -> np.ndarray:
    # Pillow reads 16-bit colour PNG/TIFF as 8-bit by keeping the high byte (rawmode "RGB;16B"),
    # and 16-bit PPM by rounding value * 255 / maxval; arrays are treated like the PNG they would be saved as.
    if probe.fmt == "pnm":
        maxval = probe.maxval or 65535
        return np.clip(np.rint(colour.astype(np.float64) * 255.0 / maxval), 0, 255).astype(np.uint8)
    return (colour >> 8).astype(np.uint8)


def _rescale_maxval(pixels: np.ndarray, probe: Probe) -> np.ndarray:
    # PNM with a maxval other than 255/65535: OpenCV returns raw values, Pillow stretches them to full range.
    if probe.maxval in (None, 255, 65535):
        return pixels
    scaled = np.rint(pixels.astype(np.float64) * 255.0 / probe.maxval)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Pillow's ``alpha_composite(white, rgba)`` in its own integer arithmetic (AlphaComposite.c)."""
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)[:, :, None]
    # With an opaque white destination outa255 = 255 * 255, so coef1 = a * 128 exactly (PRECISION_BITS 7).
    coef1 = a * (255 * 255 * 128) // (255 * 255)
    coef2 = 255 * 128 - coef1
    tmp = rgb.astype(np.uint32) * coef1 + 255 * coef2 + (0x80 << 7)
    out = (((tmp >> 8) + tmp) >> 8) >> 7
    out = np.where(a == 0, 255, out)
    return out.astype(np.uint8)


# Pillow's exif_transpose, on an H x W x C array (orientation values of the EXIF standard).
_ORIENT = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # ROTATE_270 (90 degrees clockwise)
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # TRANSVERSE
    8: lambda a: a.transpose(1, 0, 2)[::-1],  # ROTATE_90 (90 degrees counter-clockwise)
}
