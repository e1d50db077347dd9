"""The files transformers.js reads, written beside vledge's own so one folder loads in both.

transformers.js (``@huggingface/transformers``) loads a LLaVA model (or a tiled Idefics3 / SmolVLM one, whose
vision graph takes its [batch, tiles, 3, S, S] pixels: ``vledge.export.tile_batches``) from ``config.json``,
``preprocessor_config.json``, ``processor_config.json``, ``tokenizer.json`` +
``tokenizer_config.json``, ``generation_config.json`` and the three graphs under ``onnx/``,
choosing each graph's file by its dtype suffix (``""``, ``_fp16``, ``_int8``, ``_q4``: the names
vledge's variants already have). Everything here is derived from the model config and the
manifest, so the files agree with ``vledge.json`` by construction. A model transformers.js cannot
express (a CNN tower, a GPT-style or LSTM language model) gets one log line and no extra file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vledge.config import ModelConfig
from vledge.errors import ConfigError
from vledge.families import language_family_for_hf, language_family_for_hf_model_type, vision_family
from vledge.files import write_json
from vledge.manifest import Manifest
from vledge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# transformers.js's Idefics3 / SmolVLM processor writes these tokens around each tile (its own constants).
TILED_TOKENS = {"image": "<image>", "fake_token": "<fake_token_around_image>", "global_token": "<global-img>"}
# A tiled model's Hugging Face model_type (its config.json's, kept from the folder it came from) -> class names.
TILED_CLASSES = {"idefics3": ("Idefics3ForConditionalGeneration", "Idefics3ImageProcessor", "Idefics3Processor"),
                 "smolvlm": ("SmolVLMForConditionalGeneration", "SmolVLMImageProcessor", "SmolVLMProcessor")}


def model_types(config: ModelConfig) -> tuple[str, str] | str:
    """(vision model_type, text model_type) as transformers.js's ``llava`` knows them, or why it cannot.

    The families say whether transformers.js has them and under which Hugging Face names
    (``LanguageFamily.transformers_js`` / ``hf_model_types``, the same for vision).
    """
    vision, language = config.vision, config.language
    parent = parent_model_type(config)
    tower = vision_family(vision.backbone)
    if not tower.transformers_js or vision.vit is None:
        return f"its vision tower is {vision.backbone!r}, which transformers.js's {parent} does not have"
    family = language.family
    if not family.transformers_js:
        return f"its language model is {language.kind!r}, which transformers.js's {parent} does not have"
    vision_type = next((t for t in tower.hf_model_types if t.startswith(parent)), tower.hf_model_types[0])
    return vision_type, _text_model_type(language)


def parent_model_type(config: ModelConfig) -> str:
    """transformers.js's model_type for the whole model: ``llava``, or a tiled model's ``idefics3`` / ``smolvlm``
    (the folder's own, where the checkpoint recorded it; ``idefics3`` otherwise)."""
    if config.preprocess.tiles is None:
        return "llava"
    source = config.language.source or {}
    try:
        recorded = json.loads(source.get("config_json") or "{}").get("model_type")
    except (ValueError, AttributeError):
        recorded = None
    if recorded in TILED_CLASSES:
        return recorded
    return "smolvlm" if str(source.get("architecture", "")).startswith("SmolVLM") else "idefics3"


def _text_model_type(language) -> str:
    """The text model's Hugging Face model_type; a checkpoint from before the families (every Llama-family LM
    was kind "llama") is told apart by the folder it came from, or by Qwen2's biased q/k/v projections."""
    text_type = language.family.hf_model_types[0]
    if language.kind != language.family.hf_model_types[0] or language.source is None:
        return text_type
    source = language.source
    try:
        return language_family_for_hf({"architectures": [source.get("architecture")]}, "").hf_model_types[0]
    except ConfigError:
        pass
    try:  # an imported LLaVA folder records its whole config.json
        recorded = json.loads(source.get("config_json") or "{}").get("text_config", {}).get("model_type")
        return language_family_for_hf_model_type(recorded, "").hf_model_types[0]
    except (ValueError, AttributeError, ConfigError):
        return text_type



# vledge's precisions are transformers.js dtypes of the same name; int8 graphs have signed 8-bit
# weights (transformers.js's "int8", suffix ``_int8``), not its "q8" (``_quantized``).
DTYPES = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "q4": "q4"}
# vledge's resamplers -> the PIL resample codes Hugging Face image processors store.
RESAMPLE = {"bicubic": 3, "bicubic_pil": 3, "bilinear": 2, "bilinear_pil": 2}


def unsupported_reason(config: ModelConfig) -> str | None:
    """Why transformers.js cannot load this model (None when it can)."""
    types = model_types(config)
    if isinstance(types, str):
        return types
    vit = config.vision.vit
    if config.preprocess.channel_order != "RGB":
        return f"its images are fed as {config.preprocess.channel_order} (transformers.js feeds RGB)"
    tiles = config.preprocess.tiles
    if tiles is not None:
        have = {"image": (config.special_tokens or {}).get("image"), "fake_token": tiles.fake_token,
                "global_token": tiles.global_token}
        for role, text in TILED_TOKENS.items():
            if have[role] != text:
                return f"its {role} is {have[role]!r}; transformers.js's {parent_model_type(config)} writes {text!r}"
        return None
    if config.preprocess.interpolation not in RESAMPLE:
        return f"its resampler {config.preprocess.interpolation!r} has no image processor equivalent"
    if _additional_tokens(config, vit.num_tokens) < 0:
        return f"its {vit.num_tokens} image tokens are fewer than the processor's patch count"
    return None


