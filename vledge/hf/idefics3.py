"""A local ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration`` folder -> a vledge checkpoint.

The SigLIP-style tower (``vledge.families.idefics3``), the connector (pixel shuffle by ``scale_factor``, then
``modality_projection.proj``, ``ProjectorConfig(kind="pixel_shuffle")``) and the Llama-family LM become vledge's
VisionLanguageModel with the same numbers; the image processor becomes a tiled PreprocessSpec
(``ImageTiles``: longest edge, splitting, Lanczos, ``image_seq_len``) that the runtime follows bit for bit. The
prompt pieces come from the processor's chat template, as for LLaVA folders. What vledge does not run (video,
another connector, a processor it cannot reproduce) is one ConfigError naming the field.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vledge.config import ImageTiles, ModelConfig, PreprocessSpec, ProjectorConfig, VisionConfig
from vledge.errors import ConfigError, WeightsError
from vledge.families import language_family_for_hf_model_type
from vledge.families.hf_config import HFConfig
from vledge.families.size import check_parts_fit
from vledge.hf.folder import check_weight_values, local_folder, read_config_json, read_safetensors, source_record, weight_files
from vledge.hf.generation_config import with_stop_ids
from vledge.hf.llava import check_fusion_state, image_processor_config, text_config_json
from vledge.hf.llava_prompt import llava_prompt
from vledge.hf.vision import fusion_tower_state, read_json, vit_config_from_hf

log = logging.getLogger(__name__)

ARCHITECTURES = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
# Settings of relatives vledge does not run: videos (SmolVLM2's processor samples frames), other connectors.
UNSUPPORTED_FIELDS = ("video_token_id", "perceiver_config", "vision_feature_layer", "connector_type")
_DEFAULTS = {"scale_factor": 2, "image_token_id": 128257}  # Idefics3Config's
_VISION_PREFIX = "model.vision_model."
_PROJECTION = "model.connector.modality_projection.proj.weight"
_LM_BODY, _LM_HEAD = "model.text_model.", "lm_head."


def read_idefics3_config(folder: Path) -> dict[str, Any]:
    config = read_config_json(folder)
    where = f"{folder}/config.json"
    architectures = [a for a in (config.get("architectures") or []) if isinstance(a, str)]
    if architectures and not set(architectures) & set(ARCHITECTURES):
        raise ConfigError(f"{where}: architectures {', '.join(architectures)} is not supported; this reader takes "
                          f"{', '.join(ARCHITECTURES)}")
    for key in UNSUPPORTED_FIELDS:
        if config.get(key) not in (None, [], {}):
            raise ConfigError(f"{where}: {key} is set; vledge runs images only, through Idefics3's pixel-shuffle "
                              "connector")
    for part in ("vision_config", "text_config"):
        if not isinstance(config.get(part), Mapping):
            raise ConfigError(f"{where} has no {part}")
    return {**_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}


def tiles_spec(processor: Mapping[str, Any], processor_config: Mapping[str, Any], where: str, tile_tokens: int,
               tower_size: int) -> PreprocessSpec:
    """The tiled PreprocessSpec of an Idefics3 / SmolVLM image processor (checked by the runtime's reproduction)."""
    from vledge.runtime.idefics3_images import Idefics3ImageOptions

    try:
        options = Idefics3ImageOptions.from_config(processor)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if options.tile != tower_size:
        raise ConfigError(f"{where}: max_image_size.longest_edge {options.tile} differs from the vision tower's "
                          f"image_size {tower_size}; vledge runs tiles of the tower's size")
    seq_len = processor_config.get("image_seq_len", tile_tokens)
    if seq_len != tile_tokens:
        raise ConfigError(f"processor_config.json: image_seq_len {seq_len!r} differs from the {tile_tokens} tokens "
                          "the tower and scale_factor make per tile")
    mean, std = (options.image_mean, options.image_std) if options.do_normalize else ((0.0,) * 3, (1.0,) * 3)
    tiles = ImageTiles(longest_edge=options.longest_edge, split=options.do_image_splitting,
                       tokens_per_tile=tile_tokens, resample=options.resample, do_resize=options.do_resize,
                       rescale_factor=options.rescale_factor if options.do_rescale else 1.0)
    return PreprocessSpec(image_size=options.tile, resize="tiles", interpolation="bicubic_pil",
                          crop_anchor="floor", mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                          channel_order="RGB", tiles=tiles)


def _check_tokens(tokenizer, tiles: ImageTiles, image_token_id: int, where: str) -> None:
    backend = tokenizer.backend
    for text in (IMAGE_TOKEN, tiles.fake_token, tiles.global_token) + (("<row_1_col_1>",) if tiles.split else ()):
        if backend.token_to_id(text) is None:
            raise ConfigError(f"{where}: the tokenizer has no {text} token, which the image prompt needs")
    if backend.token_to_id(IMAGE_TOKEN) != image_token_id:
        raise ConfigError(f"{where}: image_token_id is {image_token_id}, but the tokenizer's {IMAGE_TOKEN} token has "
                          f"id {backend.token_to_id(IMAGE_TOKEN)}")


def _lm_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The language model's tensors under a LlamaForCausalLM folder's names."""
    lm = {}
    for name, tensor in tensors.items():
        if name.startswith(_LM_BODY):
            lm["model." + name[len(_LM_BODY):]] = tensor
        elif name.startswith(_LM_HEAD):
            lm[name] = tensor
    return lm


def load_idefics3_folder(path: str | Path, context: int = 4096):
    """(ModelConfig, tokenizer JSON, state dict, image token id) of an Idefics3 / SmolVLM folder."""
    from vledge.hf.tokenizer import adapt_tokenizer

    folder = local_folder(path, "Idefics3 model")
    config = read_idefics3_config(folder)
    where = f"{folder}/config.json"
    scale = HFConfig(config, where, {}).int("scale_factor", high=16)
    vision_json = {"model_type": "idefics3_vision", **config["vision_config"]}
    vit = vit_config_from_hf(vision_json, -1, "full", where=f"{where} vision_config", post_norm=True)
    if vit.grid % scale:
        raise ConfigError(f"{where}: scale_factor {scale} does not divide the tower's {vit.grid}x{vit.grid} patch "
                          "grid")
    tile_tokens = vit.num_tokens // (scale * scale)
    text_json = text_config_json(config["text_config"], where)
    family = language_family_for_hf_model_type(text_json["model_type"], where)
    language = family.from_hf_config(text_json, f"{where} text_config", context)
    processor_json, processor_where = image_processor_config(folder)
    processor_file = folder / "processor_config.json"
    processor_config = read_json(processor_file, "processor config") if processor_file.is_file() else {}
    spec = tiles_spec(processor_json, processor_config, processor_where, tile_tokens, vit.image_size)
    if 3 * tile_tokens + 64 > language.max_positions:
        raise ConfigError(f"{where}: an image's {tile_tokens} tokens per tile leave too little room in the language "
                          f"model's {language.max_positions} positions")
    vision = VisionConfig(backbone=vit.family, vit=vit)
    check_parts_fit(language, vision, where)

    files = weight_files(folder)
    tensors = read_safetensors(files)
    state = fusion_tower_state(tensors, _VISION_PREFIX, vit, str(folder))
    projection = tensors.get(_PROJECTION)
    if projection is None:
        raise WeightsError(f"{folder}: no {_PROJECTION} in its safetensors files")
    if tuple(projection.shape) != (language.hidden, vit.out_features * scale * scale):
        raise WeightsError(f"{folder}: {_PROJECTION} is {tuple(projection.shape)}, the configs imply "
                           f"({language.hidden}, {vit.out_features * scale * scale})")
    state["projector.proj.weight"] = projection

    adapted = adapt_tokenizer(folder, use_chat_template=False)
    tokenizer = adapted.tokenizer
    image_token_id = HFConfig(config, where, {}).int("image_token_id", low=0, high=1 << 31)
    _check_tokens(tokenizer, spec.tiles, image_token_id, where)
    lm = _lm_tensors(tensors)
    if config.get("tie_word_embeddings") and "lm_head.weight" not in lm:
        language = replace(language, tie_embeddings=True)
    rows = max(language.vocab_size, tokenizer.vocab_size)
    from vledge.hf.language_model import lm_state_from_hf

    state.update(lm_state_from_hf(language, lm, folder, rows))
    source = with_stop_ids(source_record(folder, config, files), folder, config, tokenizer.eos_id)
    language = replace(language, vocab_size=rows, source=source)
    prompt = llava_prompt(folder, bos_token=adapted.roles.get("bos") or "", eos_token=adapted.roles["eos"],
                          fallback=adapted.prompt)
    model_config = ModelConfig(vision=vision, projector=ProjectorConfig("pixel_shuffle", scale_factor=scale),
                               language=language, preprocess=spec, prompt=prompt,
                               tokenizer_vocab_size=tokenizer.vocab_size, special_tokens=adapted.roles)
    log.info("Idefics3 folder %s: tower of %d layers (%d tokens per %d px tile), %s LM (%d layers, hidden %d)",
             folder, vit.layers, tile_tokens, vit.image_size, language.kind, language.layers, language.hidden)
    return model_config, tokenizer.to_json(), state, image_token_id


def folder_checkpoint(path: str | Path, context: int = 4096, backend: str = "pil"):
    """An Idefics3 / SmolVLM folder as a checkpoint held in memory, its weights checked against the model first.

    ``backend`` must be "pil": the tiles reproduce the Pillow processors (docs/idefics3.md).
    """
    from vledge.checkpoint import Checkpoint

    if backend != "pil":
        raise ConfigError("Idefics3 / SmolVLM folders reproduce the Pillow image processor only "
                          "(--image-processor-backend pil)")
    model_config, tokenizer_json, state, image_token_id = load_idefics3_folder(path, context=context)
    check_fusion_state(model_config, state, image_token_id, Path(path))
    check_weight_values(state, Path(path))
    return Checkpoint(model_config=model_config, tokenizer_json=tokenizer_json, state_dict=state, source=str(path))
