"""Reading a local Hugging Face model folder: config.json and safetensors weights, never pickle.

The generic helpers (``local_folder``, ``read_config_json``, ``read_safetensors``,
``check_weight_names``, ``source_record``) serve any model family; ``load_pretrained_lm`` turns a
Llama-family causal LM folder (Llama, Qwen2, Mistral, SmolLM2) into vledge's language config,
weights under vledge's names, and the LM's own tokenizer with ``<image>`` (and a pad token) added.
Nothing is downloaded: a name that is not a local folder is an error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vledge.checkpoint import file_sha256
from vledge.config import LanguageConfig, PromptTemplate
from vledge.errors import ConfigError, WeightsError
from vledge.hf.folder_checks import check_rope_type, drop_tied_head
from vledge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# architectures entry -> config model_type; one entry each, the layers are the same module.
LLAMA_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
# Buffers older checkpoints saved that hold nothing a model needs (recomputed from the config).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class PretrainedLM:
    """A pretrained LM ready for the fusion model: ``state_dict`` keys are the fusion model's
    (``embed_tokens.weight``, ``language.layers.0.self_attn.q_proj.weight``, ...)."""

    config: LanguageConfig
    tokenizer: Tokenizer
    special_tokens: dict[str, str]  # role -> token text, for ModelConfig.special_tokens
    prompt: PromptTemplate  # from the chat template where the folder has one, else vledge's default
    state_dict: dict[str, torch.Tensor]
    original_vocab_size: int  # embedding rows before <image> / pad were added


# --------------------------------------------------------------------------- generic folder reading


def local_folder(path: str | Path, what: str = "model") -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        hint = " (nothing is downloaded: download it first, e.g. `huggingface-cli download NAME --local-dir DIR`)"
        raise WeightsError(f"{what} {str(path)!r} is not a local folder{hint if not folder.exists() else ''}")
    return folder


def read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{folder} has no config.json: not a Hugging Face model folder") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path} does not hold a JSON object")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: one ``model.safetensors`` or the shards its index names."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{index} is not a safetensors index: {exc}") from None
        outside = [name for name in shards if not isinstance(name, str) or Path(name).name != name]
        if outside:
            raise WeightsError(f"{index} names shards outside its folder: {outside}")
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise WeightsError(f"{index} names shards that are not in {folder}: {missing}")
        return [folder / name for name in shards]
    single = folder / SAFETENSORS
    if single.is_file():
        return [single]
    pickled = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    if pickled:
        raise WeightsError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}); vledge reads safetensors only. Convert "
            "them once: `python -c \"import transformers as t; m = t.AutoModelForCausalLM.from_pretrained('DIR'); "
            "m.save_pretrained('DIR', safe_serialization=True)\"`"
        )
    raise WeightsError(f"{folder} has no {SAFETENSORS} or {SAFETENSORS_INDEX}")


def read_safetensors(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the files by name, bf16/fp16 upcast to float32 (CPU training wants fp32)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            loaded = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from None
        for name, tensor in loaded.items():
            if name in tensors:
                raise WeightsError(f"tensor {name!r} appears in more than one file of {path.parent}")
            tensors[name] = tensor.float() if tensor.is_floating_point() else tensor
    return tensors


def check_weight_names(found: Iterable[str], expected: Iterable[str], where: Path) -> None:
    """WeightsError listing every missing and every unexpected tensor name."""
    found, expected = set(found), set(expected)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        raise WeightsError(f"the weights in {where} do not fit its config.json: " + "; ".join(parts))


def source_record(folder: Path, config_json: dict[str, Any], files: Iterable[Path]) -> dict[str, Any]:
    """What a checkpoint keeps about where its pretrained weights came from."""
    return {
        "folder": str(folder.resolve()),
        "architecture": (config_json.get("architectures") or [config_json.get("model_type")])[0],
        "config_json": json.dumps(config_json, sort_keys=True),
        "files": {path.name: file_sha256(path) for path in files},
    }


# --------------------------------------------------------------------------- the Llama family


def llama_architecture(config_json: Mapping[str, Any], folder: Path) -> str:
    names = list(config_json.get("architectures") or [])
    model_type = config_json.get("model_type")
    for name in names:
        if name in LLAMA_ARCHITECTURES:
            return name
    if not names and model_type in LLAMA_ARCHITECTURES.values():
        return next(name for name, kind in LLAMA_ARCHITECTURES.items() if kind == model_type)
    shown = ", ".join(names) or f"model_type {model_type!r}"
    raise ConfigError(f"{folder}: architecture {shown} is not supported; vledge loads "
                      f"{', '.join(LLAMA_ARCHITECTURES)} (SmolLM2 and TinyLlama are LlamaForCausalLM)")


def llama_language_config(config_json: Mapping[str, Any], folder: Path, context: int) -> LanguageConfig:
    """vledge's LanguageConfig for a Llama-family config.json, refusing what it cannot run exactly."""
    architecture = llama_architecture(config_json, folder)
    get = config_json.get
    if get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{folder}: hidden_act {get('hidden_act')!r} is not supported (only silu)")
    if architecture == "LlamaForCausalLM" and (get("attention_bias") or get("mlp_bias")):
        raise ConfigError(f"{folder}: Llama attention_bias / mlp_bias are not supported")
    window = get("sliding_window")
    sliding = window is not None and (architecture == "MistralForCausalLM" or get("use_sliding_window", False))
    if sliding and int(window) < context:
        raise ConfigError(f"{folder}: sliding_window {window} is shorter than the context vledge uses ({context} "
                          "tokens); lower --max-seq-len to at most the window")
    # transformers 5 writes rope_parameters (with rope_theta inside); 4.x rope_theta and rope_scaling.
    rope = dict(get("rope_parameters") or get("rope_scaling") or {})
    theta = float(get("rope_theta") or rope.pop("rope_theta", 10000.0))
    rope.pop("rope_theta", None)
    check_rope_type(rope, f"{folder}/config.json")
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = {}
    heads = int(get("num_attention_heads"))
    hidden = int(get("hidden_size"))
    head_dim = int(get("head_dim") or hidden // heads)
    try:
        return LanguageConfig(
            kind="llama", hidden=hidden, layers=int(get("num_hidden_layers")), heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads), intermediate=int(get("intermediate_size")),
            attention_head_dim=head_dim if head_dim != hidden // heads else 0,
            max_positions=int(get("max_position_embeddings", context)), rope_theta=theta, rope_scaling=rope or None,
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)), tie_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=architecture == "Qwen2ForCausalLM", vocab_size=int(get("vocab_size")),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{folder}/config.json lacks or garbles a required number: {exc}") from None