def write_transformers_js_files(root: Path, manifest: Manifest, tokenizer: Tokenizer) -> list[str]:
    """Write the five JSON files into ``root`` (a model directory being exported); returns their names.

    Returns [] and logs one line when transformers.js cannot express the model.
    """
    config = manifest.model_config
    reason = unsupported_reason(config)
    if reason is not None:
        log.info("no transformers.js files: %s; the directory has vledge's layout only", reason)
        return []
    tiled = config.preprocess.tiles is not None
    files = {
        "config.json": (tiled_config_json if tiled else model_config_json)(manifest),
        "preprocessor_config.json": (tiled_preprocessor_config if tiled else preprocessor_config)(config),
        "processor_config.json": (tiled_processor_config(config) if tiled
                                  else processor_config(config, manifest.num_image_tokens, tokenizer)),
        "tokenizer_config.json": tokenizer_config(config, tokenizer),
        "generation_config.json": generation_config(manifest),
    }
    for name, value in files.items():
        write_json(root / name, value, indent=2)
    log.info("wrote the transformers.js files (%s, dtype %s)", files["config.json"]["model_type"],
             files["config.json"]["transformers.js_config"]["dtype"])
    return list(files)


def model_config_json(manifest: Manifest) -> dict[str, Any]:
    config = manifest.model_config
    vision_type, text_type = model_types(config)  # type: ignore[misc]  # checked by unsupported_reason
    vit, language, special = config.vision.vit, config.language, manifest.special_tokens
    layers = list(vit.feature_layers)
    text = {"model_type": text_type, **language.family.to_hf_config(language), **_token_ids(special)}
    vision = {"model_type": vision_type, **vision_family(config.vision.backbone).to_hf_config(vit)}
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": special["image"],
        "vision_feature_layer": layers[0] if len(layers) == 1 else layers,
        "vision_feature_select_strategy": vit.select,
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": language.tie_embeddings,
        "text_config": text,
        "vision_config": vision,
        **_token_ids(special),
        "transformers.js_config": _js_config(manifest),
    }


def tiled_config_json(manifest: Manifest) -> dict[str, Any]:
    """A tiled model's config.json as transformers.js's ``idefics3`` / ``smolvlm`` reads it (text_config for the
    cache, image_token_id for the merge); its vision graph takes [batch, tiles, 3, S, S] (``tile_batches``)."""
    config = manifest.model_config
    vision_type, text_type = model_types(config)  # type: ignore[misc]  # checked by unsupported_reason
    parent = parent_model_type(config)
    vit, language, special = config.vision.vit, config.language, manifest.special_tokens
    return {
        "architectures": [TILED_CLASSES[parent][0]],
        "model_type": parent,
        "image_token_id": special["image"],
        "scale_factor": config.projector.scale_factor,
        "tie_word_embeddings": language.tie_embeddings,
        "text_config": {"model_type": text_type, **language.family.to_hf_config(language), **_token_ids(special)},
        "vision_config": {"model_type": vision_type, **vision_family(config.vision.backbone).to_hf_config(vit)},
        **_token_ids(special),
        "transformers.js_config": _js_config(manifest),
    }


def _js_config(manifest: Manifest) -> dict[str, Any]:
    # transformers.js picks each graph's file by this (``onnx/<graph><suffix>.onnx``); a single dtype
    # string would ask for variants that were not made (no int8 embed_tokens).
    selected = manifest.selected.get("cpu", {})
    return {"dtype": {component: DTYPES[selected.get(component, "fp32")] for component in manifest.variants}}


def tiled_preprocessor_config(config: ModelConfig) -> dict[str, Any]:
    """The tiles spec as the Idefics3 / SmolVLM image processor's settings (transformers' names)."""
    spec = config.preprocess
    tiles = spec.tiles
    _, image_processor, processor = TILED_CLASSES[parent_model_type(config)]
    return {
        "image_processor_type": image_processor,
        "processor_class": processor,
        "do_convert_rgb": True,
        "do_resize": tiles.do_resize,
        "size": {"longest_edge": tiles.longest_edge},
        "resample": tiles.resample,
        "do_image_splitting": tiles.split,
        "max_image_size": {"longest_edge": spec.image_size},
        "do_rescale": tiles.rescale_factor != 1.0,
        "rescale_factor": tiles.rescale_factor,
        "do_normalize": True,
        "image_mean": list(spec.mean),
        "image_std": list(spec.std),
        "do_pad": True,
    }


def tiled_processor_config(config: ModelConfig) -> dict[str, Any]:
    """The processor writes ``image_seq_len`` image tokens per tile."""
    return {"processor_class": TILED_CLASSES[parent_model_type(config)][2],
            "image_seq_len": config.preprocess.tiles.tokens_per_tile}


