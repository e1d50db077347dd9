"""Torch-free image decoding and preprocessing (OpenCV + numpy) that reproduces the training pipeline.

Training (``vledge.data.images``) decodes with Pillow and resizes with torchvision; the model only
sees what that pipeline produced, so this module mirrors it step by step rather than using
OpenCV's own resizers (``INTER_LINEAR`` does not antialias and ``INTER_AREA`` is a box filter):

* decoding: ``cv2.imdecode(IMREAD_UNCHANGED)`` keeps alpha and 16-bit samples, and the EXIF
  orientation is read from the file by this module (``IMREAD_UNCHANGED`` does not apply it, the
  other flags apply it for only some formats), then 16-bit is reduced, alpha is composited on
  white and the image is turned upright exactly as Pillow's ``exif_transpose`` + ``_to_rgb`` do;
* the pixel limit is checked against the size in the file header, before anything is decoded;
* resizing replays torch's uint8 antialiased kernels (the path torchvision takes on CPUs with
  AVX2/AVX512 or ARM): per-axis filter weights quantised to int16, an integer horizontal pass,
  rounding to uint8, then an integer vertical pass; on such machines the result is bit-identical
  to training; where torchvision takes its float path instead (other x86 CPUs for bilinear, GPUs)
  the two differ by about 0.15 grey levels on average;
* normalisation uses a float32 lookup table computed the way torch computes ``(x/255-mean)/std``.

Nothing here imports torch, torchvision or Pillow.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import cv2
import numpy as np

from vledge.config import PreprocessSpec, from_dict
from vledge.errors import ConfigError, ImageError
from vledge.runtime.pil_resampling import PIL_FILTERS, pil_weights

logger = logging.getLogger(__name__)

# Same limit as training (vledge.data.images.MAX_PIXELS): larger images are refused, not decoded.
MAX_PIXELS = 64_000_000

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray]

_CHANNEL_ORDERS = ("BGR", "RGB")
_MAX_TEXT = 1 << 20  # largest decompressed PNG text chunk read for orientation (Pillow: MAX_TEXT_CHUNK)
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')


# =========================================================================== decoding


def decode_image(source: ImageSource, channel_order: str = "BGR", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Any supported source -> upright RGB uint8 [H, W, 3], as training's ``load_rgb`` would see it.

    ``source`` is a path, encoded bytes, or an array; ``channel_order`` says how a 3- or
    4-channel array is laid out ("BGR" as OpenCV produces it, or "RGB"); it is ignored for
    files and bytes, whose layout the decoder knows. Every failure is an ImageError that names
    the source.
    """
    order = _channel_order(channel_order)
    limit = _pixel_limit(max_pixels)
    if isinstance(source, np.ndarray):
        return _from_array(source, order, limit, _array_name(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _from_bytes(data, f"<{len(data)} bytes>", limit)
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        return _from_bytes(_read_file(name), str(name), limit)
    raise ImageError(
        f"unsupported image source of type {type(source).__name__}; "
        "pass a path, encoded bytes or a uint8/uint16 numpy array")


def _channel_order(value: Any) -> str:
    order = value.upper() if isinstance(value, str) else value
    if order not in _CHANNEL_ORDERS:
        raise ImageError(f"unknown channel_order {value!r}; use 'BGR' (OpenCV arrays) or 'RGB'")
    return order


def _pixel_limit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"max_pixels must be a positive integer, got {value!r}")
    return int(value)


def _array_name(array: np.ndarray) -> str:
    return f"<array shape={tuple(array.shape)} dtype={array.dtype}>"


def _read_file(path: str) -> bytes:
    if os.path.isdir(path):
        raise ImageError(f"cannot read image {path}: it is a directory")
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise ImageError(f"cannot read image {path}: no such file") from None
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc.strerror or exc}") from None


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
    rgb = _to_rgb8(array, order, _Probe(fmt=None), name)
    return rgb.copy() if np.may_share_memory(rgb, array) else rgb


