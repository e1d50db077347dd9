"""Runtime preprocessing (OpenCV + numpy) against the training pipeline (Pillow + torchvision).

The design contract allows 1/255 mean absolute difference on real photos. Lossless files must
decode identically; JPEGs decode identically when Pillow's and OpenCV's libjpeg-turbo agree (they
do here) and are held to a small tolerance otherwise. Where torchvision takes torch's native uint8
resize kernels (CPUs with AVX2/AVX512, ARM) the runtime replays them and must match bit for bit.
"""

from __future__ import annotations

import io
import platform
import struct
import subprocess
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from vledge.config import PreprocessSpec
from vledge.errors import ImageError
from vledge.runtime.preprocess import ImagePreprocessor, decode_image
from vledge.runtime.resampling import clear_weight_cache

SIZES = (32, 48, 224)
MODES = ("shortest_edge_center_crop", "squash")
INTERPOLATIONS = ("bilinear", "bicubic")


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def training():
    """The Pillow + torchvision pipeline the spec is defined by (needs torch, torchvision and Pillow)."""
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    pytest.importorskip("PIL")
    import torchvision_reference as images

    return images


@pytest.fixture(scope="module")
def native_uint8_resize(training) -> bool:
    """Whether torchvision resizes uint8 with torch's integer kernels here (then parity is exact)."""
    import torch

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def pil_bytes(array: np.ndarray, fmt: str, mode: str | None = None, **options) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, fmt, **options)
    return buffer.getvalue()


def cv2_bytes(array: np.ndarray, ext: str) -> bytes:
    ok, encoded = cv2.imencode(ext, array)
    assert ok
    return encoded.tobytes()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.fixture(scope="module")
def photos(training) -> dict[str, bytes]:
    """Real photographs and alpha artwork that matplotlib ships, plus crops and rescalings of the photo."""
    matplotlib = pytest.importorskip("matplotlib")
    folder = Path(matplotlib.get_data_path()) / "sample_data"
    hopper = (folder / "grace_hopper.jpg").read_bytes()
    rgb = np.asarray(training.load_rgb(hopper))  # 512 wide, 600 high
    return {
        "grace_hopper.jpg": hopper,
        "portrait_crop.png": pil_bytes(rgb[20:480, 100:321], "PNG"),  # 221 x 460, tall
        "reencoded_crop.jpg": pil_bytes(rgb[3:304, 7:524], "JPEG", quality=90),  # 505 x 301, odd sizes
        "downscaled.png": pil_bytes(cv2.resize(rgb, (300, 256), interpolation=cv2.INTER_AREA), "PNG"),
        "small_crop.png": pil_bytes(rgb[100:121, 200:237], "PNG"),  # 37 x 21: upscaled for every size
        "Minduka_Present_Blue_Pack.png": (folder / "Minduka_Present_Blue_Pack.png").read_bytes(),  # RGBA
        "logo2.png": (folder / "logo2.png").read_bytes(),  # RGBA, 542 x 130
    }


@pytest.fixture(scope="module")
def decoded(photos, training):
    """Each photo decoded by both sides once: {name: (Pillow image, runtime RGB array)}."""
    return {name: (training.load_rgb(data), decode_image(data)) for name, data in photos.items()}


def uint8_mad(reference, ours: np.ndarray) -> tuple[float, int]:
    """Mean and largest absolute difference in grey levels; a torch reference is CHW."""
    ref = reference.numpy().transpose(1, 2, 0) if hasattr(reference, "numpy") else np.asarray(reference)
    assert ref.shape == ours.shape
    diff = np.abs(ref.astype(np.int16) - ours.astype(np.int16))
    return float(diff.mean()), int(diff.max())


def assert_decodes_alike(reference, ours: np.ndarray, lossy: bool, label: str = "") -> None:
    mad, worst = uint8_mad(reference, ours)
    assert (mad <= 0.5) if lossy else (worst == 0), (label, mad, worst)


# --------------------------------------------------------------------------- parity on real photos


def test_photos_decode_as_training_does(decoded):
    for name, (pil_image, rgb) in decoded.items():
        assert rgb.dtype == np.uint8 and rgb.flags.c_contiguous, name
        assert_decodes_alike(pil_image, rgb, lossy=name.endswith(".jpg"), label=name)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES)
