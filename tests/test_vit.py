"""CLIP / SigLIP vision towers against transformers' own models (tiny, random, saved to disk here)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vledge.config import ViTConfig  # noqa: E402
from vledge.errors import ConfigError, WeightsError  # noqa: E402
from vledge.hf.vision import load_vision_tower, vit_config_from_hf  # noqa: E402
from vledge.models.vit import VisionTransformer, reduce_tokens  # noqa: E402


def _tower(kind: str, path, **extra):
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=8, **extra)
    if kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))
    model.eval().save_pretrained(path)
    return model


def _ours(path, **kwargs) -> VisionTransformer:
    config, state = load_vision_tower(path, **kwargs)
    model = VisionTransformer(config).eval()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("layer", [-2, -1, 1])
@pytest.mark.parametrize("select", ["default", "full"])
def test_hidden_states_match_transformers(tmp_path, kind, layer, select):
    reference = _tower(kind, tmp_path)
    ours = _ours(tmp_path, feature_layers=layer, select=select)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixels, output_hidden_states=True).hidden_states[layer]
        got = ours(pixels)
    if select == "default":
        expected = expected[:, 1:]
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_siglip_post_norm_is_last_hidden_state(tmp_path):
    reference = _tower("siglip", tmp_path)
    ours = _ours(tmp_path, feature_layers=-1, select="full", post_norm=True)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixels).last_hidden_state
        assert torch.allclose(ours(pixels), expected, atol=1e-5)


def test_several_feature_layers_concatenate(tmp_path):
    reference = _tower("clip", tmp_path)
    ours = _ours(tmp_path, feature_layers=[-3, -1], select="default")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        states = reference(pixels, output_hidden_states=True).hidden_states
        expected = torch.cat([states[-3][:, 1:], states[-1][:, 1:]], dim=-1)
        assert torch.allclose(ours(pixels), expected, atol=1e-5)


def test_only_needed_blocks_are_built(tmp_path):
    _tower("clip", tmp_path)
    assert len(_ours(tmp_path, feature_layers=-2).encoder.layers) == 2


def test_token_reduction():
    tokens = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1).repeat(1, 1, 2)  # a 4x4 grid
    pooled = reduce_tokens(tokens, "avg_pool_2x2")
    assert pooled[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    shuffled = reduce_tokens(tokens, "pixel_shuffle_2x2")
    assert shuffled.shape == (1, 4, 8)
    assert shuffled[0, 1, ::2].tolist() == [2.0, 3.0, 6.0, 7.0]  # top-right block, row by row
    config = ViTConfig(hidden=32, layers=2, heads=4, intermediate=64, patch_size=8, image_size=32,
                       reduction="pixel_shuffle_2x2")
    assert (config.num_tokens, config.out_features) == (4, 128)


def test_bad_configs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        vit_config_from_hf({"model_type": "dinov2"})
    with pytest.raises(ConfigError, match="even square grid"):
        ViTConfig(hidden=32, layers=2, heads=4, intermediate=64, patch_size=8, image_size=32, select="full",
                  reduction="avg_pool_2x2")
    with pytest.raises(ConfigError, match="vision_feature_layer 5"):
        vit_config_from_hf({"model_type": "clip_vision_model", "num_hidden_layers": 2}, feature_layers=5)
    with pytest.raises(ConfigError, match="hidden_act"):
        vit_config_from_hf({"model_type": "clip_vision_model", "hidden_act": "relu"})
    (tmp_path / "config.json").write_text('{"model_type": "clip_vision_model", "num_hidden_layers": 2}')
    with pytest.raises(WeightsError, match="safetensors"):
        load_vision_tower(tmp_path)
