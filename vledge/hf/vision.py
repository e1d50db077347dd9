"""Vision towers from Hugging Face folders: config and tensors, by the tower's family (vledge.families).

A saved Hugging Face config keeps only the values that differ from its class defaults; each family spells out
its class's defaults, tensor prefixes and image processor.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from vledge.config import ViTConfig
from vledge.errors import ConfigError, WeightsError
from vledge.families import vision_families, vision_family, vision_family_for_hf
from vledge.reads import read_json as read_capped_json

def vit_config_from_hf(vision_config: Mapping, feature_layers: int | list[int] | tuple[int, ...] = -2,
                       select: str = "default", where: str = "vision_config", **options) -> ViTConfig:
    """An HF vision config (``CLIPVisionConfig`` / ``SiglipVisionConfig`` as a dict) -> ViTConfig, by its family."""
    if not isinstance(vision_config, Mapping):
        raise ConfigError(f"{where} must be a JSON object, got {type(vision_config).__name__}")
    family = vision_family_for_hf(vision_config.get("model_type"), where)
    if family.config_field != "vit":
        raise ConfigError(f"{where}.model_type {vision_config.get('model_type')!r} is not a vision transformer")
    return family.from_hf_config(vision_config, feature_layers, select, where, **options)


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


def fusion_tower_state(tensors: Mapping[str, torch.Tensor], prefix: str, vit: ViTConfig,
                       source: str) -> dict[str, torch.Tensor]:
    """A whole vision-language folder's tower tensors (under ``prefix``) in the fusion model's names
    (``vision.backbone.*``), checked against the tower ``vit`` describes (built on the meta device)."""
    from vledge.models.vit import VisionTransformer

    with torch.device("meta"):
        skeleton = VisionTransformer(vit)
    return {f"vision.backbone.{name}": tensor
            for name, tensor in vit_state_from_hf(tensors, prefix, skeleton, source).items()}


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a capped regular file (vledge.reads); anything else is one ConfigError naming it."""
    if not path.exists():
        raise ConfigError(f"{what} {path} not found")
    data = read_capped_json(path, error=ConfigError, what=what)
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} is not a JSON object")
    return data


def tower_config_of(config: Mapping, where: str) -> Mapping:
    """The vision tower's own config inside a CLIPVisionModel / SiglipVisionModel / CLIPModel config.json."""
    model_type = config.get("model_type")
    for family in vision_families():
        if model_type in family.hf_parent_model_types and isinstance(config.get("vision_config"), Mapping):
            return {"model_type": family.hf_model_types[0], **config["vision_config"]}
    return config


def load_vision_tower(folder: str | Path, feature_layers: int | list[int] = -2, select: str = "default",
                      **options) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """A local ``CLIPVisionModel`` / ``SiglipVisionModel`` folder -> (ViTConfig, state dict for VisionTransformer)."""
    from vledge.hf.language_model import local_folder, read_safetensors, weight_files
    from vledge.models.vit import VisionTransformer

    folder = local_folder(folder, "vision tower")
    config = vit_config_from_hf(tower_config_of(read_json(folder / "config.json", "vision tower config"),
                                                str(folder / "config.json")),
                                feature_layers, select, where=str(folder / "config.json"), **options)
    tensors = read_safetensors(weight_files(folder))
    prefixes = vision_family(config.family).hf_tensor_prefixes
    prefix = next((p for p in prefixes if any(k.startswith(p + "embeddings.") for k in tensors)), None)
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
    where = str(folder / "config.json")
    tower = tower_config_of(read_json(folder / "config.json", "vision tower config"), where)
    family = vision_family_for_hf(tower.get("model_type"), where)
    vit = vit_config_from_hf(tower, feature_layers, select or family.default_select, where=where,
                             reduction=reduction)
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        spec = preprocess_spec_from_hf(read_json(processor, "image processor config"), str(processor))
    else:  # the family's processor at the tower's size
        size = vit.image_size
        defaults = {key: ({side: size for side in value} if key in ("size", "crop_size") else value)
                    for key, value in family.processor_defaults.items()}
        spec = preprocess_spec_from_hf({"image_processor_type": family.hf_image_processors[0], **defaults})
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
