"""Training-side image decoding: orientation, alpha, depth, and clear errors for bad files."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from vledge.config import PreprocessSpec
from vledge.data.images import load_rgb, preprocess, resize_and_crop
from vledge.errors import ImageError


def test_exif_orientation_is_applied(tmp_path):
    # a 40x20 image, left half red, right half blue; EXIF orientation 6 = rotate 90 degrees clockwise to view
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(path, exif=exif, quality=95)
    upright = np.asarray(load_rgb(path))
    assert upright.shape == (40, 20, 3)
    assert upright[5, 10, 0] > 200 and upright[5, 10, 2] < 60  # red on top after rotation
    assert upright[35, 10, 2] > 200  # blue at the bottom


def test_alpha_gray_and_16_bit_become_rgb(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: composited on white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    assert np.asarray(load_rgb(tmp_path / "alpha.png")).min() == 255

    gray16 = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), gray16)
    rgb = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert rgb.shape == (8, 8, 3) and abs(int(rgb[0, 0, 0]) - 127) <= 1

    Image.fromarray(np.full((8, 8), 60, dtype=np.uint8), "L").save(tmp_path / "gray.png")
    assert np.asarray(load_rgb(tmp_path / "gray.png")).tolist()[0][0] == [60, 60, 60]


def test_resize_crop_and_normalize_follow_the_spec(tmp_path):
    array = np.zeros((50, 100, 3), dtype=np.uint8)
    array[:, 25:75] = 200  # the centre square is bright, the sides dark
    Image.fromarray(array).save(tmp_path / "wide.png")
    spec = PreprocessSpec(image_size=16)
    pixels = resize_and_crop(load_rgb(tmp_path / "wide.png"), spec)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.uint8
    assert pixels.float().mean() > 190  # shortest-edge resize + centre crop keeps only the bright square
    squashed = resize_and_crop(load_rgb(tmp_path / "wide.png"), PreprocessSpec(image_size=16, resize="squash"))
    assert 80 < squashed.float().mean() < 120
    values = preprocess(tmp_path / "wide.png", spec)
    assert values.dtype == torch.float32 and values.shape == (3, 16, 16)
    assert torch.allclose(values, pixels.float() / 255 * 2 - 1)


def test_bad_files_raise_image_errors_naming_them(tmp_path):
    with pytest.raises(ImageError, match="missing.png"):
        load_rgb(tmp_path / "missing.png")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageError, match="text.jpg"):
        load_rgb(tmp_path / "text.jpg")
    ok, encoded = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "cut.jpg").write_bytes(encoded.tobytes()[: len(encoded) // 2])
    with pytest.raises(ImageError, match="cut.jpg"):
        load_rgb(tmp_path / "cut.jpg")
    with pytest.raises(ImageError):
        load_rgb(b"")


def test_training_pixels_are_the_reference_pipelines(synth_data, tmp_path):
    """Training now shares the runtime's implementation; it must still give what Pillow + torchvision give."""
    import platform

    import torchvision_reference as reference

    exact = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    rng = np.random.default_rng(5)
    photo = cv2.GaussianBlur(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8), (0, 0), 2)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    paths = sorted((synth_data / "images").rglob("*.jpg"))[:12] + [tmp_path / "photo.png"]
    for spec in (PreprocessSpec(image_size=32), PreprocessSpec(image_size=40, interpolation="bicubic"),
                 PreprocessSpec(image_size=24, resize="squash")):
        for path in paths:
            ours = resize_and_crop(load_rgb(path), spec)
            want = reference.resize_and_crop(reference.load_rgb(path), spec)
            assert ours.dtype == torch.uint8 and ours.shape == want.shape == (3, spec.image_size, spec.image_size)
            diff = (ours.int() - want.int()).abs()
            if exact:
                assert int(diff.max()) == 0, (path.name, spec)
            else:
                assert float(diff.float().mean()) <= 1.0, (path.name, spec)
            assert torch.equal(preprocess(path, spec), reference.normalize(ours, spec))
