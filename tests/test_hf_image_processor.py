"""HF CLIP / SigLIP image processors -> PreprocessSpec; runtime and training pixels against transformers'."""

from __future__ import annotations

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402

from vledge.data.images import preprocess as training_preprocess  # noqa: E402
from vledge.errors import ConfigError  # noqa: E402
from vledge.hf.image_processor import preprocess_spec_from_hf  # noqa: E402
from vledge.runtime.preprocess import ImagePreprocessor  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
# name -> (transformers classes by backend, constructor arguments)
PROCESSORS = {
    "clip336": ("CLIPImageProcessor", dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})),
    "clip224_bilinear": ("CLIPImageProcessor", dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                                    resample=2)),
    "siglip384": ("SiglipImageProcessor", dict(size={"height": 384, "width": 384})),
}


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    files = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage_data, name)())
        for ext in ("png", "jpg"):
            path = folder / f"{name}.{ext}"
            image.save(path, quality=90) if ext == "jpg" else image.save(path)
            files.append(path)
    return files


def _hf_processor(name: str, backend: str, folder):
    cls_name, kwargs = PROCESSORS[name]
    cls = getattr(transformers, cls_name + ("Pil" if backend == "pil" else ""), None)
    if cls is None:  # transformers 4.x: the one class resizes with Pillow
        cls = getattr(transformers, cls_name)
    processor = cls(**kwargs)
    processor.save_pretrained(folder)
    return processor


def _to_255(pixel_values: np.ndarray, spec) -> np.ndarray:
    """Undo the normalisation: float [3, S, S] -> 0..255 pixel units."""
    mean = np.asarray(spec.mean, dtype=np.float64)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float64)[:, None, None]
    return (pixel_values.astype(np.float64) * std + mean) * 255.0


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_runtime_and_training_match_the_hf_processor(photo_files, tmp_path, name, backend):
    import json

    processor = _hf_processor(name, backend, tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    spec = preprocess_spec_from_hf(config, backend=backend)
    runtime = ImagePreprocessor(spec)
    for path in photo_files:
        with Image.open(path) as image:
            expected = np.asarray(processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"][0])
        got = runtime.preprocess(str(path))
        assert got.shape == expected.shape
        mae = np.abs(_to_255(got, spec) - _to_255(expected, spec)).mean()
        assert mae < 1 / 255, f"{path.name}: runtime MAE {mae:.4f} grey levels"
        trained = training_preprocess(str(path), spec).numpy()
        mae = np.abs(_to_255(trained, spec) - _to_255(expected, spec)).mean()
        assert mae < 1 / 255, f"{path.name}: training MAE {mae:.4f} grey levels"


def test_clip_defaults_fill_missing_keys():
    spec = preprocess_spec_from_hf({"image_processor_type": "CLIPImageProcessor"})
    assert (spec.resize, spec.resize_size, spec.image_size) == ("shortest_edge_center_crop", 224, 224)
    assert spec.interpolation == "bicubic_pil" and spec.crop_anchor == "floor"
    assert spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


@pytest.mark.parametrize("change, field", [
    ({"image_processor_type": "ConvNextImageProcessor"}, "image_processor_type"),
    ({"crop_pct": 0.875}, "crop_pct"),
    ({"do_convert_rgb": False}, "do_convert_rgb"),
    ({"resample": 1}, "resample"),
    ({"image_grid_pinpoints": [[336, 672]]}, "image_grid_pinpoints"),
    ({"rescale_factor": 1.0}, "rescale_factor"),
    ({"size": {"shortest_edge": 224}, "crop_size": {"height": 336, "width": 336}}, "crop_size"),
    ({"size": {"longest_edge": 224}}, "size"),
    ({"do_center_crop": False}, "do_center_crop"),
])
def test_what_the_spec_cannot_express_is_a_config_error(change, field):
    config = {"image_processor_type": "CLIPImageProcessor", **change}
    with pytest.raises(ConfigError, match=field):
        preprocess_spec_from_hf(config)
