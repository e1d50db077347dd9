"""A pretrained Llama-family LM through `vledge train`, `vledge export` and the torch-free runtime."""

from __future__ import annotations

import collections

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_configs
from hf_folders import make_lm_folder
from vledge.checkpoint import load_checkpoint
from vledge.cli import main

TEXT = "the green triangle is left of the yellow star"


@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return {"llama": make_lm_folder(root / "llama", "llama", tied=False, seed=3),
            "qwen2": make_lm_folder(root / "qwen2", "qwen2", tied=True, chat=True, seed=4, extra_rows=5)}


def _reference_last_logits(folder, ids):
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return reference(input_ids=torch.tensor([ids])).logits[0, -1].numpy()


def _exported_last_logits(model_dir, ids):
    import onnxruntime as ort

    manifest = json.loads((model_dir / "vledge.json").read_text())
    arch = manifest["architecture"]
    embed = ort.InferenceSession(str(model_dir / "onnx" / "embed_tokens.onnx"), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(model_dir / "onnx" / "decoder_model_merged.onnx"),
                                   providers=["CPUExecutionProvider"])
    input_ids = np.array([ids], dtype=np.int64)
    (embeds,) = embed.run(None, {"input_ids": input_ids})
    feeds = {"inputs_embeds": embeds, "attention_mask": np.ones_like(input_ids),
             "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
    for layer in range(arch["layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = np.zeros((1, arch["kv_heads"], 0, arch["head_dim"]), np.float32)
    outputs = decoder.run(None, feeds)
    assert outputs[1].shape == (1, arch["kv_heads"], len(ids), arch["head_dim"])  # present.0.key
    return outputs[0][0, -1]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_train_export_and_caption_match_transformers(family, lm_folders, synth_data, tmp_path):
    folder = lm_folders[family]
    run, model_dir = tmp_path / "R", tmp_path / "M"
    result = CliRunner().invoke(main, ["train", "--data", str(synth_data), "--preset", "tiny", "--language-model",
                                       str(folder), "--freeze", "language", "--max-steps", "20", "--out", str(run)])
    assert result.exit_code == 0, result.output
    checkpoint = load_checkpoint(run / "ckpt.pt")
    source = checkpoint.model_config.language.source
    assert source["architecture"] == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    assert set(source["files"]) == {"model.safetensors"} and len(source["files"]["model.safetensors"]) == 64
    result = CliRunner().invoke(main, ["export", str(run / "ckpt.pt"), "-o", str(model_dir)])
    assert result.exit_code == 0, result.output

    tokenizer = checkpoint.tokenizer()
    ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(TEXT)
    expected = _reference_last_logits(folder, ids)
    exported = _exported_last_logits(model_dir, ids)
    vocab = expected.shape[0]
    assert np.abs(exported[:vocab] - expected).max() < 1e-3

    image = synth_data / json.loads((synth_data / "test.json").read_text())[0]["image"]
    code = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
            "from vledge.cli import main\n"
            f"main(['caption', '--model', {str(model_dir)!r}, {str(image)!r}, '--max-new-tokens', '4'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(image)), done.stdout
    _check_grouped_query_attention_batches(model_dir, synth_data)


def _check_grouped_query_attention_batches(model_dir, synth_data):
    """The decoder's attention is GroupQueryAttention, whose kernel cannot extend a cached prefix for several rows:
    the manifest says so, and a batch of prompts of different lengths answers as each prompt alone (whose prefill
    reuses the prefix cache)."""
    import onnx

    from vledge.decoding import GenerationOptions
    from vledge.runtime import load

    ops = collections.Counter(n.op_type for n in onnx.load(str(model_dir / "onnx" / "decoder_model_merged.onnx")).graph.node)
    manifest = json.loads((model_dir / "vledge.json").read_text())
    assert ops["GroupQueryAttention"] == manifest["architecture"]["layers"] and ops["Softmax"] == 0
    assert manifest["generation"]["cache_extend_rows"] == 1
    runtime = load(model_dir, precision="fp32", threads=1)
    images = [synth_data / r["image"] for r in json.loads((synth_data / "test.json").read_text())[:2]]
    prompts = ["what colour is the shape", "how many shapes are there in this picture"]
    options = GenerationOptions(max_new_tokens=6)
    together = runtime.generate(images, prompts, options)
    alone = [runtime.generate([image], [prompt], options)[0] for image, prompt in zip(images, prompts)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def _language_weights(state):
    return {k: v for k, v in state.items() if k.startswith(("language.", "embed_tokens."))}


@pytest.mark.slow
def test_align_freezes_the_lm_and_lora_is_merged_into_the_checkpoint(lm_folders, synth_data, tmp_path):
    from vledge.hf.language_model import load_pretrained_lm
    from vledge.training.trainer import RunOptions, train

    source = _language_weights(load_pretrained_lm(lm_folders["llama"]).state_dict)
    model_config, train_config = tiny_configs(max_steps=4, eval_every=4, eval_samples=0, batch_size=4)
    aligned = train(synth_data, tmp_path / "align", model_config, train_config,
                    RunOptions(stage="align", language_model=lm_folders["llama"]))
    state = load_checkpoint(aligned.best_checkpoint).state_dict
    assert all(torch.equal(state[k], v) for k, v in source.items())  # align keeps the LM fixed

    tuned = train(synth_data, tmp_path / "lora", model_config, train_config,
                  RunOptions(stage="instruct", init=aligned.best_checkpoint, lora_rank=4, lora_alpha=8.0,
                             lora_dropout=0.0))
    checkpoint = load_checkpoint(tuned.best_checkpoint)
    assert not [k for k in checkpoint.state_dict if "lora" in k]  # adapters merged: a plain model
    merged = checkpoint.state_dict
    changed = [k for k in source if not torch.equal(merged[k], source[k])]
    assert changed and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj") for k in changed)  # only the adapted layers moved
    assert torch.equal(merged["embed_tokens.weight"], source["embed_tokens.weight"])
    model = checkpoint.build_model()  # loads with no adapter code at all
    assert model.language.layers[0].self_attn.q_proj.__class__ is torch.nn.Linear


@pytest.mark.slow
def test_an_interrupted_lora_run_resumes_its_adapters(lm_folders, synth_data, tmp_path):
    from vledge.training.trainer import RunOptions, train

    model_config, train_config = tiny_configs(max_steps=6, eval_every=100, eval_samples=0, log_every=1, batch_size=4)
    options = RunOptions(stage="instruct", language_model=lm_folders["qwen2"], lora_rank=4, lora_dropout=0.0)
    straight = train(synth_data, tmp_path / "straight", model_config, train_config, options)

    def interrupt(event):
        if event.kind == "step" and event.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(synth_data, tmp_path / "broken", model_config, train_config, options, on_event=interrupt)
    assert load_checkpoint(tmp_path / "broken" / "last.pt").train_state["lora_adapters"]
    resumed = train(synth_data, tmp_path / "broken", model_config, train_config, resume=True)
    assert resumed.steps == straight.steps == 6

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [row["loss"] for row in map(json.loads, lines) if row.get("kind") == "train"]

    assert losses(tmp_path / "broken") == pytest.approx(losses(tmp_path / "straight"), rel=1e-4)
