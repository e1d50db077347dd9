"""`vledge export HF_DIR` on tiny random LLaVA folders: the graphs and the runtime against transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_llava import CASES, NEW_TOKENS, QUESTION, hf_features, hf_inputs, llava, photo, until_eos  # noqa: E402,F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(llava, tmp_path_factory):
    """The folder exported by the CLI (fp32, and the int8 vision encoder measured), with its reference."""
    from click.testing import CliRunner

    from vledge.cli import main

    folder = llava[0]
    out = tmp_path_factory.mktemp("export") / "model"
    result = CliRunner().invoke(main, ["export", str(folder), "-o", str(out), "--quantize", "int8",
                                       "--parity-samples", "8"])
    assert result.exit_code == 0, result.output
    return out, llava


def test_export_passes_the_parity_gate_with_the_vit_int8_measured(exported):
    out, _ = exported
    manifest = json.loads((out / "vledge.json").read_text())
    variants = manifest["parity"]["variants"]
    assert variants["fp32"]["image_embeds"]["within_fp32_tolerance"]
    assert "int8" in manifest["variants"]["vision_encoder"]
    assert "vision_encoder:int8" in variants  # its drift is measured, not assumed
    assert manifest["model_config"]["vision"]["backbone"] in ("clip", "siglip")


def test_vision_encoder_onnx_matches_get_image_features(exported, photo):
    import onnxruntime as ort

    out, (_, _, reference, processor) = exported
    pixel_values = hf_inputs(processor, photo)["pixel_values"]
    session = ort.InferenceSession(str(out / "onnx" / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixel_values": pixel_values.numpy()})[0]
    expected = hf_features(reference, pixel_values).numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4


def test_plain_onnxruntime_greedy_equals_transformers_generate(exported, photo):
    """The graphs fed as docs/model-directory.md says, on the processor's own ids (image token expanded)."""
    import onnxruntime as ort

    out, (_, _, reference, processor) = exported
    manifest = json.loads((out / "vledge.json").read_text())
    arch, image_id = manifest["architecture"], manifest["special_tokens"]["image"]
    sessions = {name: ort.InferenceSession(str(out / "onnx" / f"{name}.onnx"), providers=["CPUExecutionProvider"])
                for name in ("vision_encoder", "embed_tokens", "decoder_model_merged")}
    inputs = hf_inputs(processor, photo)
    ids = inputs["input_ids"][0].tolist()
    image_embeds = sessions["vision_encoder"].run(None, {"pixel_values": inputs["pixel_values"].numpy()})[0]
    x = sessions["embed_tokens"].run(None, {"input_ids": np.array([ids], np.int64)})[0]
    at = [i for i, token in enumerate(ids) if token == image_id]
    assert len(at) == image_embeds.shape[1]
    x[0, at] = image_embeds[0]
    heads = arch.get("kv_heads", arch["heads"])
    past = {f"past_key_values.{i}.{kind}": np.zeros((1, heads, 0, arch["head_dim"]), np.float32)
            for i in range(arch["layers"]) for kind in ("key", "value")}
    length, tokens = x.shape[1], []
    while len(tokens) < NEW_TOKENS:
        seen = length + len(tokens)
        feed = {"inputs_embeds": x, "attention_mask": np.ones((1, seen), np.int64),
                "position_ids": np.arange(seen - x.shape[1], seen, dtype=np.int64)[None], **past}
        logits, *presents = sessions["decoder_model_merged"].run(None, feed)
        token = int(logits[0, -1].argmax())
        if token == manifest["special_tokens"]["eos"]:
            break
        tokens.append(token)
        past = {name: value for name, value in zip(past, presents)}
        x = sessions["embed_tokens"].run(None, {"input_ids": np.array([[token]], np.int64)})[0]
    with torch.no_grad():
        expected = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = until_eos(expected[0, inputs["input_ids"].shape[1]:].tolist(), manifest["special_tokens"]["eos"])
    assert tokens == expected and len(tokens) == NEW_TOKENS


def test_runtime_answers_with_transformers_tokens(exported, photo):
    from vledge.decoding import GenerationOptions
    from vledge.runtime import load

    out, (_, _, reference, processor) = exported
    runtime = load(out, precision="fp32", providers="cpu", threads=1)
    answer = runtime.ask(str(photo), QUESTION, GenerationOptions(max_new_tokens=NEW_TOKENS))
    inputs = hf_inputs(processor, photo)
    with torch.no_grad():
        expected = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    eos = runtime.tokenizer.eos_id
    assert answer.token_ids == until_eos(expected[0, inputs["input_ids"].shape[1]:].tolist(), eos)
    assert len(answer.token_ids) == NEW_TOKENS
