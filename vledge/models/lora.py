"""Low-rank adapters (LoRA) on a language model's linear layers, merged back into plain weights.

A LoRA layer keeps the pretrained weight as a buffer (so no optimizer or stage ever trains it)
and learns ``B @ A`` of rank r, scaled by alpha / r, with B starting at zero so training starts
from the pretrained model exactly. ``merge_lora`` folds the product into the weight and puts the
plain ``nn.Linear`` back: checkpoints, export and the runtime never see an adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vledge.errors import ConfigError

# Hugging Face's names for the attention and MLP projections of a Llama-family layer.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAOptions:
    rank: int
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("LoRA needs at least one target layer name")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, options: LoRAOptions) -> None:
        super().__init__()
        self.register_buffer("weight", base.weight.detach().clone())  # [out, in], frozen
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())
        self.lora_a = nn.Parameter(torch.empty(options.rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, options.rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A
        self.scale = options.scale
        self.dropout = nn.Dropout(options.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(self.dropout(x), self.lora_a),
                                                             self.lora_b) * self.scale

    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None,
                           device=self.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scale * (self.lora_b @ self.lora_a))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def add_lora(module: nn.Module, options: LoRAOptions) -> int:
    """Wrap every ``nn.Linear`` whose attribute name is a target; returns how many were wrapped."""
    wrapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in options.targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, options))
                wrapped += 1
    if not wrapped:
        raise ConfigError(f"no layer named {', '.join(options.targets)} to put LoRA adapters on")
    return wrapped


def merge_lora(module: nn.Module) -> None:
    """Replace every LoRA layer by the plain linear layer it now computes."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` as it would be with every adapter merged: plain names, no LoRA tensors."""
    state = {}
    for name, tensor in module.state_dict().items():
        if name.endswith((".lora_a", ".lora_b")):
            continue
        state[name] = tensor
    for name, layer in module.named_modules():
        if isinstance(layer, LoRALinear):
            state[f"{name}.weight"] = layer.weight + layer.scale * (layer.lora_b @ layer.lora_a)
    return state


def adapter_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters (for resuming a run whose checkpoint holds merged weights)."""
    return {name: tensor for name, tensor in module.state_dict().items() if name.endswith((".lora_a", ".lora_b"))}


def unmerge_into(module: nn.Module, adapters: dict[str, torch.Tensor]) -> None:
    """Load adapters into a LoRA-wrapped module whose buffers hold merged weights, and take their
    product back out of the weights, so the module computes what it did when it was saved."""
    module.load_state_dict(adapters, strict=False)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, LoRALinear):
                layer.weight -= layer.scale * (layer.lora_b @ layer.lora_a)
