"""Hostile or garbled Hugging Face folders: one typed error naming the field and the file, before any work."""

from __future__ import annotations

import json
import shutil
import time

import pytest

pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from hf_folders import make_lm_folder  # noqa: E402
from hf_llava_folders import make_llava_folder  # noqa: E402
from vledge.cli import main  # noqa: E402
from vledge.errors import ConfigError, WeightsError  # noqa: E402
from vledge.hf.language_model import load_pretrained_lm  # noqa: E402


@pytest.fixture(scope="module")
def lm_source(tmp_path_factory):
    return make_lm_folder(tmp_path_factory.mktemp("lm") / "llama", "llama", seed=5)


@pytest.fixture(scope="module")
def llava_source(tmp_path_factory):
    return make_llava_folder(tmp_path_factory.mktemp("llava") / "clip-llama", "clip", "llama", seed=6)


_DELETE = object()


def _copy(source, tmp_path, **changes):
    target = tmp_path / source.name
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    for key, value in changes.items():
        if "." in key:
            part, field = key.split(".")
            config[part][field] = value
        elif value is _DELETE:
            config.pop(key)
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target

LM_CASES = {
    "zero heads": ({"num_attention_heads": 0}, "num_attention_heads = 0 is outside"),
    "heads as text": ({"num_attention_heads": "4"}, "num_attention_heads must be an integer, got str"),
    "hidden as a dict": ({"hidden_size": {"x": 1}}, "hidden_size must be an integer, got dict"),
    "a million layers": ({"num_hidden_layers": 1_000_000},
                         "num_hidden_layers = 1000000 is outside"),
    "huge MLP": ({"intermediate_size": 10**9}, "intermediate_size = 1000000000 is outside"),
    # transformers 4.x spells it rope_scaling, 5.x rope_parameters (with rope_theta inside)
    "rope_scaling as text": ({"rope_parameters": _DELETE, "rope_scaling": "linear"},
                             "rope_scaling must be a JSON object, got str"),
    "rope_scaling as a list": ({"rope_parameters": _DELETE, "rope_scaling": [1, 2]},
                               "rope_scaling must be a JSON object, got list"),
    "rope type yarn": ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
                       "rope type 'yarn' is not supported"),
    "linear rope without a factor": ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}},
                                     "needs a positive number factor"),
    "eps zero": ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive finite number"),
    "theta as text": ({"rope_theta": "big"}, "rope_theta must be a number, got str"),
    "tie as a number": ({"tie_word_embeddings": 1}, "tie_word_embeddings must be true or false"),
    "another activation": ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported for llama"),
}


@pytest.mark.parametrize("case", sorted(LM_CASES))
def test_a_garbled_lm_config_is_one_config_error_naming_the_field(case, lm_source, tmp_path):
    changes, message = LM_CASES[case]
    folder = _copy(lm_source, tmp_path, **changes)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=message) as caught:
        load_pretrained_lm(folder)
    assert str(folder / "config.json") in str(caught.value)
    assert time.perf_counter() - started < 30  # refused from the numbers, not after building anything


def test_weights_that_are_not_float_or_not_finite_are_refused(lm_source, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    for name, change in (("int64", lambda t: t.long()), ("nan", lambda t: t.clone().fill_(float("nan")))):
        folder = tmp_path / name
        shutil.copytree(lm_source, folder)
        tensors = load_file(str(folder / "model.safetensors"))
        tensors["model.norm.weight"] = change(tensors["model.norm.weight"])
        save_file(tensors, str(folder / "model.safetensors"))
        expected = "dtype int64" if name == "int64" else "NaN or infinite"
        with pytest.raises(WeightsError, match=f"language.norm.weight.*{expected}|{expected}"):
            load_pretrained_lm(folder)
    assert torch.isnan(load_file(str(tmp_path / "nan" / "model.safetensors"))["model.norm.weight"]).all()


def test_a_stored_head_that_differs_from_tied_embeddings_is_an_error(lm_source, tmp_path):
    folder = _copy(lm_source, tmp_path, tie_word_embeddings=True)
    with pytest.raises(WeightsError, match="lm_head.weight differs from model.embed_tokens.weight although the config ties them"):
        load_pretrained_lm(folder)


LLAVA_CASES = {
    "vision heads zero": ({"vision_config.num_attention_heads": 0}, "num_attention_heads = 0 is outside"),
    "vision image size huge": ({"vision_config.image_size": 10**6}, "image_size = 1000000 is outside"),
    "vision layers as text": ({"vision_config.num_hidden_layers": "2"}, "num_hidden_layers must be an integer"),
    "text layers huge": ({"text_config.num_hidden_layers": 10**6}, "num_hidden_layers = 1000000 is outside"),
    "image token as text": ({"image_token_index": "5"}, "image_token_index must be a non-negative integer"),
    "text model unknown": ({"text_config.model_type": "gpt_neox"}, "text_config.model_type 'gpt_neox' is not supported"),
}


@pytest.mark.parametrize("case", sorted(LLAVA_CASES))
def test_vledge_convert_refuses_a_garbled_llava_config_in_one_line(case, llava_source, tmp_path):
    changes, message = LLAVA_CASES[case]
    folder = _copy(llava_source, tmp_path, **changes)
    out = tmp_path / "ckpt.pt"
    result = CliRunner().invoke(main, ["convert", str(folder), "-o", str(out)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ConfigError:") and message in lines[0], result.output
    assert not out.exists()


def test_vledge_convert_refuses_nan_weights_and_writes_nothing(llava_source, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(llava_source, folder)
    files = sorted(folder.glob("*.safetensors"))
    tensors = load_file(str(files[0]))
    name = next(n for n in tensors if n.endswith("linear_1.weight"))
    tensors[name] = tensors[name].clone().fill_(float("inf"))
    save_file(tensors, str(files[0]))
    out = tmp_path / "ckpt.pt"
    result = CliRunner().invoke(main, ["convert", str(folder), "-o", str(out)])
    assert result.exit_code == 1 and "Error: WeightsError:" in result.output and "NaN or infinite" in result.output
    assert not out.exists()


def test_a_model_too_big_for_memory_is_refused_before_anything_is_read(monkeypatch):
    from vledge.config import preset
    from vledge.families import size

    config, _ = preset("small")
    with pytest.raises(ConfigError, match="more than the 0.0 GiB of memory available"):
        size.check_fits_memory(size.model_parameters(config), "here", available=1024)
    size.check_fits_memory(size.model_parameters(config), "here", available=2**40)  # fits: no error
