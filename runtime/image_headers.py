"""Image file headers: the format, size, EXIF orientation and alpha rule, read without decoding.

Twelve formats are sniffed so that the pixel limit is checked before OpenCV decodes anything, and
so that decoding (``image_decoding``) can apply the orientation and alpha rules Pillow would.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

from vledge.errors import ImageError

_MAX_TEXT = 1 << 20  # largest decompressed PNG text chunk read for orientation (Pillow: MAX_TEXT_CHUNK)
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')
_TRANSPOSING = frozenset(range(2, 9))  # EXIF orientations other than 1 (upright) that Pillow applies


@dataclass(frozen=True)
class Probe:
    """What the header says, read without decoding: format, (width, height), orientation, alpha rule."""

    fmt: str | None
    size: tuple[int, int] | None = None
    orientation: int = 1
    alpha: bool = True  # False where Pillow would ignore the alpha OpenCV returns (RGB+tRNS PNG, BMP)
    maxval: int | None = None  # PNM only
    premultiplied: bool = False  # 8-bit TIFF with unassociated alpha: OpenCV (libtiff RGBA) premultiplies it


def probe_header(data: bytes, name: str) -> Probe:
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
    return Probe(fmt=None)


def _corrupt(name: str, fmt: str, why: str) -> ImageError:
    return ImageError(f"cannot decode image {name}: {why} ({fmt.upper()})")


def _sized(fmt: str, data: bytes, name: str, layout: str, offset: int, swap: bool = False) -> Probe:
    try:
        first, second = struct.unpack_from(layout, data, offset)
    except struct.error:
        raise _corrupt(name, fmt, "the header is cut short") from None
    width, height = (second, first) if swap else (first, second)
    return Probe(fmt=fmt, size=(abs(int(width)), abs(int(height))))


def _probe_png(data: bytes, name: str) -> Probe:
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
    return Probe(fmt="png", size=(width, height), orientation=orientation, alpha=colour_type not in (0, 2))


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


def _probe_jpeg(data: bytes, name: str) -> Probe:
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
    return Probe(fmt="jpeg", size=size, orientation=_orientation(exif, xmp))


def _probe_gif(data: bytes, name: str) -> Probe:
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
    return Probe(fmt="gif", size=(width, height))


def _probe_bmp(data: bytes, name: str) -> Probe:
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
    return Probe(fmt="bmp", size=probe.size, alpha=alpha)


def _probe_webp(data: bytes, name: str) -> Probe:
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
    return Probe(fmt="webp", size=size, orientation=_orientation(exif, xmp))


def _probe_tiff(data: bytes, name: str) -> Probe:
    """First IFD's ImageWidth/ImageLength. OpenCV's TIFF decoder applies the orientation tag itself."""
    entries = _tiff_ifd0(data, tags=(256, 257, 338))
    if entries is None or 256 not in entries or 257 not in entries:
        raise _corrupt(name, "tiff", "no image size in the first directory")
    return Probe(fmt="tiff", size=(entries[256], entries[257]), premultiplied=entries.get(338) == 2)


def _probe_pnm(data: bytes, name: str) -> Probe:
    kind = data[1:2]
    if kind == b"7":  # PAM: "WIDTH w" / "HEIGHT h" / "MAXVAL m" lines up to ENDHDR
        header = data[:4096].split(b"ENDHDR", 1)[0]
        fields = dict(re.findall(rb"^(WIDTH|HEIGHT|MAXVAL)\s+(\d+)", header, re.M))
        if b"WIDTH" not in fields or b"HEIGHT" not in fields:
            raise _corrupt(name, "pnm", "no image size in the header")
        maxval = int(fields.get(b"MAXVAL", b"255"))
        return Probe(fmt="pnm", size=(int(fields[b"WIDTH"]), int(fields[b"HEIGHT"])), maxval=maxval)
    text = re.sub(rb"#[^\n\r]*", b" ", data[2:1024])
    numbers = re.findall(rb"\d+", text)
    wanted = 2 if kind in (b"1", b"4", b"F", b"f") else 3
    if len(numbers) < wanted:
        raise _corrupt(name, "pnm", "no image size in the header")
    maxval = int(numbers[2]) if wanted == 3 else None
    return Probe(fmt="pnm", size=(int(numbers[0]), int(numbers[1])), maxval=maxval)


def _probe_jp2(data: bytes, name: str) -> Probe:
    at = data.find(b"ihdr", 0, 4096)
    if at < 0:
        raise _corrupt(name, "jpeg 2000", "no image header box")
    return _sized("jpeg 2000", data, name, ">II", at + 4, swap=True)


def _probe_j2k(data: bytes, at: int, name: str) -> Probe:
    try:
        x_size, y_size, x_origin, y_origin = struct.unpack_from(">IIII", data, at + 4)
    except struct.error:
        raise _corrupt(name, "jpeg 2000", "the header is cut short") from None
    return Probe(fmt="jpeg 2000", size=(max(x_size - x_origin, 0), max(y_size - y_origin, 0)))


def _probe_isobmff(data: bytes, name: str) -> Probe:
    # AVIF/HEIF: the largest 'ispe' (image spatial extents) property; other ftyp files are left to OpenCV.
    sizes = [struct.unpack_from(">II", data, m.start() + 8) for m in re.finditer(b"ispe", data[:1 << 16])
             if m.start() + 16 <= len(data)]
    if not sizes:
        return Probe(fmt=None)
    width, height = max(sizes, key=lambda s: s[0] * s[1])
    return Probe(fmt="avif", size=(width, height))


def _probe_hdr(data: bytes, name: str) -> Probe:
    match = re.search(rb"\n([-+])([YX]) (\d+) ([-+])([YX]) (\d+)\n", data[:8192])
    if not match:
        raise _corrupt(name, "hdr", "no image size in the header")
    first, second = int(match[3]), int(match[6])
    return Probe(fmt="hdr", size=(second, first) if match[2] == b"Y" else (first, second))


def _orientation(exif: bytes | None, xmp: bytes | None) -> int:
    """Pillow's rule: the EXIF Orientation tag, else an XMP tiff:Orientation; only 2-8 transpose."""
    value = None
    if exif:
        entries = _tiff_ifd0(exif[6:] if exif.startswith(b"Exif\x00\x00") else exif, tags=(0x0112,))
        value = entries.get(0x0112) if entries else None
    if value is None and xmp:
        match = _XMP_ORIENTATION.search(xmp)
        value = int(match[2]) if match else None
    return value if value in _TRANSPOSING else 1


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

