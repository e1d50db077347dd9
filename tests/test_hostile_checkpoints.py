"""Hostile checkpoints: an unsafe torch, bad configs, bad weights; one typed error naming the file."""

from __future__ import annotations

import math

import pytest
import torch

from vledge.checkpoint import load_checkpoint
from vledge.errors import CheckpointError


def _tampered(tmp_path, tiny_run, name, change):
    raw = torch.load(tiny_run.best_checkpoint, weights_only=True)
    change(raw)
    path = tmp_path / f"{name}.pt"
    torch.save(raw, path)
    return path


def test_a_torch_with_a_weights_only_bypass_is_refused(monkeypatch, tiny_run):
    for version in ("2.5.1", "2.4.0+cu121", "1.13.1"):
        monkeypatch.setattr(torch, "__version__", version)
        with pytest.raises(CheckpointError, match=r"torch 2\.6"):
            load_checkpoint(tiny_run.best_checkpoint)
    for version in ("2.6.0", "2.10.0.dev20250101+cpu", "3.0.0"):
        monkeypatch.setattr(torch, "__version__", version)
        assert load_checkpoint(tiny_run.best_checkpoint).state_dict


def _set_language(key, value):
    def change(raw):
        raw["model_config"]["language"][key] = value
    return change


def _set_vision(key, value):
    def change(raw):
        raw["model_config"]["vision"][key] = value
    return change


def _set_weight(make):
    def change(raw):
        name = next(k for k, v in raw["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
        raw["state_dict"][name] = make(raw["state_dict"][name])
    return change


def _nan(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[0] = math.nan
    return tensor


def _inf(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[-1] = -math.inf
    return tensor


HOSTILE = {
    "heads_zero": _set_language("heads", 0),
    "hidden_negative": _set_language("hidden", -32),
    "layers_negative": _set_language("layers", -1),
    "layers_string": _set_language("layers", "2"),
    "heads_float": _set_language("heads", 2.5),
    "heads_bool": _set_language("heads", True),
    "max_positions_zero": _set_language("max_positions", 0),
    "dropout_nan": _set_language("dropout", math.nan),
    "vocab_negative": _set_language("vocab_size", -5),
    "widths_negative": _set_vision("widths", [8, -16]),
    "token_grid_zero": _set_vision("token_grid", [0, 4]),
    "image_size_string": lambda raw: raw["model_config"]["preprocess"].__setitem__("image_size", "32"),
    "std_zero": lambda raw: raw["model_config"]["preprocess"].__setitem__("std", [0.0, 0.5, 0.5]),
    "config_a_list": lambda raw: raw.__setitem__("model_config", [1, 2]),
    "state_dict_a_list": lambda raw: raw.__setitem__("state_dict", list(raw["state_dict"].values())),
    "state_dict_non_tensor": lambda raw: raw["state_dict"].__setitem__(next(iter(raw["state_dict"])), [1.0]),
    "tokenizer_not_text": lambda raw: raw.__setitem__("tokenizer_json", 12),
    "weights_int64": _set_weight(lambda t: t.to(torch.int64)),
    "weights_bool": _set_weight(lambda t: t > 0),
    "weights_complex": _set_weight(lambda t: t.to(torch.complex64)),
    "weights_float64": _set_weight(lambda t: t.to(torch.float64)),
    "weights_nan": _set_weight(_nan),
    "weights_inf": _set_weight(_inf),
    "weights_wrong_shape": _set_weight(lambda t: t.reshape(-1)[:-1].clone()),
    "weights_missing": lambda raw: raw["state_dict"].pop(next(iter(raw["state_dict"]))),
    "weights_sparse": _set_weight(lambda t: t.reshape(t.shape[0], -1).to_sparse()),
    "weights_meta": _set_weight(lambda t: torch.empty(t.shape, device="meta")),
    "special_token_a_number": lambda raw: raw["model_config"].__setitem__("special_tokens", {"image": 5}),
    "special_tokens_a_list": lambda raw: raw["model_config"].__setitem__("special_tokens", ["<image>"]),
    "tokenizer_garbage": lambda raw: raw.__setitem__("tokenizer_json", '{"model": {"type": "nothing"}}'),
    "tokenizer_not_json": lambda raw: raw.__setitem__("tokenizer_json", "{not json"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_checkpoint_is_one_typed_error_naming_it(tmp_path, tiny_run, name):
    path = _tampered(tmp_path, tiny_run, name, HOSTILE[name])
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value)


def test_vision_weights_files_are_refused_under_an_unsafe_torch_too(monkeypatch, tmp_path):
    from vledge.config import preset
    from vledge.models.vision import VisionEncoder, load_vision_weights
    from vledge.training.vision_pretrain import load_projector_weights

    model_config, _ = preset("tiny")
    encoder = VisionEncoder(model_config.vision)
    weights = tmp_path / "vision.pt"
    torch.save({"state_dict": encoder.backbone.state_dict()}, weights)
    load_vision_weights(encoder, weights)  # fine under this torch
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(CheckpointError, match=r"torch 2\.6"):
        load_vision_weights(encoder, weights)
    with pytest.raises(CheckpointError, match=r"torch 2\.6"):
        load_projector_weights(torch.nn.Linear(2, 2), weights)
