"""A pretrained causal LM from Hugging Face tensors: one assembly for a plain LM folder and a LLaVA folder's LM.

The family (``vledge.families``) says how config.json maps to vledge's config and how each tensor is named;
this module checks the tensors strictly (every one present, none unexpected, shapes as the config says), grows
the embedding rows for the tokens vledge adds (``<image>``, a pad token) and renames them to the fusion model's
names (``embed_tokens.weight``, ``language.*``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vledge.config import LanguageConfig, PromptTemplate
from vledge.errors import WeightsError
from vledge.families import language_family_for_hf
from vledge.hf.generation_config import with_stop_ids
from vledge.hf.folder import check_weight_values, grow_rows, local_folder, read_config_json, read_safetensors, source_record, weight_files
from vledge.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class PretrainedLM:
    """A pretrained LM ready for the fusion model: ``state_dict`` keys are the fusion model's
    (``embed_tokens.weight``, ``language.layers.0.self_attn.q_proj.weight``, ...)."""

    config: LanguageConfig
    tokenizer: Tokenizer
    special_tokens: dict[str, str]  # role -> token text, for ModelConfig.special_tokens
    prompt: PromptTemplate  # from the chat template where the folder has one, else vledge's default
    state_dict: dict[str, Any]
    original_vocab_size: int  # embedding rows before <image> / pad were added


def fusion_tensor_names(config: LanguageConfig) -> list[str]:
    """The fusion model's names of the LM's tensors (``embed_tokens.weight`` and ``language.*``), from a meta model."""
    import torch

    with torch.device("meta"):
        module = config.family.module(config)
    names = ["embed_tokens.weight"] + [f"language.{name}" for name in module.state_dict()]
    if config.tie_embeddings:
        names.remove("language.lm_head.weight")
    return names


def lm_state_from_hf(config: LanguageConfig, hf_tensors: Mapping[str, Any], folder: Path,
                     vocab_rows: int) -> dict[str, Any]:
    """The LM's tensors under the fusion model's names, embedding (and untied head) rows grown to ``vocab_rows``.

    ``hf_tensors`` hold the LM's tensors under its own folder's names (a LLaVA folder's prefixes already taken
    off). A tensor missing or unexpected, a shape the config does not give, or a stored head that differs from the
    embeddings it is declared tied to is a WeightsError naming the folder.
    """
    family = config.family
    names = fusion_tensor_names(config)
    hf_names = {family.hf_tensor_name(name): name for name in names}
    embed_hf = family.hf_tensor_name("embed_tokens.weight")
    head_hf = family.hf_tensor_name("language.lm_head.weight")
    tensors = {name: tensor for name, tensor in hf_tensors.items() if not family.hf_ignored(name)}
    if config.tie_embeddings and head_hf in tensors:  # some tied folders store the shared matrix twice
        head = tensors.pop(head_hf)
        embed = tensors.get(embed_hf)
        if embed is not None and (head.shape != embed.shape or not bool((head == embed).all())):
            raise WeightsError(f"{folder}: {head_hf} differs from {embed_hf} although the config ties them "
                               "(tie_word_embeddings); set tie_word_embeddings to false to use the stored head")
    missing = sorted(set(hf_names) - set(tensors))
    unexpected = sorted(set(tensors) - set(hf_names))
    if missing or unexpected:
        parts = ([f"missing tensors {missing}"] if missing else []) + \
                ([f"unexpected tensors {unexpected}"] if unexpected else [])
        raise WeightsError(f"the weights in {folder} do not fit its config.json: " + "; ".join(parts))
    embed = tensors[embed_hf]
    if tuple(embed.shape) != (config.vocab_size, config.hidden):
        raise WeightsError(f"{folder}: {embed_hf} is {tuple(embed.shape)}, the config says "
                           f"({config.vocab_size}, {config.hidden})")
    state = {hf_names[name]: tensor for name, tensor in tensors.items()}
    state["embed_tokens.weight"] = grow_rows(embed, vocab_rows)
    if config.tie_embeddings:
        state["language.lm_head.weight"] = state["embed_tokens.weight"]
    else:
        state["language.lm_head.weight"] = grow_rows(state["language.lm_head.weight"], vocab_rows)
    return state


def load_pretrained_lm(path: str | Path, context: int = 2048) -> PretrainedLM:
    """A causal LM folder of a registered family as config, tokenizer and weights for the fusion model.

    ``context`` is the longest sequence vledge will give the LM (a sliding window shorter than it is refused).
    """
    from vledge.hf.tokenizer import adapt_tokenizer

    folder = local_folder(path, "language model")
    config_json = read_config_json(folder)
    where = str(folder / "config.json")
    family = language_family_for_hf(config_json, where)
    config = family.from_hf_config(config_json, where, context)
    from vledge.families.size import check_fits_memory

    check_fits_memory(family.parameter_count(config), where)
    files = weight_files(folder)
    hf_tensors = read_safetensors(files)
    adapted = adapt_tokenizer(folder)
    original = config.vocab_size
    rows = max(original, adapted.tokenizer.vocab_size)
    state = lm_state_from_hf(config, hf_tensors, folder, rows)
    check_weight_values(state, folder)
    source = with_stop_ids(source_record(folder, config_json, files), folder, config_json, adapted.tokenizer.eos_id)
    config = replace(config, vocab_size=rows, source=source)
    log.info("loaded %s from %s: %d layers, hidden %d, %d/%d heads, vocab %d (+%d added tokens)",
             config.source["architecture"], folder, config.layers, config.hidden, config.heads,
             config.key_value_heads, original, len(adapted.added_ids))
    return PretrainedLM(config=config, tokenizer=adapted.tokenizer, special_tokens=adapted.roles,
                        prompt=adapted.prompt, state_dict=state, original_vocab_size=original)