def test_resize_and_crop_match_training_on_photos(decoded, training, native_uint8_resize, size, mode, interpolation):
    spec = PreprocessSpec(image_size=size, resize=mode, interpolation=interpolation)
    preprocessor = ImagePreprocessor(spec)
    for name, (pil_image, _) in decoded.items():
        ours = preprocessor.resize_and_crop(np.asarray(pil_image))  # the same pixels on both sides
        assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
        mad, worst = uint8_mad(training.resize_and_crop(pil_image, spec), ours)
        assert mad <= 1.0, (name, mad)  # the contract: 1/255 after scaling to [0, 1]
        if native_uint8_resize:
            assert worst == 0, (name, mad, worst)
        else:  # torch's float path rounds once at the end instead of between the passes
            assert mad <= 0.25, (name, mad)


@pytest.mark.parametrize("size, mean, std", [
    (48, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])
def test_pixel_values_match_training_end_to_end(photos, decoded, training, native_uint8_resize, size, mean, std):
    spec = PreprocessSpec(image_size=size, mean=mean, std=std)
    preprocessor = ImagePreprocessor(spec)
    for name, data in photos.items():
        same_decode = np.array_equal(np.asarray(decoded[name][0]), decoded[name][1])
        ours = preprocessor(data)
        reference = training.preprocess(data, spec).numpy()
        assert ours.shape == (3, size, size) and ours.dtype == np.float32
        # one grey level is 1/255 before dividing by std
        assert np.abs(reference - ours).mean() <= (1 / 255) / min(std), name
        if native_uint8_resize and same_decode:
            assert np.array_equal(reference, ours), name


def test_random_shapes_resize_like_torchvision(training, native_uint8_resize):
    """Up- and downscaling, 1-pixel sides and extreme aspect ratios, against torchvision itself."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for trial in range(40):
        height, width = (int(v) for v in rng.integers(1, 400, size=2))
        if trial % 8 == 0:
            height = int(rng.integers(1, 4))
        spec = PreprocessSpec(image_size=int(rng.choice([8, 17, 32, 64])), resize=str(rng.choice(MODES)),
                              interpolation=str(rng.choice(INTERPOLATIONS)))
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        mad, worst = uint8_mad(training.resize_and_crop(Image.fromarray(image), spec),
                               ImagePreprocessor(spec).resize_and_crop(image))
        assert (worst == 0) if native_uint8_resize else (mad <= 1.0), (height, width, spec, mad, worst)


# --------------------------------------------------------------------------- decoding rules


def _rgba_table() -> np.ndarray:
    value, alpha = np.meshgrid(np.arange(256), np.arange(256))
    return np.dstack([value, 255 - value, (value * 7) % 256, alpha]).astype(np.uint8)


def _palette_image():
    from PIL import Image

    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 5, (9, 11), dtype=np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30, 200, 100, 50])
    return image


def _encoded(image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _bmp_bitfields_without_alpha() -> bytes:
    """A 32-bit BITFIELDS BMP with a V2 header (no alpha mask): Pillow reads RGB, OpenCV adds alpha 0."""
    pixels = bytes([10, 20, 30, 0] * 6)
    info = struct.pack("<IiiHHIIiiII", 52, 3, 2, 1, 32, 3, len(pixels), 2835, 2835, 0, 0)
    info += struct.pack("<III", 0xFF0000, 0xFF00, 0xFF)
    offset = 14 + len(info)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + pixels


_RNG = np.random.default_rng(1)
_RGB = _RNG.integers(0, 256, (13, 17, 3), dtype=np.uint8)
_GREY16 = _RNG.integers(0, 65536, (13, 17), dtype=np.uint16)
_COLOUR16 = _RNG.integers(0, 65536, (13, 17, 4), dtype=np.uint16)

DECODE_CASES = {
    "rgba: every value under every alpha (PNG)": lambda: pil_bytes(_rgba_table(), "PNG", "RGBA"),
    "grey + alpha (PNG LA)": lambda: pil_bytes(_rgba_table()[:, :, [0, 3]], "PNG", "LA"),
    "palette + alpha table (PNG)": lambda: _encoded(_palette_image(), "PNG",
                                                    transparency=bytes([0, 128, 255, 60, 255])),
    "palette + transparent index (GIF)": lambda: _encoded(_palette_image(), "GIF", transparency=1),
    "RGB + tRNS colour, which training ignores (PNG)": lambda: pil_bytes(
        _RGB, "PNG", transparency=tuple(int(v) for v in _RGB[0, 0])),
    "grey (PNG)": lambda: pil_bytes(_RGB[:, :, 0], "PNG"),
    "grey (JPEG)": lambda: pil_bytes(_RGB[:, :, 0], "JPEG"),
    "1-bit (PNG)": lambda: pil_bytes(_RGB[:, :, 0] > 128, "PNG"),
    "16-bit grey (PNG)": lambda: cv2_bytes(_GREY16, ".png"),
    "16-bit grey (TIFF)": lambda: cv2_bytes(_GREY16, ".tiff"),
    "16-bit grey, values under 256 (PGM)": lambda: cv2_bytes(_GREY16 % 256, ".pgm"),
    "16-bit colour (PNG)": lambda: cv2_bytes(_COLOUR16[:, :, :3], ".png"),
    "16-bit colour (PPM)": lambda: cv2_bytes(_COLOUR16[:, :, :3], ".ppm"),
    "16-bit colour + alpha (PNG)": lambda: cv2_bytes(_COLOUR16, ".png"),
    "maxval 100 (PGM)": lambda: b"P5\n4 1\n100\n" + bytes([0, 50, 99, 100]),
    "32-bit with alpha (BMP)": lambda: cv2_bytes(np.dstack([_RGB, _RGB[:, :, 1]]), ".bmp"),
    "32-bit without alpha mask (BMP)": _bmp_bitfields_without_alpha,
    "rgba lossless (WebP)": lambda: pil_bytes(_rgba_table()[::8, ::8], "WEBP", "RGBA", lossless=True, exact=True),
    "rgba, libtiff premultiplies (TIFF)": lambda: pil_bytes(_rgba_table()[::8, ::8], "TIFF", "RGBA"),
    "progressive (JPEG)": lambda: pil_bytes(_RGB, "JPEG", progressive=True),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decoding_follows_training_rules(training, case):
    data = DECODE_CASES[case]()
    ours = decode_image(data)
    assert ours.dtype == np.uint8
    assert_decodes_alike(training.load_rgb(data), ours, lossy="JPEG" in case)


def test_cmyk_jpeg_is_within_one_level(training):
    # Pillow and libjpeg-turbo convert CMYK to RGB with slightly different rounding.
    from PIL import Image

    data = _encoded(Image.fromarray(_RGB).convert("CMYK"), "JPEG")
    assert np.abs(np.asarray(training.load_rgb(data)).astype(int) - decode_image(data)).max() <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("container", ["JPEG exif", "JPEG xmp", "PNG exif", "WEBP exif", "TIFF tag"])
def test_every_orientation_is_applied_like_training(training, container, orientation):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    image = Image.fromarray(_RGB)  # 17 x 13: every orientation gives a different array
    if container == "JPEG exif":
        data = _encoded(image, "JPEG", exif=exif, quality=95)
    elif container == "JPEG xmp":
        xmp = f'<x:xmpmeta><rdf:Description tiff:Orientation="{orientation}"/></x:xmpmeta>'
        data = _encoded(image, "JPEG", xmp=xmp.encode(), quality=95)
    elif container == "PNG exif":
        data = _encoded(image, "PNG", exif=exif.tobytes())
    elif container == "WEBP exif":
        data = _encoded(image, "WEBP", exif=exif.tobytes(), lossless=True)
    else:
        data = _encoded(image, "TIFF", exif=exif)
    ours = decode_image(data)
    assert ours.shape == ((13, 17, 3) if orientation < 5 else (17, 13, 3))
    # a wrong turn or flip of these random pixels would differ by about 85 grey levels on average
    assert_decodes_alike(training.load_rgb(data), ours, lossy=container.startswith("JPEG"))


def test_exif_rotated_jpeg_from_path_bytes_and_imread_agree_and_are_upright(tmp_path, training):
    from PIL import Image

    # 80 x 40: the left half red, the right half blue; orientation 6 = turn 90 degrees clockwise to view.
    picture = np.zeros((40, 80, 3), dtype=np.uint8)
    picture[:, :40] = (230, 20, 20)
    picture[:, 40:] = (20, 20, 230)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(picture).save(path, exif=exif, quality=95)

    from_path = decode_image(path)
    from_str = decode_image(str(path))
    from_bytes = decode_image(path.read_bytes())
    from_bytearray = decode_image(bytearray(path.read_bytes()))
    from_memoryview = decode_image(memoryview(path.read_bytes()))
    from_imread = decode_image(cv2.imread(str(path)))  # OpenCV applies the orientation in imread
    for other in (from_str, from_bytes, from_bytearray, from_memoryview, from_imread):
        assert np.array_equal(from_path, other)
    assert from_path.shape == (80, 40, 3)  # upright
    assert from_path[10, 20, 0] > 200 and from_path[10, 20, 2] < 60  # red on top
    assert from_path[70, 20, 2] > 200 and from_path[70, 20, 0] < 60  # blue below
    assert_decodes_alike(training.load_rgb(path), from_path, lossy=True)

    preprocessor = ImagePreprocessor(PreprocessSpec(image_size=32))
    pixels = preprocessor.batch([path, path.read_bytes(), cv2.imread(str(path))])
    assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[0], pixels[2])
    assert np.abs(pixels[0] - training.preprocess(path, preprocessor.spec).numpy()).mean() <= 2 / 255


# --------------------------------------------------------------------------- arrays


def test_arrays_in_either_channel_order_grey_and_views():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (21, 34, 3), dtype=np.uint8)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    assert np.array_equal(decode_image(bgr), rgb)  # BGR is the default, as cv2.imread returns
    assert np.array_equal(decode_image(rgb, channel_order="RGB"), rgb)
    assert np.array_equal(decode_image(bgr, channel_order="bgr"), rgb)
    assert np.array_equal(decode_image(rgb[:, :, ::-1]), rgb)  # negative strides
    assert np.array_equal(decode_image(bgr[3:17, 5:30]), rgb[3:17, 5:30])  # non-contiguous crop
    grey = rgb[:, :, 0].copy()
    assert np.array_equal(decode_image(grey), np.dstack([grey] * 3))
    assert np.array_equal(decode_image(grey[:, :, None]), np.dstack([grey] * 3))
    result = decode_image(rgb, channel_order="RGB")
    rgb[:] = 0  # the result never aliases the caller's frame
    assert result.any()

    preprocessor = ImagePreprocessor(PreprocessSpec(image_size=16))
    assert np.array_equal(preprocessor(bgr), preprocessor.preprocess(bgr[:, :, ::-1], channel_order="RGB"))


def test_alpha_and_16_bit_arrays_read_like_the_png_they_would_be_saved_as(training):
    rng = np.random.default_rng(4)
    cases = [
        rng.integers(0, 256, (9, 14, 4), dtype=np.uint8),  # BGRA
        rng.integers(0, 65536, (9, 14), dtype=np.uint16),
        rng.integers(0, 65536, (9, 14, 3), dtype=np.uint16),
        rng.integers(0, 65536, (9, 14, 4), dtype=np.uint16),
    ]
    for array in cases:
        reference = np.asarray(training.load_rgb(cv2_bytes(array, ".png")))
        assert np.array_equal(decode_image(array), reference), array.shape
    bgra = cases[0].copy()
    bgra[:, :, 3] = 0
    assert decode_image(bgra).min() == 255  # fully transparent: white
    rgba = np.ascontiguousarray(cases[0][:, :, [2, 1, 0, 3]])
    assert np.array_equal(decode_image(rgba, channel_order="RGB"), decode_image(cases[0]))
    big_endian = cases[1].astype(">u2")
    assert np.array_equal(decode_image(big_endian), decode_image(cases[1]))


# --------------------------------------------------------------------------- errors


def _truncated_png(photos) -> bytes:
    data = photos["logo2.png"]
    return data[: len(data) // 2]


ERROR_CASES = [
    # (label, source factory (tmp_path, photos) -> (source, kwargs), message fragment)
    ("missing file", lambda t, p: (t / "nowhere.jpg", {}), "no such file"),
    ("directory", lambda t, p: (t, {}), "directory"),
    ("not an image", lambda t, p: (_write(t / "notes.txt", b"hello, not pixels"), {}), "not a recognised image"),
    ("empty file", lambda t, p: (_write(t / "empty.png", b""), {}), "empty"),
    ("truncated JPEG", lambda t, p: (_write(t / "cut.jpg", p["grace_hopper.jpg"][:30000]), {}), "truncated"),
    ("JPEG without its end marker", lambda t, p: (_write(t / "cut.jpg", p["grace_hopper.jpg"][:-2]), {}),
     "truncated"),
    ("truncated PNG", lambda t, p: (_write(t / "cut.png", _truncated_png(p)), {}), "truncated"),
    ("truncated PNG bytes", lambda t, p: (_truncated_png(p), {}), "truncated"),
    ("empty array", lambda t, p: (np.zeros((0, 5, 3), np.uint8), {}), "empty"),
    ("float64 array", lambda t, p: (np.zeros((4, 5, 3)), {}), "dtype float64"),
    ("int32 array", lambda t, p: (np.zeros((4, 5, 3), np.int32), {}), "dtype int32"),
    ("bool array", lambda t, p: (np.zeros((4, 5), bool), {}), "dtype bool"),
    ("two channels", lambda t, p: (np.zeros((4, 5, 2), np.uint8), {}), "shape (4, 5, 2)"),
    ("five channels", lambda t, p: (np.zeros((4, 5, 5), np.uint8), {}), "shape (4, 5, 5)"),
    ("a batch array", lambda t, p: (np.zeros((2, 4, 5, 3), np.uint8), {}), "shape (2, 4, 5, 3)"),
    ("unknown channel order", lambda t, p: (np.zeros((4, 5, 3), np.uint8), {"channel_order": "BRG"}),
     "channel_order"),
    ("array over the pixel limit", lambda t, p: (np.zeros((40, 50, 3), np.uint8), {"max_pixels": 1999}),
     "over the limit of 1999"),
    ("unsupported source type", lambda t, p: ([[0, 0, 0]], {}), "unsupported image source of type list"),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("label, make, fragment", ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
def test_bad_inputs_raise_image_error_naming_the_source(tmp_path, photos, label, make, fragment):
    source, kwargs = make(tmp_path, photos)
    with pytest.raises(ImageError) as caught:
        decode_image(source, **kwargs)
    message = str(caught.value)
    assert fragment in message, message
    if isinstance(source, Path):
        assert str(source) in message
    elif isinstance(source, bytes):
        assert f"<{len(source)} bytes>" in message
    elif isinstance(source, np.ndarray) and "channel_order" not in kwargs:
        assert f"shape={source.shape}" in message


def _bombs() -> dict[str, bytes]:
    """Tiny files whose headers claim 60000 x 60000 pixels (3.6 gigapixels)."""
    side = 60000
    png = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
           + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""))
    jpeg = (b"\xff\xd8\xff\xc0" + struct.pack(">HBHHB", 17, 8, side, side, 3)
            + bytes([1, 0x11, 0, 2, 0x11, 0, 3, 0x11, 0])
            + b"\xff\xda" + struct.pack(">H", 12) + bytes([3, 1, 0, 2, 0x11, 3, 0x11, 0, 63, 0])
            + bytes(16) + b"\xff\xd9")
    gif = (b"GIF89a" + struct.pack("<HHBBB", 16, 16, 0, 0, 0) + b"\x2c" + struct.pack("<HHHHB", 0, 0, side, side, 0)
           + b"\x02\x02\x44\x01\x00\x3b")  # small screen, huge first frame
    webp = (b"RIFF" + struct.pack("<I", 22) + b"WEBPVP8X" + struct.pack("<I", 10) + bytes(4)
            + (side - 1).to_bytes(3, "little") * 2)
    bmp = (b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
           + struct.pack("<IiiHHIIiiII", 40, side, -side, 1, 24, 0, 0, 0, 0, 0, 0))  # top-down rows
    tiff = (b"II*\x00" + struct.pack("<IH", 8, 2) + struct.pack("<HHII", 256, 4, 1, side)
            + struct.pack("<HHII", 257, 4, 1, side) + struct.pack("<I", 0))
    return {"png": png, "jpeg": jpeg, "gif": gif, "webp": webp, "bmp": bmp, "tiff": tiff}


@pytest.mark.parametrize("fmt", list(_bombs()))
def test_pixel_limit_is_read_from_the_header_before_decoding(monkeypatch, fmt):
    def no_decoding(*args, **kwargs):
        raise AssertionError("cv2.imdecode must not run for an image over the pixel limit")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    data = _bombs()[fmt]
    with pytest.raises(ImageError, match=r"60000x60000 pixels, over the limit of 64000000") as caught:
        decode_image(data)
    assert f"<{len(data)} bytes>" in str(caught.value)


def test_pixel_limit_is_configurable_and_inclusive(photos, monkeypatch):
    hopper = photos["grace_hopper.jpg"]  # 512 wide, 600 high: 307200 pixels
    assert decode_image(hopper, max_pixels=307200).shape == (600, 512, 3)
    with pytest.raises(ImageError, match="512x600 pixels, over the limit of 307199"):
        ImagePreprocessor(PreprocessSpec(), max_pixels=307199).preprocess(hopper)
    monkeypatch.setattr(cv2, "imdecode", None)  # would fail if reached
    with pytest.raises(ImageError, match="over the limit of 1000"):
        decode_image(hopper, max_pixels=1000)


def test_cv2_errors_become_image_errors(monkeypatch, photos):
    def broken(*args, **kwargs):
        raise cv2.error("OpenCV(5.0.0) decoder exploded")

    monkeypatch.setattr(cv2, "imdecode", broken)
    data = photos["grace_hopper.jpg"]
    with pytest.raises(ImageError, match=rf"cannot decode image <{len(data)} bytes>: OpenCV.*exploded"):
        decode_image(data)


# --------------------------------------------------------------------------- the preprocessor API


def test_batch_stacks_and_names_the_bad_index(photos, tmp_path):
    preprocessor = ImagePreprocessor(PreprocessSpec(image_size=32))
    frame = cv2.imdecode(np.frombuffer(photos["downscaled.png"], np.uint8), cv2.IMREAD_COLOR)
    batch = preprocessor.batch([photos["grace_hopper.jpg"], frame])
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == np.float32
    assert np.array_equal(batch[0], preprocessor(photos["grace_hopper.jpg"]))
    assert np.array_equal(batch[1], preprocessor(frame))
    assert preprocessor.batch(np.stack([frame, frame])).shape == (2, 3, 32, 32)

    with pytest.raises(ImageError, match=r"image 1 of 3: cannot decode image <7 bytes>"):
        preprocessor.batch([frame, b"garbage", frame])
    with pytest.raises(ImageError, match=rf"image 2 of 3: .*{tmp_path / 'gone.png'}"):
        preprocessor.batch([frame, frame, tmp_path / "gone.png"])
    with pytest.raises(ImageError, match="no images"):
        preprocessor.batch([])
    with pytest.raises(ImageError, match="sequence of images"):
        preprocessor.batch("photo.jpg")


def test_spec_from_a_manifest_mapping_normalisation_and_model_channel_order():
    rng = np.random.default_rng(5)
    frame = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    spec = {"image_size": 16, "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 0.125]}
    rgb_model = ImagePreprocessor(spec)
    assert rgb_model.spec == PreprocessSpec(image_size=16, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    pixels = rgb_model.resize_and_crop(decode_image(frame))
    expected = (pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
                - np.float32([0.1, 0.2, 0.3])[:, None, None]) / np.float32([0.5, 0.25, 0.125])[:, None, None]
    assert np.array_equal(rgb_model(frame), expected)
    bgr_model = ImagePreprocessor({**spec, "channel_order": "BGR", "mean": [0.3, 0.2, 0.1],
                                   "std": [0.125, 0.25, 0.5]})
    assert np.array_equal(bgr_model(frame), rgb_model(frame)[::-1])


def test_resize_and_crop_rejects_what_is_not_rgb_uint8_and_absurd_shapes():
    preprocessor = ImagePreprocessor(PreprocessSpec(image_size=224))
    for bad in (np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8)):
        with pytest.raises(ImageError, match="RGB uint8"):
            preprocessor.resize_and_crop(bad)
    # a 1-pixel-high strip would have to become 224 x 1120000 first, as torchvision resizes it
    with pytest.raises(ImageError, match="5000x1 image: its aspect ratio is too extreme"):
        preprocessor(np.zeros((1, 5000, 3), np.uint8))
    assert preprocessor(np.zeros((1, 4000, 3), np.uint8)).shape == (3, 224, 224)  # 896000 wide is allowed


def test_one_preprocessor_serves_many_threads(photos):
    preprocessor = ImagePreprocessor(PreprocessSpec(image_size=48, interpolation="bicubic"))
    sources = [photos[name] for name in ("grace_hopper.jpg", "portrait_crop.png", "logo2.png", "small_crop.png")] * 3
    expected = [preprocessor(source) for source in sources]
    clear_weight_cache()  # let the threads race to fill the weight cache
    barrier = threading.Barrier(4)

    def work(source):
        barrier.wait(timeout=30)  # four calls at a time, started together
        return preprocessor(source)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, sources))
    for got, want in zip(results, expected):
        assert np.array_equal(got, want)


def test_runtime_preprocessing_needs_neither_torch_nor_pillow(photos, tmp_path):
    path = _write(tmp_path / "photo.jpg", photos["grace_hopper.jpg"])
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None; sys.modules['PIL'] = None\n"
        "import numpy as np\n"
        "import vledge.runtime.preprocess as p\n"
        "from vledge.config import PreprocessSpec\n"
        "pre = p.ImagePreprocessor(PreprocessSpec(image_size=48))\n"
        f"x = pre.batch([{str(path)!r}, np.zeros((30, 40, 3), np.uint8)])\n"
        "assert x.shape == (2, 3, 48, 48) and x.dtype == np.float32, x.shape\n"
        "assert not any(m in sys.modules and sys.modules[m] is not None for m in ('torch', 'PIL'))\n"
        "print('ok', float(x[0].mean()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr
    in_process = float(ImagePreprocessor(PreprocessSpec(image_size=48))(path).mean())
    assert abs(float(done.stdout.split()[1]) - in_process) < 1e-6


def test_reduced_jpeg_decoding_stays_within_one_grey_level(training):
    """Opt-in DCT-scaled decoding of a large JPEG: a quarter of the pixels per side, upright, and after the
    resize within one grey level on average of training's full decode; small JPEGs decode in full."""
    from PIL import Image

    rng = np.random.default_rng(3)
    coarse = (rng.random((30, 40, 3)) * 255).astype(np.uint8)
    picture = cv2.GaussianBlur(cv2.resize(coarse, (1600, 1200), interpolation=cv2.INTER_CUBIC), (0, 0), 2)
    picture = np.clip(picture.astype(np.int16) + rng.integers(-8, 9, picture.shape), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 1600 x 1200, viewed 1200 x 1600
    data = _encoded(Image.fromarray(picture), "JPEG", exif=exif, quality=90)
    spec = PreprocessSpec(image_size=64)
    reduced = decode_image(data, reduce_for=64)
    assert reduced.shape == (400, 300, 3)  # 1200 >= 4 x 3 x 64: decoded at 1/4, then turned upright
    assert decode_image(data, reduce_for=128).shape == (800, 600, 3)  # 1/4 would keep under 3 x 128: 1/2
    assert decode_image(data, reduce_for=256).shape == (1600, 1200, 3)
    ours = ImagePreprocessor(spec, reduced_jpeg=True)(data)
    reference = training.preprocess(data, spec).numpy()
    assert ours.shape == reference.shape
    levels = np.abs(reference - ours) * np.asarray(spec.std, dtype=np.float32)[:, None, None] * 255  # grey levels
    assert levels.mean() <= 1.0, levels.mean()
    small = _encoded(Image.fromarray(picture[:150, :200]), "JPEG", quality=90)
    assert np.array_equal(decode_image(small, reduce_for=64), decode_image(small))
    assert np.array_equal(ImagePreprocessor(spec, reduced_jpeg=True)(small), ImagePreprocessor(spec)(small))
