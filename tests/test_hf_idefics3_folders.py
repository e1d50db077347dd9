"""The Idefics3 / SmolVLM test folders build, reload in transformers, and give usable references."""

from __future__ import annotations

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")

import hf_idefics3_folders as fx  # noqa: E402

RNG = np.random.default_rng(0)
WIDE = RNG.integers(0, 256, (40, 70, 3), dtype=np.uint8)  # 2 x 2 tiles + global when split
TALL = RNG.integers(0, 256, (70, 20, 3), dtype=np.uint8)  # 2 x 1 tiles + global when split
QUESTION = "What is this?"


@pytest.fixture(scope="module", params=[(kind, split) for kind in fx.KINDS for split in (True, False)],
                ids=lambda p: f"{p[0]}-{'split' if p[1] else 'whole'}")
def folder(request, tmp_path_factory):
    kind, split = request.param
    return fx.make_idefics3_folder(tmp_path_factory.mktemp(f"{kind}-{split}"), kind=kind, split=split)


def test_folder_reloads_with_the_auto_classes(folder):
    config = json.loads((folder / "config.json").read_text())
    kind = config["model_type"]
    processor = transformers.AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == ("Idefics3Processor" if kind == "idefics3" else "SmolVLMProcessor")
    assert processor.image_seq_len == fx.IMAGE_SEQ_LEN == 4
    assert processor.image_processor.max_image_size == {"longest_edge": fx.TILE}
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == config["architectures"][0]
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    names = fx.tensor_names(folder)
    assert "model.connector.modality_projection.proj.weight" in names and "lm_head.weight" in names
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    assert preprocessor["resample"] == 1 and preprocessor["size"] == {"longest_edge": 64}
    expected = "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:"
    assert fx.render_prompt(folder, 1, QUESTION) == expected


def _check_generation(folder, images):
    ref = fx.reference_generate(folder, images, QUESTION)
    generated = ref["generated"]
    assert generated.shape == (16,) and len(set(generated.tolist())) >= 3  # greedy, yet not one token repeated
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    expected = ref["text"]
    for rows, cols in zip(ref["rows"], ref["cols"]):
        expected = expected.replace("<image>", "\0" + fx.expanded_image_prompt(rows, cols).replace("<image>", "\1"), 1)
    expected = expected.replace("\0", "").replace("\1", "<image>")
    assert tokenizer.decode(ref["input_ids"]) == expected
    tiles = sum(r * c + 1 for r, c in zip(ref["rows"], ref["cols"]))
    assert ref["pixel_values"].shape == (tiles, 3, fx.TILE, fx.TILE)
    assert (ref["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum() == tiles * fx.IMAGE_SEQ_LEN
    assert ref["pixel_attention_mask"].shape == (tiles, fx.TILE, fx.TILE) and ref["pixel_attention_mask"].all()
    features = fx.reference_image_features(folder, ref["pixel_values"], ref["pixel_attention_mask"])
    assert features.shape == (tiles, fx.IMAGE_SEQ_LEN, fx.TEXT_HIDDEN) and np.isfinite(features).all()
    return ref


def test_one_image(folder):
    ref = _check_generation(folder, [WIDE])
    split = json.loads((folder / "preprocessor_config.json").read_text())["do_image_splitting"]
    assert (ref["rows"], ref["cols"]) == (([2], [2]) if split else ([0], [0]))


def test_two_images_in_one_prompt(folder):
    ref = _check_generation(folder, [WIDE, TALL])
    assert ref["text"] == "<|im_start|>User:<image><image>What is this?<end_of_utterance>\nAssistant:"
    split = json.loads((folder / "preprocessor_config.json").read_text())["do_image_splitting"]
    assert (ref["rows"], ref["cols"]) == (([2, 2], [2, 1]) if split else ([0, 0], [0, 0]))


def test_both_kinds_hold_the_same_weights(tmp_path):
    from safetensors.numpy import load_file

    a, b = (load_file(fx.make_idefics3_folder(tmp_path / kind, kind=kind, split=True) / "model.safetensors")
            for kind in fx.KINDS)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_image_features_drop_all_zero_tiles(tmp_path):
    folder = fx.make_idefics3_folder(tmp_path / "f", kind="smolvlm", split=False)
    pixels = fx.reference_generate(folder, [WIDE], QUESTION, max_new_tokens=1)["pixel_values"]
    one = fx.reference_image_features(folder, pixels)
    with pytest.raises(ValueError):  # the zero tile gets no features, so [2 tiles, 4, 64] cannot be formed
        fx.reference_image_features(folder, np.concatenate([pixels, np.zeros_like(pixels)]))
    both = fx.reference_image_features(folder, np.concatenate([pixels, pixels]))
    np.testing.assert_allclose(both[1], one[0], rtol=1e-5, atol=1e-5)


def test_layouts_give_the_same_processor(tmp_path):
    hub = fx.make_idefics3_folder(tmp_path / "hub", kind="smolvlm", split=True)
    nested = fx.make_idefics3_folder(tmp_path / "nested", kind="smolvlm", split=True, layout="nested")
    assert not (nested / "preprocessor_config.json").exists()
    assert set(json.loads((hub / "processor_config.json").read_text())) == {"image_seq_len", "processor_class"}
    a, b = (fx.reference_generate(f, [WIDE], QUESTION, max_new_tokens=4) for f in (hub, nested))
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    np.testing.assert_array_equal(a["generated"], b["generated"])


def test_template_matches_transformers_default():
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE
    from jinja2 import Template

    for n in (1, 2):
        messages = fx.messages_for(n, QUESTION)
        assert (Template(fx.SMOLVLM_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
                == Template(DEFAULT_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True))
