"""A batch that fits the memory a run finds, for a pretrained LM, decided before the first step.

A pretrained LM's activations grow with batch x sequence x layers, and its LM head's logits with
batch x sequence x vocabulary (49,152 for SmolLM2): at the presets' batch of 32 a 135M LM needs
several GB more than the built-in models. The estimate here counts weights, gradients, AdamW's two
moments and the activations the backward pass keeps (only each layer's input under gradient
checkpointing); the batch is halved, with the accumulation steps raised so an optimizer step sees
as many examples, until the estimate fits in ``HEADROOM`` of the available memory. When even one
example does not fit, the run is refused with the numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from vledge.config import LanguageConfig, TrainConfig
from vledge.errors import TrainingError

log = logging.getLogger(__name__)

HEADROOM = 0.8  # share of the available memory a run may plan to use
FLOAT_BYTES = 4
GB = 1024 ** 3


def available_bytes(device: torch.device, meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Memory a run can still take: CUDA's free memory, or the kernel's MemAvailable (None where unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class MemoryPlan:
    batch_size: int
    grad_accum: int
    estimate_bytes: int
    available_bytes: int


def activation_bytes(language: LanguageConfig, tokens: int, checkpointing: bool) -> int:
    """Bytes the backward pass keeps for one example of ``tokens`` positions (float32)."""
    hidden = language.hidden
    intermediate = getattr(language, "intermediate", 0) or 4 * hidden  # a GPT-style MLP is 4x wide
    # norms, q/k/v/o, residuals and the MLP's gate/up/activation, plus the attention probabilities
    per_layer = FLOAT_BYTES * tokens * (14 * hidden + 4 * intermediate + 2 * language.heads * tokens)
    layers = per_layer + language.layers * FLOAT_BYTES * tokens * hidden if checkpointing else \
        per_layer * language.layers
    logits = 3 * FLOAT_BYTES * tokens * language.vocab_size  # logits, their log-softmax and its gradient
    return layers + logits


def training_bytes(model: nn.Module, language: LanguageConfig, batch: int, tokens: int, checkpointing: bool,
                   lm_trained: bool) -> int:
    """Weights, gradients and AdamW moments of what trains, and ``batch`` examples' activations."""
    total = sum(p.numel() for p in model.parameters())
    lm = sum(p.numel() for name, p in model.named_parameters() if name.startswith("language."))
    trained = total if lm_trained else total - lm
    return FLOAT_BYTES * (total + 3 * trained) + batch * activation_bytes(language, tokens, checkpointing)


def plan_batch(model: nn.Module, language: LanguageConfig, config: TrainConfig, tokens: int,
               checkpointing: bool, lm_trained: bool, available: int) -> MemoryPlan:
    """The largest batch (halving from the config's) whose estimate fits; TrainingError if one example does not."""
    budget = HEADROOM * available
    batch = config.batch_size
    examples = config.batch_size * config.grad_accum
    while True:
        estimate = training_bytes(model, language, batch, tokens, checkpointing, lm_trained)
        if estimate <= budget:
            return MemoryPlan(batch, math.ceil(examples / batch), estimate, available)
        if batch == 1:
            hint = "" if checkpointing else "--gradient-checkpointing, "
            raise TrainingError(
                f"training needs about {estimate / GB:.1f} GB at batch 1 ({tokens} positions per example), more "
                f"than {HEADROOM:.0%} of the {available / GB:.1f} GB available; try {hint}a smaller --max-seq-len "
                "or --lora")
        batch = max(1, batch // 2)


def fit_batch(model: nn.Module, language: LanguageConfig, config: TrainConfig, tokens: int, checkpointing: bool,
              lm_trained: bool, device: torch.device, available: int | None = None) -> TrainConfig:
    """``config`` with a batch that fits (and as many examples per optimizer step), saying so when it changed."""
    available = available if available is not None else available_bytes(device)
    if available is None:
        return config
    plan = plan_batch(model, language, config, tokens, checkpointing, lm_trained, available)
    if plan.batch_size == config.batch_size:
        log.info("memory: batch %d needs about %.1f GB of the %.1f GB available", plan.batch_size,
                 plan.estimate_bytes / GB, available / GB)
        return config
    log.warning("batch %d would need more than %.0f%% of the %.1f GB of memory available; training at batch %d with "
                "%d accumulation steps (about %.1f GB; the same examples per optimizer step)", config.batch_size,
                100 * HEADROOM, available / GB, plan.batch_size, plan.grad_accum, plan.estimate_bytes / GB)
    return replace(config, batch_size=plan.batch_size, grad_accum=plan.grad_accum)


def prepare_memory(model: nn.Module, config: TrainConfig, options, examples: Sequence, device: torch.device,
                   resumed: bool) -> TrainConfig:
    """Gradient checkpointing on the LM as ``options`` ask; for a new pretrained-LM run, a batch that fits.

    ``examples`` (the validation examples) give the sequence length: their longest, visual tokens included.
    """
    model.language.gradient_checkpointing = options.gradient_checkpointing
    language = model.config.language
    if resumed or language.source is None:  # a resumed run keeps its batch; the built-in LMs are small
        return config
    tokens = max((e.positions(model.num_image_tokens) for e in examples), default=config.max_seq_len)
    lm_trained = options.lora is None and "language" not in options.freeze
    return fit_batch(model, language, config, min(tokens, config.max_seq_len), options.gradient_checkpointing,
                     lm_trained, device)
