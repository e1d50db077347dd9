"""A run's options and its resumable state, and their plain-data form in a checkpoint's ``train_state``.

Checkpoints are read with ``torch.load(weights_only=True)``, so both travel as plain dicts
(``dataclasses.asdict``, paths as strings) and are rebuilt, and validated again, on ``--resume``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from vledge.errors import CheckpointError, ConfigError
from vledge.models.lora import LoRAOptions

PARTS = ("vision", "projector", "language")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass(frozen=True)
class RunOptions:
    """How a run is set up beyond its model and train configs; ``--resume`` repeats them (but ``device``)."""

    stage: str | None = None  # run this stage only (given the whole run), or None: the config's stages in order
    minutes: float | None = None  # wall-time budget, or None: steps only
    freeze: tuple[str, ...] = ()  # parts kept fixed in every stage: vision, projector, language
    init: Path | None = None  # start from this checkpoint's weights and tokenizer
    vision_weights: Path | None = None  # a pretrained vision backbone (and projector) weights file
    device: str = "auto"  # auto | cpu | mps | cuda | cuda:N
    language_model: Path | None = None  # a local Hugging Face folder of a Llama-family LM to fine-tune
    lora_rank: int | None = None  # tune that LM through LoRA adapters of this rank (None: fully)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    allow_outside_paths: bool = False  # image names in the dataset may leave its folder (docs/data.md)
    gradient_checkpointing: bool = False  # recompute the LM's activations in the backward pass (less memory)

    def __post_init__(self) -> None:
        if self.stage is not None and (not isinstance(self.stage, str) or not self.stage):
            raise ConfigError(f"stage must be a stage name or None, got {self.stage!r}")
        if self.minutes is not None:
            if isinstance(self.minutes, bool) or not isinstance(self.minutes, (int, float)):
                raise ConfigError(f"minutes must be a number, got {self.minutes!r}")
            if not math.isfinite(self.minutes) or self.minutes <= 0:
                raise ConfigError(f"minutes must be above 0, got {self.minutes}")
            object.__setattr__(self, "minutes", float(self.minutes))
        if isinstance(self.freeze, str):
            raise ConfigError(f"freeze must be a sequence of part names, got the string {self.freeze!r}")
        freeze = tuple(self.freeze)
        unknown = [part for part in freeze if part not in PARTS]
        if unknown:
            raise ConfigError(f"cannot freeze {unknown}; the parts are {list(PARTS)}")
        object.__setattr__(self, "freeze", freeze)
        for name in ("init", "vision_weights", "language_model"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if self.init is not None and self.vision_weights is not None:
            raise ConfigError("--init already holds vision weights; --vision-weights cannot be combined with it")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        if not isinstance(self.allow_outside_paths, bool):
            raise ConfigError(f"allow_outside_paths must be true or false, got {self.allow_outside_paths!r}")
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"device must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")
        self.lora  # validates rank, alpha and dropout

    @property
    def lora(self) -> LoRAOptions | None:
        if self.lora_rank is None:
            return None
        return LoRAOptions(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout)

    @property
    def budget_seconds(self) -> float | None:
        return self.minutes * 60.0 if self.minutes else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint: paths as strings, tuples as lists."""
        return {name: str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
                for name, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunOptions:
        """The inverse of ``to_dict``; keys this version does not know are ignored, missing ones default."""
        known = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in data.items() if name in known})


@dataclass
class RunState:
    """Everything that must survive a restart besides weights and optimizer moments."""

    step: int = 0
    stage_index: int = 0
    stage_start_step: int = 0
    elapsed: float = 0.0
    best_metric: float = -math.inf
    best_val_loss: float = math.inf  # breaks a tie in best_metric
    best_step: int = 0  # the step ckpt.pt holds (0: none written yet)


def improves(state: RunState, metric: float, val_loss: float) -> bool:
    """Whether an evaluation beats the one ``ckpt.pt`` holds: a higher selection metric, or the same at a lower
    validation loss (a pretrained LM early in fine-tuning often scores 0% exact match twice in a row)."""
    return metric > state.best_metric or (metric == state.best_metric and val_loss < state.best_val_loss)


def encode_train_state(state: RunState, options: RunOptions, optimizer_state: dict | None = None) -> dict[str, Any]:
    """A checkpoint's ``train_state``: the run state, the run options and (``last.pt``) the optimizer."""
    train_state: dict[str, Any] = {"run": asdict(state), "options": options.to_dict()}
    if optimizer_state is not None:
        train_state["optimizer"] = optimizer_state
    return train_state


def decode_train_state(train_state: dict[str, Any], source: Path) -> tuple[RunState, RunOptions]:
    """The run state and options of a checkpoint's ``train_state``, also from files written before
    ``options`` existed (their ``budget`` in seconds, ``only_stage`` and ``freeze`` keys)."""
    try:
        state = RunState(**train_state["run"])
        if "options" in train_state:
            options = RunOptions.from_dict(train_state["options"])
        else:
            budget = train_state.get("budget")
            options = RunOptions(stage=train_state.get("only_stage"), minutes=budget / 60.0 if budget else None,
                                 freeze=tuple(train_state.get("freeze", ())))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{source} holds a training state this version cannot read: {exc!r}") from None
    except ConfigError as exc:
        raise CheckpointError(f"{source} holds invalid run options: {exc}") from None
    return state, options
