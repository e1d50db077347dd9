"""CLIP / SigLIP vision towers from Hugging Face configs and tensors.

A saved Hugging Face config keeps only the values that differ from its class defaults, so the
defaults of ``CLIPVisionConfig`` and ``SiglipVisionConfig`` are spelled out here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from vledge.config import ViTConfig
from vledge.errors import ConfigError, WeightsError

# model_type -> (family, HF defaults of the fields vledge reads)
_TOWERS = {
    "clip_vision_model": ("clip", {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                   "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
                                   "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3}),
    "siglip_vision_model": ("siglip", {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                       "num_attention_heads": 12, "image_size": 224, "patch_size": 16,
                                       "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                                       "num_channels": 3}),
}
# A whole CLIP / SigLIP model's config holds its tower under "vision_config".
_PARENTS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


def vit_config_from_hf(vision_config: Mapping, feature_layers: int | list[int] | tuple[int, ...] = -2,
                       select: str = "default", where: str = "vision_config", **options) -> ViTConfig:
    """An HF vision config (``CLIPVisionConfig`` / ``SiglipVisionConfig`` as a dict) -> ViTConfig."""
    model_type = vision_config.get("model_type")
    if model_type not in _TOWERS:
        raise ConfigError(f"{where}.model_type {model_type!r} is not a supported vision tower; "
                          f"supported: {sorted(_TOWERS)}")
    family, defaults = _TOWERS[model_type]
    values = {key: vision_config.get(key, default) for key, default in defaults.items()}
    if values["num_channels"] != 3:
        raise ConfigError(f"{where}.num_channels is {values['num_channels']}; only RGB (3) towers are supported")
    if isinstance(feature_layers, bool) or not isinstance(feature_layers, (int, list, tuple)):
        raise ConfigError(f"vision_feature_layer must be an integer or a list of integers, got {feature_layers!r}")
    layers = (feature_layers,) if isinstance(feature_layers, int) else tuple(feature_layers)
    if not all(isinstance(layer, int) and not isinstance(layer, bool) for layer in layers):
        raise ConfigError(f"vision_feature_layer must be an integer or a list of integers, got {feature_layers!r}")
    return ViTConfig(
        family=family, hidden=int(values["hidden_size"]), layers=int(values["num_hidden_layers"]),
        heads=int(values["num_attention_heads"]), intermediate=int(values["intermediate_size"]),
        patch_size=int(values["patch_size"]), image_size=int(values["image_size"]),
        layer_norm_eps=float(values["layer_norm_eps"]), hidden_act=str(values["hidden_act"]),
        feature_layers=layers, select=select, **options,
    )


def vit_state_from_hf(tensors: Mapping[str, torch.Tensor], prefix: str, model: torch.nn.Module,
                      source: str) -> dict[str, torch.Tensor]:
    """The tower's tensors under ``prefix`` (e.g. ``vision_tower.vision_model.``) in the module's own names.

    Blocks the model does not build (after the last feature layer) and the pooling head are skipped;
    a tensor the model needs and the folder lacks, or of another shape, is a WeightsError.
    """
    state = {}
    for name, expected in model.state_dict().items():
        tensor = tensors.get(prefix + name)
        if tensor is None:
            raise WeightsError(f"{source}: the vision tower has no tensor {prefix + name}")
        if tuple(tensor.shape) != tuple(expected.shape):
            raise WeightsError(f"{source}: {prefix + name} has shape {tuple(tensor.shape)}, the config implies "
                               f"{tuple(expected.shape)}")
        state[name] = tensor.to(expected.dtype)
    return state


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} is not a JSON object")
    return data


def tower_config_of(config: Mapping, where: str) -> Mapping:
    """The vision tower's own config inside a CLIPVisionModel / SiglipVisionModel / CLIPModel config.json."""
    model_type = config.get("model_type")
    if model_type in _PARENTS and isinstance(config.get("vision_config"), Mapping):
        return {"model_type": _PARENTS[model_type], **config["vision_config"]}
    return config


def load_vision_tower(folder: str | Path, feature_layers: int | list[int] = -2, select: str = "default",
                      **options) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """A local ``CLIPVisionModel`` / ``SiglipVisionModel`` folder -> (ViTConfig, state dict for VisionTransformer)."""
    from vledge.models.hf_folder import local_folder, read_safetensors, weight_files
    from vledge.models.vit import VisionTransformer

    folder = local_folder(folder, "vision tower")
    config = vit_config_from_hf(tower_config_of(read_json(folder / "config.json", "vision tower config"),
                                                str(folder / "config.json")),
                                feature_layers, select, where=str(folder / "config.json"), **options)
    tensors = read_safetensors(weight_files(folder))
    prefix = next((p for p in ("vision_model.", "model.vision_model.", "") if any(k.startswith(p + "embeddings.")
                                                                                for k in tensors)), None)
    if prefix is None:
        raise WeightsError(f"{folder}: no vision tower tensors (embeddings.*) in its safetensors files")
    with torch.device("meta"):
        skeleton = VisionTransformer(config)
    return config, vit_state_from_hf(tensors, prefix, skeleton, str(folder))


def tower_model_config(folder: str | Path, feature_layers: int | list[int] = -2, select: str | None = None,
                       reduction: str | None = None):
    """(VisionConfig, PreprocessSpec) for training a fusion model on a local CLIP / SigLIP tower folder.

    ``select`` defaults to "default" (drop the class token) for CLIP and "full" for SigLIP, which has
    none; the preprocessing comes from the folder's preprocessor_config.json, else the family's defaults.
    """
    from vledge.config import VisionConfig
    from vledge.hf.image_processor import preprocess_spec_from_hf

    folder = Path(folder)
    tower = tower_config_of(read_json(folder / "config.json", "vision tower config"), str(folder / "config.json"))
    family = _TOWERS.get(tower.get("model_type"), ("clip", {}))[0]
    vit = vit_config_from_hf(tower, feature_layers, select or ("default" if family == "clip" else "full"),
                             where=str(folder / "config.json"), reduction=reduction)
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        spec = preprocess_spec_from_hf(read_json(processor, "image processor config"), str(processor))
    else:
        size = vit.image_size
        spec = preprocess_spec_from_hf({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size},
                                        "crop_size": {"height": size, "width": size}} if family == "clip" else
                                       {"image_processor_type": "SiglipImageProcessor",
                                        "size": {"height": size, "width": size}})
    if spec.image_size != vit.image_size:
        raise ConfigError(f"{processor}: the processor makes {spec.image_size} px images, the tower reads "
                          f"{vit.image_size} px")
    return VisionConfig(backbone=vit.family, vit=vit), spec


def load_tower_weights(backbone: torch.nn.Module, folder: str | Path) -> None:
    """A tower folder's weights into a VisionTransformer built from the same folder's config."""
    config = backbone.config
    loaded, state = load_vision_tower(folder, list(config.feature_layers), config.select,
                                      reduction=config.reduction, post_norm=config.post_norm)
    if loaded != config:
        raise WeightsError(f"the vision tower in {folder} is not the one this model was configured with")
    backbone.load_state_dict(state)