def _from_bytes(data: bytes, name: str, limit: int) -> np.ndarray:
    if not data:
        raise ImageError(f"cannot decode image {name}: the file is empty")
    probe = _probe(data, name)
    if probe.size is not None:
        _check_pixels(probe.size[0], probe.size[1], limit, name)
    elif probe.fmt is None:
        logger.debug("image %s: unrecognised header, decoding without a size check first", name)
    try:
        raw = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
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


def _to_rgb8(raw: np.ndarray, order: str, probe: _Probe, name: str) -> np.ndarray:
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


def _grey16_to_8(grey: np.ndarray, probe: _Probe) -> np.ndarray:
    # Training: np.rint(x * 255 / peak) with peak 65535 for Pillow's "I;16" (PNG, TIFF); Pillow opens
    # 16-bit PGM as "I", where training uses peak 255 unless a value exceeds 255.
    if probe.maxval not in (None, 65535):
        return _rescale_maxval(grey, probe)
    peak = 255.0 if probe.fmt == "pnm" and int(grey.max()) <= 255 else 65535.0
    return np.clip(np.rint(grey.astype(np.float64) * 255.0 / peak), 0, 255).astype(np.uint8)


def _colour16_to_8(colour: np.ndarray, probe: _Probe) -> np.ndarray:
    # Pillow reads 16-bit colour PNG/TIFF as 8-bit by keeping the high byte (rawmode "RGB;16B"),
    # and 16-bit PPM by rounding value * 255 / maxval; arrays are treated like the PNG they would be saved as.
    if probe.fmt == "pnm":
        maxval = probe.maxval or 65535
        return np.clip(np.rint(colour.astype(np.float64) * 255.0 / maxval), 0, 255).astype(np.uint8)
    return (colour >> 8).astype(np.uint8)


def _rescale_maxval(pixels: np.ndarray, probe: _Probe) -> np.ndarray:
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


# =========================================================================== headers


@dataclass(frozen=True)
class _Probe:
    """What the header says, read without decoding: format, (width, height), orientation, alpha rule."""

    fmt: str | None
    size: tuple[int, int] | None = None
    orientation: int = 1
    alpha: bool = True  # False where Pillow would ignore the alpha OpenCV returns (RGB+tRNS PNG, BMP)
    maxval: int | None = None  # PNM only
    premultiplied: bool = False  # 8-bit TIFF with unassociated alpha: OpenCV (libtiff RGBA) premultiplies it


def _probe(data: bytes, name: str) -> _Probe:
    """Sniff the format and read its header; truncated JPEG/PNG/WebP files are refused here."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _probe_png(data, name)
    if head.startswith(b"\xff\xd8"):
        return _probe_jpeg(data, name)
    if head.startswith((b"GIF87a", b"GIF89a")):
        return _probe_gif(data, name)
    if head.startswith(b"BM"):
        return _probe_bmp(data, name)
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return _probe_webp(data, name)
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return _probe_tiff(data, name)
    if len(head) >= 2 and head[0:1] == b"P" and head[1:2] in b"1234567Ff":
        return _probe_pnm(data, name)
    if head.startswith(b"\x59\xa6\x6a\x95"):  # Sun raster
        return _sized("sunraster", data, name, ">II", 4)
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n"):
        return _probe_jp2(data, name)
    if head.startswith(b"\xff\x4f\xff\x51"):  # JPEG 2000 codestream: SIZ follows SOC
        return _probe_j2k(data, 4, name)
    if head[4:8] == b"ftyp":
        return _probe_isobmff(data, name)
    if head.startswith((b"#?RADIANCE", b"#?RGBE")):
        return _probe_hdr(data, name)
    return _Probe(fmt=None)


def _corrupt(name: str, fmt: str, why: str) -> ImageError:
    return ImageError(f"cannot decode image {name}: {why} ({fmt.upper()})")


def _sized(fmt: str, data: bytes, name: str, layout: str, offset: int, swap: bool = False) -> _Probe:
    try:
        first, second = struct.unpack_from(layout, data, offset)
    except struct.error:
        raise _corrupt(name, fmt, "the header is cut short") from None
    width, height = (second, first) if swap else (first, second)
    return _Probe(fmt=fmt, size=(abs(int(width)), abs(int(height))))


def _probe_png(data: bytes, name: str) -> _Probe:
    """Walk the chunks: IHDR size, colour type, eXIf / text orientation, and a final IEND."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise _corrupt(name, "png", "the header is cut short or has no IHDR chunk")
    width, height, _depth, colour_type = struct.unpack_from(">IIBB", data, 16)
    exif = raw_profile = xmp = None
    pos, end, complete = 8, len(data), False
    while pos + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = pos + 8
        if kind == b"IEND":
            complete = True
            break
        if body + length + 4 > end:
            break
        if kind == b"eXIf":
            exif = data[body:body + length]
        elif kind in (b"tEXt", b"zTXt", b"iTXt"):
            key, text = _png_text(kind, data[body:body + length])
            if key == b"Raw profile type exif" and text is not None:
                raw_profile = text
            elif key == b"XML:com.adobe.xmp" and text is not None:
                xmp = text
        pos = body + length + 4
    if not complete:
        raise _corrupt(name, "png", "the file is truncated (no IEND chunk)")
    if exif is None and raw_profile is not None:
        exif = _raw_profile_exif(raw_profile)
    orientation = _orientation(exif, xmp)
    # Pillow keeps colour types 0 and 2 as "L"/"RGB" even with a tRNS chunk; OpenCV adds alpha for it.
    return _Probe(fmt="png", size=(width, height), orientation=orientation, alpha=colour_type not in (0, 2))


