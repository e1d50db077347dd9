"""Training with a pretrained language model: its config, tokenizer and weights, LoRA, stage freezing.

LLaVA's recipe: the ``align`` stage trains the projector into the LM's embedding space with the LM
frozen; ``instruct`` tunes the LM too (fully, or through LoRA adapters merged into the weights
whenever a checkpoint is written, so a checkpoint is always a plain model).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from vledge.checkpoint import load_checkpoint
from vledge.config import ModelConfig, StageConfig
from vledge.errors import CheckpointError, ConfigError
from vledge.hf.language_model import PretrainedLM, load_pretrained_lm
from vledge.models.lora import LoRAOptions, adapter_state, add_lora, merged_state_dict, unmerge_into

log = logging.getLogger(__name__)

# Stages that keep a pretrained LM fixed whatever they list as trainable.
LM_FROZEN_STAGES = ("align",)


def with_language_model(model_config: ModelConfig, lm: PretrainedLM) -> ModelConfig:
    """The preset's vision side and projector around the pretrained LM (whose hidden size the projector meets)."""
    return replace(model_config, language=lm.config, prompt=lm.prompt, special_tokens=lm.special_tokens)


def prepare_language(model_config: ModelConfig, language_model: Path | None, init: Path | None,
                     context: int) -> tuple[ModelConfig, PretrainedLM | None]:
    """The run's model config and, with ``language_model``, the loaded LM.

    An ``--init`` checkpoint that holds a pretrained LM brings that LM's config along, so its
    weights fit without naming the folder again.
    """
    if language_model is not None:
        lm = load_pretrained_lm(language_model, context=context)
        return with_language_model(model_config, lm), lm
    if init is not None:
        held = load_checkpoint(init).model_config
        if held.language.source is not None:
            return replace(model_config, language=held.language, prompt=held.prompt,
                           special_tokens=held.special_tokens), None
    return model_config, None


def is_pretrained(model_config: ModelConfig) -> bool:
    return model_config.language.source is not None


def stage_trainable(stage: StageConfig, model_config: ModelConfig) -> tuple[str, ...]:
    """The parts a stage trains: a pretrained LM stays frozen in ``align``."""
    if is_pretrained(model_config) and stage.name in LM_FROZEN_STAGES:
        return tuple(part for part in stage.trainable if part != "language")
    return stage.trainable


def load_language_weights(model: nn.Module, lm: PretrainedLM) -> None:
    result = model.load_state_dict(lm.state_dict, strict=False)
    not_loaded = [k for k in result.missing_keys if k.startswith(("language.", "embed_tokens."))]
    if result.unexpected_keys or not_loaded:
        raise CheckpointError(f"the language model's weights do not fit the fusion model: missing {not_loaded}, "
                              f"unexpected {result.unexpected_keys}")


def attach_lora(model: nn.Module, options: LoRAOptions | None, adapters: dict[str, Any] | None = None) -> None:
    """Adapters on the LM's projections; ``adapters`` (a resumed run's) restore them exactly."""
    if options is None:
        return
    if not model.config.language.family.lora:
        raise ConfigError("LoRA adapters need a pretrained language model (--language-model)")
    count = add_lora(model.language, options)
    if adapters:
        unmerge_into(model, adapters)
    log.info("LoRA rank %d (alpha %g, dropout %g) on %d layers", options.rank, options.alpha, options.dropout, count)


def lora_adapters(model: nn.Module) -> dict[str, Any]:
    """The adapters alone (empty without LoRA), for resuming a run whose checkpoints hold merged weights."""
    return {k: v.detach().cpu() for k, v in adapter_state(model).items()}


def saved_weights(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint stores: plain weights, adapters merged in."""
    return {k: v.detach().cpu() for k, v in merged_state_dict(model).items()}
