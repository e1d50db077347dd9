"""A local ``LlavaForConditionalGeneration`` folder -> a vledge checkpoint (config, tokenizer, weights).

The vision tower, the projector (``linear_1`` -> GELU -> ``linear_2``) and the LM become vledge's
VisionLanguageModel with the same numbers, so ``vledge export`` and ``vledge train --init`` treat the result as
any vledge checkpoint. The tower and the LM are read by their families (``vledge.families``) through the same
code as ``vledge train --vision-model`` / ``--language-model`` (``vledge.hf.vision``, ``vledge.hf.language_model``).
Both weight layouts transformers writes are read: ``language_model.model.*`` / ``vision_tower.*`` and
``model.language_model.*`` / ``model.vision_tower.*``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vledge.config import ModelConfig, ProjectorConfig, VisionConfig
from vledge.errors import ConfigError, WeightsError
from vledge.families import language_family_for_hf_model_type
from vledge.families.size import check_parts_fit
from vledge.hf.folder import check_weight_values, local_folder, read_config_json, read_safetensors, source_record, weight_files
from vledge.hf.generation_config import with_stop_ids
from vledge.hf.image_processor import preprocess_spec_from_hf
from vledge.hf.language_model import lm_state_from_hf
from vledge.hf.llava_prompt import llava_prompt
from vledge.hf.vision import fusion_tower_state, read_json, vit_config_from_hf

log = logging.getLogger(__name__)

ARCHITECTURE = "LlavaForConditionalGeneration"
MIN_TEXT_POSITIONS = 64  # prompt and answer positions a model must have besides its image tokens
# LlavaConfig's defaults, for keys a saved config.json leaves out.
LLAVA_DEFAULTS = {"image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_select_strategy":
                  "default", "vision_feature_layer": -2, "multimodal_projector_bias": True}
# Settings of LLaVA's relatives (LLaVA-NeXT tiling, video, several images per prompt) vledge does not run.
UNSUPPORTED_FIELDS = ("image_grid_pinpoints", "video_token_index", "video_token_id", "spatial_pool_mode",
                      "vision_aspect_ratio", "multimodal_patch_merge_type")
_VISION_PREFIXES = ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
                    "model.vision_tower.")
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
# (prefix in the folder, prefix in a LlamaForCausalLM folder)
_LM_LAYOUTS = ((("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
               (("model.language_model.", "model."), ("lm_head.", "lm_head.")))


@dataclass
class LlavaImport:
    model_config: ModelConfig
    tokenizer_json: str
    state_dict: dict[str, torch.Tensor]  # the fusion model's names
    image_token_id: int
    source: dict[str, Any]


def read_llava_config(folder: Path) -> dict[str, Any]:
    """config.json of a LLaVA folder with LlavaConfig's defaults filled in; ConfigError for what vledge cannot run."""
    config = read_config_json(folder)
    for key in UNSUPPORTED_FIELDS:
        if config.get(key) not in (None, [], {}):
            raise ConfigError(f"{folder}/config.json: {key} is set; anyres tiling, video and several images per "
                              "prompt are not supported")
    architectures = config.get("architectures") or []
    if ARCHITECTURE not in architectures and not (not architectures and config.get("model_type") == "llava"):
        shown = ", ".join(map(str, architectures)) or f"model_type {config.get('model_type')!r}"
        raise ConfigError(f"{folder}/config.json: architectures {shown} is not supported; vledge converts "
                          f"{ARCHITECTURE} folders")
    if "image_token_index" not in config and config.get("image_token_id") is not None:  # the newer spelling
        config = {**config, "image_token_index": config["image_token_id"]}
    config = {**LLAVA_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if config["projector_hidden_act"] != "gelu":
        raise ConfigError(f"{folder}/config.json: projector_hidden_act {config['projector_hidden_act']!r} is not "
                          "supported (only gelu)")
    for part in ("vision_config", "text_config"):
        if not isinstance(config.get(part), Mapping):
            raise ConfigError(f"{folder}/config.json has no {part}")
    index = config["image_token_index"]
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigError(f"{folder}/config.json: image_token_index must be a non-negative integer, got {index!r}")
    if not isinstance(config["multimodal_projector_bias"], bool):
        raise ConfigError(f"{folder}/config.json: multimodal_projector_bias must be true or false")
    return config


def text_config_json(text_config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The LM's config as its own config.json would hold it (``model_type`` says the family; llama if absent)."""
    family = language_family_for_hf_model_type(text_config.get("model_type", "llama"), where)
    values = {k: v for k, v in text_config.items() if k != "architectures"}
    values["model_type"] = family.hf_model_types[0]
    return values


def _prefix(tensors: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], probe: str) -> str | None:
    return next((prefix for prefix in prefixes if prefix + probe in tensors), None)


def _projector_state(tensors: Mapping[str, torch.Tensor], bias: bool, folder: Path) -> dict[str, torch.Tensor]:
    prefix = _prefix(tensors, _PROJECTOR_PREFIXES, "linear_1.weight")
    if prefix is None:
        raise WeightsError(f"{folder}: no multi_modal_projector.linear_1.weight in its safetensors files")
    state = {}
    for hf_name, index in (("linear_1", 0), ("linear_2", 2)):
        weight = tensors.get(f"{prefix}{hf_name}.weight")
        if weight is None:
            raise WeightsError(f"{folder}: no {prefix}{hf_name}.weight")
        state[f"projector.{index}.weight"] = weight
        hf_bias = tensors.get(f"{prefix}{hf_name}.bias")
        if bias and hf_bias is None:
            raise WeightsError(f"{folder}: no {prefix}{hf_name}.bias (multimodal_projector_bias is true)")
        state[f"projector.{index}.bias"] = hf_bias if bias else torch.zeros(weight.shape[0])
    return state


def _lm_tensors(tensors: Mapping[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """The language model's tensors under a LlamaForCausalLM folder's names."""
    for (body, body_as), (head, head_as) in _LM_LAYOUTS:
        if body + "embed_tokens.weight" in tensors:
            lm = {}
            for name, tensor in tensors.items():
                if name.startswith(body):
                    lm[body_as + name[len(body):]] = tensor
                elif name.startswith(head):
                    lm[head_as + name[len(head):]] = tensor
            return lm
    raise WeightsError(f"{folder}: no language_model embed_tokens.weight in its safetensors files")


def image_processor_config(folder: Path) -> tuple[dict[str, Any], str]:
    """The image processor's settings: preprocessor_config.json, or the image_processor in processor_config.json."""
    single = folder / "preprocessor_config.json"
    if single.is_file():
        return read_json(single, "image processor config"), str(single)
    combined = folder / "processor_config.json"
    if combined.is_file():
        processor = read_json(combined, "processor config")
        if isinstance(processor.get("image_processor"), Mapping):
            return dict(processor["image_processor"]), f"{combined} image_processor"
    raise ConfigError(f"{folder} has no preprocessor_config.json (nor an image_processor in processor_config.json): "
                      "save the folder with its processor")


def load_llava_folder(path: str | Path, context: int = 4096, backend: str = "pil") -> LlavaImport:
    """A LLaVA folder as a vledge model config, tokenizer and weights; nothing half-read is returned.

    ``backend`` says which transformers image-processor backend the spec reproduces ("pil", as
    the model was trained with in transformers 4.x, or "torchvision").
    """
    from vledge.hf.tokenizer import adapt_tokenizer
    from vledge.models.vit import resolved_feature_layers

    folder = local_folder(path, "LLaVA model")
    config = read_llava_config(folder)
    where = f"{folder}/config.json"
    vit = vit_config_from_hf(config["vision_config"], config["vision_feature_layer"],
                             config["vision_feature_select_strategy"], where=f"{where} vision_config")
    text_json = text_config_json(config["text_config"], where)
    family = language_family_for_hf_model_type(text_json["model_type"], where)
    language = family.from_hf_config(text_json, f"{where} text_config", context)
    if vit.num_tokens + MIN_TEXT_POSITIONS > language.max_positions:
        raise ConfigError(f"{where}: the vision tower's {vit.num_tokens} image tokens leave too little room in the "
                          f"language model's {language.max_positions} positions (text_config.max_position_embeddings)")
    processor_json, processor_where = image_processor_config(folder)
    spec = preprocess_spec_from_hf(processor_json, processor_where, backend=backend)
    if spec.image_size != vit.image_size:
        raise ConfigError(f"{processor_where}: the processor makes {spec.image_size} px images, the vision tower "
                          f"reads {vit.image_size} px")
    vision = VisionConfig(backbone=vit.family, vit=vit)
    check_parts_fit(language, vision, where)

    files = weight_files(folder)
    tensors = read_safetensors(files)
    vision_prefix = _prefix(tensors, _VISION_PREFIXES, "embeddings.patch_embedding.weight")
    if vision_prefix is None:
        raise WeightsError(f"{folder}: no vision_tower embeddings.patch_embedding.weight in its safetensors files")
    state = fusion_tower_state(tensors, vision_prefix, vit, str(folder))
    state.update(_projector_state(tensors, config["multimodal_projector_bias"], folder))
    projected = state["projector.0.weight"].shape
    if tuple(projected) != (language.hidden, vit.out_features):
        raise WeightsError(f"{folder}: multi_modal_projector.linear_1 is {tuple(projected)}, the configs imply "
                           f"({language.hidden}, {vit.out_features})")

    adapted = adapt_tokenizer(folder, use_chat_template=False)
    tokenizer = adapted.tokenizer
    image_token_id = int(config["image_token_index"])
    if tokenizer.image_id != image_token_id:
        raise ConfigError(f"{where}: image_token_index is {image_token_id}, but the tokenizer's <image> token has id "
                          f"{tokenizer.image_id}")
    rows = max(language.vocab_size, tokenizer.vocab_size)
    state.update(lm_state_from_hf(language, _lm_tensors(tensors, folder), folder, rows))
    source = with_stop_ids(source_record(folder, config, files), folder, config, tokenizer.eos_id)
    language = replace(language, vocab_size=rows, source=source)

    bos = adapted.roles.get("bos")
    prompt = llava_prompt(folder, bos_token=bos or "", eos_token=adapted.roles["eos"], fallback=adapted.prompt)
    model_config = ModelConfig(
        vision=vision,
        projector=ProjectorConfig("mlp2x_gelu"),
        language=language,
        preprocess=spec,
        prompt=prompt,
        tokenizer_vocab_size=tokenizer.vocab_size,
        special_tokens=adapted.roles,
    )
    log.info("LLaVA folder %s: %s tower (%d layers, %d image tokens), %s LM (%d layers, hidden %d)", folder,
             vit.family, max(resolved_feature_layers(vit)), vit.num_tokens, language.kind, language.layers,
             language.hidden)
    return LlavaImport(model_config=model_config, tokenizer_json=tokenizer.to_json(), state_dict=state,
                       image_token_id=image_token_id, source=source)


def is_llava_folder(path: str | Path) -> bool:
    """True for a folder whose config.json names LlavaForConditionalGeneration (or model_type llava)."""
    import json

    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and (ARCHITECTURE in (config.get("architectures") or [])
                                         or str(config.get("model_type", "")).startswith("llava"))


def check_fusion_state(model_config: ModelConfig, state: Mapping[str, torch.Tensor], image_token_id: int,
                       folder: Path) -> None:
    """WeightsError unless ``state`` has exactly the fusion model's tensors and shapes (checked on a meta model)."""
    from vledge.models.vlm import VisionLanguageModel

    with torch.device("meta"):
        skeleton = VisionLanguageModel(model_config, image_token_id=image_token_id)
    expected = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in state.items()}
    wrong = sorted(name for name in expected.keys() & found.keys() if expected[name] != found[name])
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if wrong or missing or unexpected:
        raise WeightsError(f"{folder}: the converted weights do not fit the model: missing {missing}, unexpected "
                           f"{unexpected}, other shapes {wrong}")


def llava_checkpoint(path: str | Path, context: int = 4096, backend: str = "pil"):
    """A LLaVA folder as a checkpoint held in memory, its weights checked against the model first."""
    from vledge.checkpoint import Checkpoint

    imported = load_llava_folder(path, context=context, backend=backend)
    check_fusion_state(imported.model_config, imported.state_dict, imported.image_token_id, Path(path))
    check_weight_values(imported.state_dict, Path(path))
    return Checkpoint(model_config=imported.model_config, tokenizer_json=imported.tokenizer_json,
                      state_dict=imported.state_dict, source=str(path))


folder_checkpoint = llava_checkpoint  # the reader vledge.hf.fusion_folders calls


def convert_llava(path: str | Path, out: str | Path, context: int = 4096, backend: str = "pil") -> Path:
    """Write a LLaVA folder as a vledge ``ckpt.pt`` (atomically), its weights checked against the model first."""
    from vledge.checkpoint import save_checkpoint

    return save_checkpoint(out, llava_checkpoint(path, context=context, backend=backend))
