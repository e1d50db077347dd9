"""A Llama-family folder vledge would run differently from transformers is refused with a clear message."""

from __future__ import annotations

import json

import pytest

from hf_folders import make_lm_folder
from vledge.errors import ConfigError, WeightsError
from vledge.hf.language_model import load_pretrained_lm


def _edit_config(folder, drop=(), **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    for key in drop:
        config.pop(key, None)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_an_unsupported_rope_type_is_named(tmp_path, key):
    folder = make_lm_folder(tmp_path / "lm", "llama")
    if key == "rope_parameters":  # transformers 5
        _edit_config(folder, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    else:  # transformers 4.x
        _edit_config(folder, drop=["rope_parameters"], rope_theta=10000.0,
                     rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError) as caught:
        load_pretrained_lm(folder)
    assert str(caught.value) == (f"{folder}/config.json: rope type 'yarn' is not supported "
                                 "(vledge implements default, linear, llama3)")


def _add_head(folder, head) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors["lm_head.weight"] = head(tensors["model.embed_tokens.weight"])
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_a_stored_head_that_differs_from_tied_embeddings_is_an_error(tmp_path):
    folder = make_lm_folder(tmp_path / "lm", "llama", tied=True)
    _add_head(folder, lambda embeddings: embeddings + 0.01)
    with pytest.raises(WeightsError, match=f"{folder}: lm_head.weight differs from model.embed_tokens.weight"):
        load_pretrained_lm(folder)


def test_a_stored_copy_of_tied_embeddings_loads(tmp_path):
    folder = make_lm_folder(tmp_path / "lm", "llama", tied=True)
    _add_head(folder, lambda embeddings: embeddings.clone())
    lm = load_pretrained_lm(folder)
    assert lm.state_dict["language.lm_head.weight"] is lm.state_dict["embed_tokens.weight"]


def test_a_template_that_opens_with_the_bos_token_keeps_it_out_of_system(tmp_path):
    """SmolLM2's bos is <|im_start|>: it is prefix_ids' first id, once, and not part of prompt.system."""
    from vledge.prompt import prefix_ids

    folder = make_lm_folder(tmp_path / "lm", "llama", chat=True)
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "bos_token": "<|im_start|>"}))
    lm = load_pretrained_lm(folder)
    assert lm.prompt.system == "system\nYou are a helpful assistant.<|im_end|>\n"
    start = lm.tokenizer.encode("<|im_start|>")
    assert prefix_ids(lm.tokenizer, lm.prompt) == start + lm.tokenizer.encode(lm.prompt.system + lm.prompt.user)