def preprocessor_config(config: ModelConfig) -> dict[str, Any]:
    """vledge's preprocessing spec as the Hugging Face image processor that does the same steps."""
    spec = config.preprocess
    common = {
        "processor_class": "LlavaProcessor",
        "do_resize": True,
        "resample": RESAMPLE[spec.interpolation],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(spec.mean),
        "image_std": list(spec.std),
        "do_convert_rgb": True,
    }
    if spec.resize == "squash":
        return {"image_processor_type": "SiglipImageProcessor", **common,
                "size": {"height": spec.image_size, "width": spec.image_size}, "do_center_crop": False}
    return {"image_processor_type": "CLIPImageProcessor", **common,
            "size": {"shortest_edge": spec.resize_size or spec.image_size},
            "do_center_crop": True, "crop_size": {"height": spec.image_size, "width": spec.image_size}}


def processor_config(config: ModelConfig, image_tokens: int, tokenizer: Tokenizer) -> dict[str, Any]:
    """LlavaProcessor repeats the image token ``(S // patch_size)**2 + num_additional_image_tokens`` times.

    transformers.js does not subtract CLIP's class token for ``default`` selection, so the extra
    count is what the graph really returns beyond the patch grid (0 for CLIP ``default``).
    """
    return {
        "processor_class": "LlavaProcessor",
        "image_token": tokenizer.roles["image"],
        "patch_size": _processor_patch(config),
        "num_additional_image_tokens": _additional_tokens(config, image_tokens),
        "vision_feature_select_strategy": config.vision.vit.select,
    }


def tokenizer_config(config: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    roles = tokenizer.roles
    values: dict[str, Any] = {
        # the generic class: tokenizer.json alone says how text becomes ids (no class-specific legacy rules)
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.language.max_positions,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template(config, tokenizer, side_by_side=config.preprocess.tiles is not None),
    }
    for role in ("bos", "eos", "pad", "unk"):
        if role in roles:
            values[f"{role}_token"] = roles[role]
    return values


def generation_config(manifest: Manifest) -> dict[str, Any]:
    generation = manifest.generation
    return {
        **_token_ids(manifest.special_tokens),
        "max_new_tokens": int(generation.get("max_new_tokens", 32)),
        "do_sample": float(generation.get("temperature", 0.0) or 0.0) > 0,
    }


def chat_template(config: ModelConfig, tokenizer: Tokenizer, side_by_side: bool = False) -> str:
    """A Jinja template that renders vledge's prompt for Hugging Face-style messages.

    ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]}]`` with
    ``add_generation_prompt`` renders as system + user + <image> + image_separator + Q + assistant,
    the text of the ids vledge builds piece by piece. The bos token is written only where the
    tokenizer does not add it itself. ``side_by_side`` (a tiled model, which takes several images in
    one question): the images' tokens one after another, then one image_separator.
    """
    p = config.prompt
    image = tokenizer.roles["image"]
    adds_bos = tokenizer.bos_id is not None and tokenizer.backend.encode("a").ids[:1] == [tokenizer.bos_id]
    bos = "{{ bos_token }}" if tokenizer.bos_id is not None and not adds_bos else ""

    def lit(text: str) -> str:
        return json.dumps(text, ensure_ascii=False)

    head = bos + (f"{{{{ {lit(p.system)} }}}}" if p.system else "")
    user = (
        "{% if not loop.first and messages[loop.index0 - 1]['role'] == 'assistant' %}"
        f"{{{{ {lit(p.turn_separator)} }}}}{{% endif %}}{{{{ {lit(p.user)} }}}}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
        + (f"{{{{ {lit(image)} }}}}{{% if loop.last or message['content'][loop.index]['type'] != 'image' %}}"
           f"{{{{ {lit(p.image_separator)} }}}}{{% endif %}}{{% endif %}}{{% endfor %}}" if side_by_side else
           f"{{{{ {lit(image + p.image_separator)} }}}}{{% endif %}}{{% endfor %}}")
        +
        "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
        "{% endif %}"
    )
    assistant = (
        f"{{{{ {lit(p.assistant + p.answer_prefix)} }}}}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
        "{% endif %}{{ eos_token }}"
    )
    return (f"{head}{{% for message in messages %}}{{% if message['role'] == 'user' %}}{user}"
            f"{{% elif message['role'] == 'assistant' %}}{assistant}{{% endif %}}{{% endfor %}}"
            f"{{% if add_generation_prompt %}}{{{{ {lit(p.assistant)} }}}}{{% endif %}}")


def _processor_patch(config: ModelConfig) -> int:
    """The patch size the processor counts with: a 2x2 token reduction counts as patches twice as wide."""
    vit = config.vision.vit
    return vit.patch_size * (2 if vit.reduction else 1)


def _additional_tokens(config: ModelConfig, image_tokens: int) -> int:
    side = config.preprocess.image_size // _processor_patch(config)
    return image_tokens - side * side


def _token_ids(special: Mapping[str, int]) -> dict[str, int]:
    return {f"{role}_token_id": special[role] for role in ("bos", "eos", "pad") if role in special}