def llama_weight_names(config: LanguageConfig) -> list[str]:
    """The Hugging Face tensor names a Llama-family folder with this config must hold."""
    from vledge.models.llama import LlamaLM

    with torch.device("meta"):
        names = [f"model.{name}" for name in LlamaLM(config).state_dict() if not name.startswith("lm_head.")]
    names.append("model.embed_tokens.weight")
    if not config.tie_embeddings:
        names.append("lm_head.weight")
    return names


def to_fusion_names(hf_state: Mapping[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Hugging Face names -> the fusion model's (its embed_tokens and its ``language`` module)."""
    state = {}
    for name, tensor in hf_state.items():
        if name == "model.embed_tokens.weight":
            state["embed_tokens.weight"] = tensor
        elif name.startswith("model."):
            state["language." + name[len("model."):]] = tensor
        else:  # lm_head.weight
            state["language." + name] = tensor
    if tied:
        state["language.lm_head.weight"] = state["embed_tokens.weight"]
    return state


def grow_rows(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """``matrix`` grown to ``rows`` rows, each new row the mean of the existing ones.

    A new token whose id falls inside the matrix (Qwen2 pads its vocabulary with unused rows)
    keeps that row as it is, so every logit of the original vocabulary stays exactly the LM's.
    """
    if rows <= matrix.shape[0]:
        return matrix
    return torch.cat([matrix, matrix.mean(dim=0).expand(rows - matrix.shape[0], -1)])


def load_pretrained_lm(path: str | Path, context: int = 2048) -> PretrainedLM:
    """A Llama-family causal LM folder as config, tokenizer and weights for the fusion model.

    ``context`` is the longest sequence vledge will give the LM (a Mistral sliding window shorter
    than it is refused).
    """
    from vledge.models.hf_tokenizer import adapt_tokenizer

    folder = local_folder(path, "language model")
    config_json = read_config_json(folder)
    config = llama_language_config(config_json, folder, context)
    files = weight_files(folder)
    hf_state = read_safetensors(files)
    if config.tie_embeddings:
        drop_tied_head(hf_state, folder)  # an exact second copy of the shared matrix, else WeightsError
    for name in [n for n in hf_state if n.endswith(IGNORED_SUFFIXES)]:
        hf_state.pop(name)
    check_weight_names(hf_state, llama_weight_names(config), folder)
    embed = hf_state["model.embed_tokens.weight"]
    if tuple(embed.shape) != (config.vocab_size, config.hidden):
        raise WeightsError(f"{folder}: embed_tokens is {tuple(embed.shape)}, config.json says "
                           f"({config.vocab_size}, {config.hidden})")
    adapted = adapt_tokenizer(folder)
    original = config.vocab_size
    rows = max(original, adapted.tokenizer.vocab_size)
    hf_state["model.embed_tokens.weight"] = grow_rows(embed, rows)
    if not config.tie_embeddings:
        hf_state["lm_head.weight"] = grow_rows(hf_state["lm_head.weight"], rows)
    from dataclasses import replace

    from vledge.hf.generation_config import with_stop_ids

    config = replace(config, vocab_size=rows, source=with_stop_ids(source_record(folder, config_json, files), folder,
                                                                   config_json, adapted.tokenizer.eos_id))
    log.info("loaded %s from %s: %d layers, hidden %d, %d/%d heads, vocab %d (+%d added tokens)",
             config.source["architecture"], folder, config.layers, config.hidden, config.heads,
             config.key_value_heads, original, len(adapted.added_ids))
    return PretrainedLM(config=config, tokenizer=adapted.tokenizer, special_tokens=adapted.roles,
                        prompt=adapted.prompt, state_dict=to_fusion_names(hf_state, config.tie_embeddings),
                        original_vocab_size=original)