def _png_text(kind: bytes, body: bytes) -> tuple[bytes, bytes | None]:
    key, _, rest = body.partition(b"\x00")
    try:
        if kind == b"tEXt":
            return key, rest
        if kind == b"zTXt":
            return key, _inflate(rest[1:]) if rest[:1] == b"\x00" else None
        compressed, method = rest[0], rest[1]
        _lang, _, rest = rest[2:].partition(b"\x00")
        _translated, _, text = rest.partition(b"\x00")
        if compressed:
            return key, _inflate(text) if method == 0 else None
        return key, text
    except (IndexError, zlib.error, ValueError):
        return key, None


def _inflate(payload: bytes) -> bytes | None:
    inflater = zlib.decompressobj()
    text = inflater.decompress(payload, _MAX_TEXT)
    return None if inflater.unconsumed_tail else text


def _raw_profile_exif(text: bytes) -> bytes | None:
    # ImageMagick's legacy "\nexif\n   <length>\n<hex lines>" text chunk, as Pillow reads it.
    try:
        return bytes.fromhex("".join(text.decode("latin-1").split("\n")[3:]))
    except ValueError:
        return None


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _probe_jpeg(data: bytes, name: str) -> _Probe:
    """Walk the segments up to the first scan: SOF size, APP1 Exif/XMP; then require an EOI marker."""
    pos, end = 2, len(data)
    size = exif = xmp = None
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= end:
            raise _corrupt(name, "jpeg", "the file is truncated before its image data")
        while pos + 1 < end and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        marker = data[pos + 1]
        pos += 2
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9:
            raise _corrupt(name, "jpeg", "the file ends before any image data")
        if pos + 2 > end:
            raise _corrupt(name, "jpeg", "the file is truncated in its header")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2 or pos + length > end:
            raise _corrupt(name, "jpeg", "the file is truncated in its header")
        segment = data[pos + 2:pos + length]
        if marker in _SOF_MARKERS and size is None and len(segment) >= 5:
            height, width = struct.unpack_from(">HH", segment, 1)
            size = (width, height)
        elif marker == 0xE1 and segment.startswith(b"Exif\x00\x00") and exif is None:
            exif = segment[6:]
        elif marker == 0xE1 and segment.startswith(b"http://ns.adobe.com/xap/1.0/\x00"):
            xmp = segment[29:]
        pos += length
        if marker == 0xDA:
            break
    # Entropy-coded data never contains FF D9 (FF is stuffed as FF 00), so the EOI marker after the
    # first scan is the end of the image; trailing bytes after it are allowed, as in Pillow.
    if data.find(b"\xff\xd9", pos) < 0:
        raise _corrupt(name, "jpeg", "the file is truncated (no end-of-image marker)")
    if size is None or size[0] == 0 or size[1] == 0:
        raise _corrupt(name, "jpeg", "no frame size before the image data")
    return _Probe(fmt="jpeg", size=size, orientation=_orientation(exif, xmp))


