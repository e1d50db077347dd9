"""LLaVA folders (CLIP + Llama, SigLIP + Qwen2) made by transformers: conversion, features, prompts, greedy tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_llava_folders import make_llava_folder  # noqa: E402
from PIL import Image  # noqa: E402

from vledge.checkpoint import load_checkpoint  # noqa: E402
from vledge.decoding import GenerationOptions  # noqa: E402
from vledge.errors import ConfigError, VledgeError  # noqa: E402
from vledge.hf.llava import convert_llava, load_llava_folder  # noqa: E402
from vledge.models.generate import generate  # noqa: E402
from vledge.prompt import question_ids  # noqa: E402

# (tower, LM, select strategy, seed): seeds whose random models say 16 varied tokens before any eos
CASES = {"clip-llama": ("clip", "llama", "default", 0), "siglip-qwen2": ("siglip", "qwen2", "full", 2)}
QUESTION = "what colour is the shape"
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=sorted(CASES))
def llava(request, tmp_path_factory):
    """(folder, converted ckpt path, transformers model, processor) for one tower + LM pair."""
    tower, lm, select, seed = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    folder = make_llava_folder(root / "hf", tower=tower, lm=lm, select=select, seed=seed)
    ckpt = convert_llava(folder, root / "ckpt.pt")
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    # The Pillow backend: what vledge's default preprocessing spec reproduces exactly.
    processor = transformers.AutoProcessor.from_pretrained(folder, backend="pil")
    return folder, ckpt, reference, processor


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from skimage import data

    path = tmp_path_factory.mktemp("photo") / "chelsea.png"
    Image.fromarray(data.chelsea()).save(path)
    return path


def hf_features(reference, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = reference.get_image_features(pixel_values=pixel_values,
                                           vision_feature_layer=reference.config.vision_feature_layer,
                                           vision_feature_select_strategy=reference.config.vision_feature_select_strategy)
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.stack(list(features))


def until_eos(tokens: list[int], eos_id: int) -> list[int]:
    """transformers keeps the eos it generated; vledge stops before it."""
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens


def hf_inputs(processor, photo):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    with Image.open(photo) as image:
        return processor(images=image.convert("RGB"), text=text, return_tensors="pt")


def test_image_features_equal_transformers(llava):
    _, ckpt, reference, _ = llava
    model = load_checkpoint(ckpt).build_model()
    pixels = torch.randn(3, 3, 32, 32)
    expected = hf_features(reference, pixels)
    with torch.no_grad():
        got = model.encode_images(pixels)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_prompt_ids_are_the_processors(llava, photo):
    """vledge's one image token per prompt stands for the processor's expanded run of image tokens."""
    _, ckpt, _, processor = llava
    checkpoint = load_checkpoint(ckpt)
    tokenizer, model = checkpoint.tokenizer(), checkpoint.build_model()
    ids = question_ids(tokenizer, checkpoint.model_config.prompt, QUESTION)
    at = ids.index(tokenizer.image_id)
    expanded = ids[:at] + [tokenizer.image_id] * model.num_image_tokens + ids[at + 1:]
    assert hf_inputs(processor, photo)["input_ids"][0].tolist() == expanded


def test_greedy_tokens_equal_transformers_generate(llava, photo):
    _, ckpt, reference, processor = llava
    checkpoint = load_checkpoint(ckpt)
    tokenizer, model = checkpoint.tokenizer(), checkpoint.build_model()
    inputs = hf_inputs(processor, photo)
    with torch.no_grad():
        out = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    ids = question_ids(tokenizer, checkpoint.model_config.prompt, QUESTION)
    got = generate(model, inputs["pixel_values"], [ids], GenerationOptions(max_new_tokens=NEW_TOKENS),
                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)[0]
    assert got == until_eos(expected, tokenizer.eos_id)
    assert len(got) == NEW_TOKENS and len(set(got)) > 3  # 16 varied tokens compared, not an early eos


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, field", [
    ({"image_grid_pinpoints": [[32, 64], [64, 32]]}, "image_grid_pinpoints"),
    ({"architectures": ["LlavaNextForConditionalGeneration"]}, "LlavaNextForConditionalGeneration"),
    ({"vision_config": {"model_type": "dinov2"}}, "vision_config.model_type 'dinov2'"),
    ({"vision_feature_select_strategy": "cls_only"}, "vision_feature_select_strategy"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
    ({"text_config": {"model_type": "gemma"}}, "text_config.model_type"),
])
def test_unsupported_folders_are_one_line_typed_errors(tmp_path, changes, field):
    folder = make_llava_folder(tmp_path / "hf")
    _edit_config(folder, **changes)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("[", r"\[")) as caught:
        load_llava_folder(folder)
    assert "\n" not in str(caught.value)


def test_cli_names_an_anyres_folder_in_one_line(tmp_path):
    from click.testing import CliRunner

    from vledge.cli import main

    folder = make_llava_folder(tmp_path / "hf")
    _edit_config(folder, image_grid_pinpoints=[[32, 64]])
    for command in (["convert", str(folder), "-o", str(tmp_path / "ckpt.pt")],
                    ["export", str(folder), "-o", str(tmp_path / "model")]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1
        last = result.output.strip().splitlines()[-1]  # after the export's progress lines, if any
        assert last.startswith("Error: ConfigError:") and "image_grid_pinpoints" in last
        assert "Traceback" not in result.output
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "model").exists()


def test_image_token_mismatch_is_an_error(tmp_path):
    folder = make_llava_folder(tmp_path / "hf")
    _edit_config(folder, image_token_index=5)
    with pytest.raises(VledgeError, match="image_token_index"):
        load_llava_folder(folder)


@pytest.mark.slow
def test_convert_then_train_init_runs(tmp_path, synth_data):
    from click.testing import CliRunner

    from vledge.cli import main

    folder = make_llava_folder(tmp_path / "hf")
    runner = CliRunner()
    converted = runner.invoke(main, ["convert", str(folder), "-o", str(tmp_path / "ckpt.pt")])
    assert converted.exit_code == 0, converted.output
    again = runner.invoke(main, ["convert", str(folder), "-o", str(tmp_path / "ckpt.pt")])
    assert again.exit_code == 1 and again.output.startswith("Error: OutputError:")
    trained = runner.invoke(main, ["train", "--data", str(synth_data), "--preset", "tiny", "--init",
                                   str(tmp_path / "ckpt.pt"), "--max-steps", "2", "--eval-every", "2",
                                   "--threads", "1", "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    result = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert result.model_config.vision.backbone == "clip" and result.model_config.language.kind == "llama"
    assert result.model_config.preprocess.interpolation == "bicubic_pil"


@pytest.mark.slow
def test_train_with_a_hf_vision_tower(tmp_path, synth_data):
    from click.testing import CliRunner

    from vledge.cli import main

    torch.manual_seed(0)
    tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8))
    tower.save_pretrained(tmp_path / "tower")
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "tower")
    result = CliRunner().invoke(main, [
        "train", "--data", str(synth_data), "--preset", "tiny", "--vision-model", str(tmp_path / "tower"),
        "--vision-token-reduction", "avg_pool_2x2", "--freeze", "vision", "--max-steps", "2", "--eval-every", "2",
        "--threads", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    checkpoint = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    model = checkpoint.build_model()
    assert model.num_image_tokens == 4  # 4x4 SigLIP patches pooled 2x2
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = tower(pixels, output_hidden_states=True).hidden_states[-2]  # "full": every patch token
        pooled = torch.nn.functional.avg_pool2d(expected.transpose(1, 2).reshape(1, 32, 4, 4), 2)
        assert torch.allclose(model.vision(pixels), pooled.flatten(2).transpose(1, 2), atol=1e-5)


LLAVA_HF_TEMPLATE = (  # llava-hf/llava-1.5's own, with transformers' {% generation %} block
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.mark.parametrize("name", ["llava-hf", "llava", "chatml", "chatml-system"])
def test_chat_template_pieces_rebuild_the_rendered_prompt(name):
    from hf_llava_folders import CHATML_IMAGE_TEMPLATE, LLAVA_CHAT_TEMPLATE

    from vledge.hf.llava_prompt import _render, prompt_from_template

    template, eos = {
        "llava-hf": (LLAVA_HF_TEMPLATE, "</s>"), "llava": (LLAVA_CHAT_TEMPLATE, "</s>"),
        "chatml": (CHATML_IMAGE_TEMPLATE, "<|im_end|>"),
        "chatml-system": ("{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}" + CHATML_IMAGE_TEMPLATE, "<|im_end|>"),
    }[name]
    p = prompt_from_template(template, "", eos)

    def message(role, text, image=False):
        return {"role": role, "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}

    opened = _render(template, [message("user", "Q?", image=True)], True, "", eos)
    assert p.system + p.user + "<image>" + p.image_separator + "Q?" + p.assistant == opened
    if eos.startswith("<|"):  # ChatML ends every turn with its end token, as vledge's training does
        full = _render(template, [message("user", "Q?", image=True), message("assistant", "A."),
                                  message("user", "R?"), message("assistant", "B.")], False, "", eos)
        rebuilt = (p.system + p.user + "<image>" + p.image_separator + "Q?" + p.assistant + p.answer_prefix + "A."
                   + eos + p.turn_separator + p.user + "R?" + p.assistant + p.answer_prefix + "B." + eos)
        assert rebuilt == full[:full.rindex(eos) + len(eos)]  # a conversation ends at its last end token
