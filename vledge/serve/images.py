"""The image part of a chat request -> the model's pixels, refusing what a server must not decode or fetch."""

from __future__ import annotations

import base64
import binascii
import contextlib
import re

from vledge.errors import ImageError, RequestError
from vledge.runtime.image_headers import probe_header
from vledge.serve.budget import PixelBudget

_DATA_URL = re.compile(r"data:(?P<media>[^;,]*)(?P<params>(;[^;,]*)*),", re.ASCII)


def image_bytes(url: str, max_bytes: int) -> bytes:
    """The file inside a ``data:image/...;base64,...`` URL, at most ``max_bytes`` long once decoded."""
    if not isinstance(url, str) or not url:
        raise RequestError("image_url.url must be a non-empty string", code="invalid_image_url",
                           param="image_url.url")
    scheme = url[:8].lower()
    if scheme.startswith(("http://", "https://")):
        raise RequestError("remote image URLs are not fetched; send the image inline as a "
                           "data:image/...;base64,... URL", code="remote_image_url", param="image_url.url")
    header = _DATA_URL.match(url[:256])
    if header is None:
        raise RequestError("image_url.url must be a data:image/...;base64,... URL", code="invalid_image_url",
                           param="image_url.url")
    media = header.group("media").strip().lower()
    params = [p.strip().lower() for p in header.group("params").split(";") if p.strip()]
    if "base64" not in params:
        raise RequestError("image data URLs must be base64-encoded (data:image/...;base64,...)",
                           code="invalid_image_url", param="image_url.url")
    if media and not media.startswith("image/"):
        raise RequestError(f"the data URL's media type is {media!r}, not an image/... type", code="invalid_image",
                           param="image_url.url")
    payload = url[header.end():]
    if any(c in payload for c in " \t\r\n"):
        payload = "".join(payload.split())
    if len(payload) // 4 * 3 > max_bytes + 2:  # checked before decoding: the decoded size is known from the length
        raise RequestError(f"the image is over the server's limit of {max_bytes} bytes", status=413,
                           code="image_too_large", param="image_url.url")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"the image data URL is not valid base64 ({exc})", code="invalid_base64",
                           param="image_url.url") from None
    if not data:
        raise RequestError("the image data URL holds no bytes", code="invalid_image", param="image_url.url")
    if len(data) > max_bytes:
        raise RequestError(f"the image is {len(data)} bytes, over the server's limit of {max_bytes}", status=413,
                           code="image_too_large", param="image_url.url")
    return data


def image_pixels(preprocessor, data: bytes, budget: PixelBudget | None = None):
    """Encoded image bytes -> float32 [3, S, S] through the runtime's preprocessing (and its pixel limit); for a
    tiled model (``preprocessor.tiled``) the image's tiles and grid (``ImagePreprocessor.tiles``) instead.

    The decoded size is read from the file header first and reserved from ``budget`` for the time of the
    decode; an image whose header gives no size reserves the preprocessor's whole per-image limit.
    """
    try:
        probe = probe_header(data, "image_url")
    except ImageError as exc:
        raise RequestError(f"the image cannot be used: {exc}", code="invalid_image", param="image_url.url") from None
    limit = preprocessor.max_pixels
    pixels = probe.size[0] * probe.size[1] if probe.size is not None else limit
    if pixels > limit:
        raise RequestError(f"the image has {probe.size[0]}x{probe.size[1]} pixels, over the server's limit of "
                           f"{limit}", code="invalid_image", param="image_url.url")
    reservation = budget.reserve(pixels) if budget is not None else contextlib.nullcontext()
    with reservation:
        try:
            return preprocessor.tiles(data) if preprocessor.tiled else preprocessor.preprocess(data)
        except ImageError as exc:
            raise RequestError(f"the image cannot be used: {exc}", code="invalid_image",
                               param="image_url.url") from None