def _probe_gif(data: bytes, name: str) -> _Probe:
    """The logical screen, grown to the first frame's extent (OpenCV decodes only the first frame)."""
    if len(data) < 13:
        raise _corrupt(name, "gif", "the header is cut short")
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while pos < len(data):
        block = data[pos]
        if block == 0x21:  # extension: label, then sub-blocks up to a zero length
            pos += 2
            while pos < len(data) and data[pos]:
                pos += data[pos] + 1
            pos += 1
        elif block == 0x2C and pos + 9 <= len(data):
            left, top, frame_w, frame_h = struct.unpack_from("<HHHH", data, pos + 1)
            width, height = max(width, left + frame_w), max(height, top + frame_h)
            break
        else:
            break
    return _Probe(fmt="gif", size=(width, height))


def _probe_bmp(data: bytes, name: str) -> _Probe:
    if len(data) < 26:
        raise _corrupt(name, "bmp", "the header is cut short")
    (header,) = struct.unpack_from("<I", data, 14)
    if header == 12:
        return _sized("bmp", data, name, "<HH", 18)
    probe = _sized("bmp", data, name, "<ii", 18)
    # Pillow honours a 32-bit BMP's fourth byte only when a BITFIELDS header names an alpha mask.
    alpha = False
    if header >= 56 and len(data) >= 14 + 56:
        compression = struct.unpack_from("<I", data, 30)[0]
        alpha = compression in (3, 6) and struct.unpack_from("<I", data, 14 + 52)[0] != 0
    return _Probe(fmt="bmp", size=probe.size, alpha=alpha)


def _probe_webp(data: bytes, name: str) -> _Probe:
    (riff_size,) = struct.unpack_from("<I", data, 4)
    if len(data) < 8 + riff_size:
        raise _corrupt(name, "webp", "the file is truncated")
    size = exif = xmp = None
    pos = 12
    while pos + 8 <= len(data):
        kind, length = struct.unpack_from("<4sI", data, pos)
        body = data[pos + 8:pos + 8 + length]
        if kind == b"VP8X" and len(body) >= 10:
            size = (int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1)
        elif kind == b"VP8 " and size is None and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
            w, h = struct.unpack_from("<HH", body, 6)
            size = (w & 0x3FFF, h & 0x3FFF)
        elif kind == b"VP8L" and size is None and len(body) >= 5 and body[0] == 0x2F:
            (bits,) = struct.unpack_from("<I", body, 1)
            size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        elif kind == b"EXIF":
            exif = body
        elif kind == b"XMP ":
            xmp = body
        pos += 8 + length + (length & 1)
    if size is None:
        raise _corrupt(name, "webp", "no image size in the header")
    return _Probe(fmt="webp", size=size, orientation=_orientation(exif, xmp))


def _probe_tiff(data: bytes, name: str) -> _Probe:
    """First IFD's ImageWidth/ImageLength. OpenCV's TIFF decoder applies the orientation tag itself."""
    entries = _tiff_ifd0(data, tags=(256, 257, 338))
    if entries is None or 256 not in entries or 257 not in entries:
        raise _corrupt(name, "tiff", "no image size in the first directory")
    return _Probe(fmt="tiff", size=(entries[256], entries[257]), premultiplied=entries.get(338) == 2)


