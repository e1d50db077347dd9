"""The docs' Python examples, extracted from the Markdown and run against real exported models.

A GPT-style model (the built-in transformer: kv_heads == heads) and a Llama-family one with
grouped-query attention (kv_heads < heads), so an example that only works for one of them fails.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PLACEHOLDER = "pixel_values = ...  # float32 [1, 3, S, S], preprocessed as above"


def python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture(scope="module")
def llama_model_dir(synth_data, tmp_path_factory) -> Path:
    """A tiny Llama-family LM (4 heads, 2 key/value heads) behind the tiny preset's vision side, exported."""
    from conftest import tiny_configs
    from hf_folders import make_lm_folder
    from vledge.checkpoint import Checkpoint, save_checkpoint
    from vledge.export import ExportOptions, export
    from vledge.hf.language_model import load_pretrained_lm
    from vledge.models.vlm import VisionLanguageModel
    from vledge.training.pretrained_lm import load_language_weights, with_language_model

    root = tmp_path_factory.mktemp("docs-llama")
    lm = load_pretrained_lm(make_lm_folder(root / "lm", "llama", chat=True, seed=11))
    model_config = with_language_model(tiny_configs()[0], lm)
    model = VisionLanguageModel(model_config, image_token_id=lm.tokenizer.image_id)
    load_language_weights(model, lm)
    checkpoint = Checkpoint(model_config=model_config, tokenizer_json=lm.tokenizer.to_json(),
                            state_dict=model.state_dict())
    ckpt = save_checkpoint(root / "ckpt.pt", checkpoint)
    options = ExportOptions(quantize=("none",), data=synth_data, parity_samples=8, calibration_samples=8)
    return export(ckpt, root / "model", options).model_dir


@pytest.fixture(params=["transformer", "llama"])
def model_dir(request, tiny_model_dir, llama_model_dir):
    directory = tiny_model_dir if request.param == "transformer" else llama_model_dir
    arch = json.loads((directory / "vledge.json").read_text())["architecture"]
    assert (arch["kv_heads"] < arch["heads"]) == (request.param == "llama")
    return directory


@pytest.fixture
def workdir(model_dir, synth_data, tmp_path, monkeypatch):
    """A folder laid out as the examples assume: ``model/`` and a few images."""
    image = synth_data / json.loads((synth_data / "test.json").read_text())[0]["image"]
    os.symlink(model_dir, tmp_path / "model")
    for name in ("photo.jpg", "a.jpg", "b.jpg"):
        shutil.copyfile(image, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(code: str, namespace: dict) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<docs example>", "exec"), namespace)
    return out.getvalue()


def test_model_directory_plain_onnxruntime_example(workdir):
    """The plain-onnxruntime loop gives the runtime's greedy answer, for both cache layouts."""
    from vledge.decoding import GenerationOptions
    from vledge.runtime import load
    from vledge.runtime.preprocess import ImagePreprocessor

    (code,) = [block for block in python_blocks("model-directory.md") if "onnxruntime" in block]
    assert code.count(PLACEHOLDER) == 1
    runtime = load("model", precision="fp32", providers="cpu", threads=1)
    pixels = ImagePreprocessor(runtime.manifest.preprocess).batch([str(workdir / "photo.jpg")], channel_order="RGB")
    code = code.replace(PLACEHOLDER, "pixel_values = PIXELS")
    printed = _run(code, {"PIXELS": np.ascontiguousarray(pixels, dtype=np.float32)})
    expected = runtime.ask(str(workdir / "photo.jpg"), "What is in this image?", GenerationOptions(max_new_tokens=32))
    assert expected.token_ids and printed.strip() == expected.text


def test_runtime_quick_start_example(workdir):
    import cv2

    (code,) = python_blocks("runtime.md")
    frame = cv2.imread(str(workdir / "photo.jpg"))
    printed = _run(code, {"frame_bgr": frame})
    assert "finish_reason" not in printed and printed.strip()  # it printed answers, not an error