def _probe_pnm(data: bytes, name: str) -> _Probe:
    kind = data[1:2]
    if kind == b"7":  # PAM: "WIDTH w" / "HEIGHT h" / "MAXVAL m" lines up to ENDHDR
        header = data[:4096].split(b"ENDHDR", 1)[0]
        fields = dict(re.findall(rb"^(WIDTH|HEIGHT|MAXVAL)\s+(\d+)", header, re.M))
        if b"WIDTH" not in fields or b"HEIGHT" not in fields:
            raise _corrupt(name, "pnm", "no image size in the header")
        maxval = int(fields.get(b"MAXVAL", b"255"))
        return _Probe(fmt="pnm", size=(int(fields[b"WIDTH"]), int(fields[b"HEIGHT"])), maxval=maxval)
    text = re.sub(rb"#[^\n\r]*", b" ", data[2:1024])
    numbers = re.findall(rb"\d+", text)
    wanted = 2 if kind in (b"1", b"4", b"F", b"f") else 3
    if len(numbers) < wanted:
        raise _corrupt(name, "pnm", "no image size in the header")
    maxval = int(numbers[2]) if wanted == 3 else None
    return _Probe(fmt="pnm", size=(int(numbers[0]), int(numbers[1])), maxval=maxval)


def _probe_jp2(data: bytes, name: str) -> _Probe:
    at = data.find(b"ihdr", 0, 4096)
    if at < 0:
        raise _corrupt(name, "jpeg 2000", "no image header box")
    return _sized("jpeg 2000", data, name, ">II", at + 4, swap=True)


def _probe_j2k(data: bytes, at: int, name: str) -> _Probe:
    try:
        x_size, y_size, x_origin, y_origin = struct.unpack_from(">IIII", data, at + 4)
    except struct.error:
        raise _corrupt(name, "jpeg 2000", "the header is cut short") from None
    return _Probe(fmt="jpeg 2000", size=(max(x_size - x_origin, 0), max(y_size - y_origin, 0)))


def _probe_isobmff(data: bytes, name: str) -> _Probe:
    # AVIF/HEIF: the largest 'ispe' (image spatial extents) property; other ftyp files are left to OpenCV.
    sizes = [struct.unpack_from(">II", data, m.start() + 8) for m in re.finditer(b"ispe", data[:1 << 16])
             if m.start() + 16 <= len(data)]
    if not sizes:
        return _Probe(fmt=None)
    width, height = max(sizes, key=lambda s: s[0] * s[1])
    return _Probe(fmt="avif", size=(width, height))


def _probe_hdr(data: bytes, name: str) -> _Probe:
    match = re.search(rb"\n([-+])([YX]) (\d+) ([-+])([YX]) (\d+)\n", data[:8192])
    if not match:
        raise _corrupt(name, "hdr", "no image size in the header")
    first, second = int(match[3]), int(match[6])
    return _Probe(fmt="hdr", size=(second, first) if match[2] == b"Y" else (first, second))


# =========================================================================== EXIF orientation


def _orientation(exif: bytes | None, xmp: bytes | None) -> int:
    """Pillow's rule: the EXIF Orientation tag, else an XMP tiff:Orientation; only 2-8 transpose."""
    value = None
    if exif:
        entries = _tiff_ifd0(exif[6:] if exif.startswith(b"Exif\x00\x00") else exif, tags=(0x0112,))
        value = entries.get(0x0112) if entries else None
    if value is None and xmp:
        match = _XMP_ORIENTATION.search(xmp)
        value = int(match[2]) if match else None
    return value if value in _ORIENT else 1


def _tiff_ifd0(tiff: bytes, tags: tuple[int, ...] = (256, 257)) -> dict[int, int] | None:
    """Integer values of ``tags`` in a TIFF structure's first directory (classic or BigTIFF)."""
    if tiff[:2] == b"II":
        endian = "<"
    elif tiff[:2] == b"MM":
        endian = ">"
    else:
        return None
    try:
        (version,) = struct.unpack_from(endian + "H", tiff, 2)
        if version == 42:
            (offset,) = struct.unpack_from(endian + "I", tiff, 4)
            (count,) = struct.unpack_from(endian + "H", tiff, offset)
            first, step, head, value_at = offset + 2, 12, "HHI", 8
        elif version == 43:
            (offset,) = struct.unpack_from(endian + "Q", tiff, 8)
            (count,) = struct.unpack_from(endian + "Q", tiff, offset)
            first, step, head, value_at = offset + 8, 20, "HHQ", 12
        else:
            return None
        found: dict[int, int] = {}
        for index in range(min(count, 4096)):
            entry = first + index * step
            tag, kind, _n = struct.unpack_from(endian + head, tiff, entry)
            if tag in tags:
                layout = {1: "B", 3: "H", 4: "I", 8: "h", 9: "i", 16: "Q"}.get(kind)
                if layout is not None:
                    (found[tag],) = struct.unpack_from(endian + layout, tiff, entry + value_at)
    except struct.error:
        return None
    return found


# =========================================================================== resize + normalise


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


def _output_geometry(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """(resized height, resized width, crop top, crop left), as the spec defines them."""
    return spec.geometry(height, width)


class ImagePreprocessor:
    """Decoded or encoded images -> the model's ``pixel_values``, following a PreprocessSpec exactly.

    Immutable after construction (safe to share between threads); the only shared state is the
    pure per-(size, interpolation) weight cache.
    """

    def __init__(self, spec: PreprocessSpec | Mapping[str, Any], max_pixels: int = MAX_PIXELS) -> None:
        if isinstance(spec, Mapping):
            spec = from_dict(PreprocessSpec, spec)
        if not isinstance(spec, PreprocessSpec):
            raise ConfigError(f"ImagePreprocessor needs a PreprocessSpec, got {type(spec).__name__}")
        if spec.channel_order not in _CHANNEL_ORDERS:
            raise ConfigError(f"unknown model channel_order {spec.channel_order!r} in the preprocessing spec")
        if len(spec.mean) != 3 or len(spec.std) != 3 or not all(s > 0 for s in spec.std):
            raise ConfigError(f"preprocessing spec needs three means and three positive stds, got "
                              f"mean={spec.mean} std={spec.std}")
        self.spec = spec
        self.max_pixels = _pixel_limit(max_pixels)
        self.image_size = spec.image_size
        # (x / 255 - mean) / std for every uint8 value, in float32 as torch computes it.
        values = np.arange(256, dtype=np.float32) / np.float32(255.0)
        mean = np.asarray(spec.mean, dtype=np.float32)[:, None]
        std = np.asarray(spec.std, dtype=np.float32)[:, None]
        self._lut = ((values[None, :] - mean) / std).astype(np.float32)
        self._lut.setflags(write=False)

    def __repr__(self) -> str:
        return f"ImagePreprocessor({self.spec!r}, max_pixels={self.max_pixels})"

    def __call__(self, image: ImageSource, channel_order: str = "BGR") -> np.ndarray:
        return self.preprocess(image, channel_order)

    def preprocess(self, image: ImageSource, channel_order: str = "BGR") -> np.ndarray:
        """One image (path, bytes or array) -> float32 [3, S, S], as training's ``preprocess`` returns."""
        rgb = decode_image(image, channel_order=channel_order, max_pixels=self.max_pixels)
        return self.normalize(self.resize_and_crop(rgb))

    def batch(self, images: Sequence[ImageSource] | np.ndarray, channel_order: str = "BGR") -> np.ndarray:
        """Several images -> float32 [N, 3, S, S]; a bad one raises ImageError naming its index."""
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
        """Upright RGB uint8 [H, W, 3] -> uint8 [S, S, 3] after the spec's resize and centre crop.

        Only the output pixels that survive the crop are computed, from the input rows they need.
        """
        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
                and rgb.size):
            got = _array_name(rgb) if isinstance(rgb, np.ndarray) else type(rgb).__name__
            raise ImageError(f"resize_and_crop() needs an RGB uint8 HxWx3 array, got {got}")
        spec, size = self.spec, self.image_size
        in_h, in_w = rgb.shape[:2]
        new_h, new_w, top, left = _output_geometry(in_h, in_w, spec)
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

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [S, S, 3] RGB -> float32 [3, S, S] in the model's channel order, (x/255 - mean)/std."""
        channels = pixels.transpose(2, 0, 1)
        if self.spec.channel_order == "BGR":
            channels = channels[::-1]
        out = np.empty(channels.shape, dtype=np.float32)
        for channel in range(3):
            np.take(self._lut[channel], channels[channel], out=out[channel])
        return out
