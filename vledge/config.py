"""Dataclass configs that flow explicitly from presets to models, training and export.

Everything here is torch-free and round-trips through plain dicts, because the
checkpoint stores configs as plain containers (``torch.load(weights_only=True)``)
and the exported manifest stores them as JSON.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

from vledge.errors import ConfigError


def _require_positive(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"{owner}.{name} must be a positive finite number, got {value!r}")


def _require_finite(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise ConfigError(f"{owner}.{name} must be finite, got {value!r}")

VISION_BACKBONES = ("convnet", "resnet18", "mobilenet_v3_small", "efficientnet_b0")
PROJECTORS = ("linear", "mlp2x_gelu")
LANGUAGE_MODELS = ("transformer", "lstm")


@dataclass
class VisionConfig:
    backbone: str = "convnet"
    # Channel widths of the plain 3x3 conv stages (convnet only); each stage halves H and W.
    widths: tuple[int, ...] = (32, 64, 128)
    # convnet only: add a linear embedding of each raw pixel patch to its visual token
    patch_shortcut: bool = False
    # Adaptive-average-pool the feature grid to (rows, cols) visual tokens; None keeps the grid.
    token_grid: tuple[int, int] | None = None
    # torchvision weights name (e.g. "IMAGENET1K_V1"), used only when already in the torch cache.
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if self.backbone not in VISION_BACKBONES:
            raise ConfigError(f"unknown vision backbone {self.backbone!r}; choose from {VISION_BACKBONES}")
        if not self.widths:
            raise ConfigError("VisionConfig.widths must name at least one stage")
        _require_positive("VisionConfig", **{f"widths[{i}]": w for i, w in enumerate(self.widths)})
        if self.token_grid is not None:
            if len(self.token_grid) != 2:
                raise ConfigError(f"VisionConfig.token_grid must be (rows, cols), got {self.token_grid!r}")
            _require_positive("VisionConfig", token_grid_rows=self.token_grid[0], token_grid_cols=self.token_grid[1])


@dataclass
class ProjectorConfig:
    kind: str = "mlp2x_gelu"
    # LayerNorm on the projected visual tokens: keeps them at a fixed scale (norm ~sqrt(hidden))
    # instead of growing with the vision encoder's activations during training.
    norm: bool = False
    # A learned embedding per visual token (its grid cell), added after the projector. The language
    # model's own position embeddings are tiny next to loud visual tokens, so without it the model
    # can hardly tell which cell a visual token comes from ("what is at the top left?").
    positions: bool = False

    def __post_init__(self) -> None:
        if self.kind not in PROJECTORS:
            raise ConfigError(f"unknown projector {self.kind!r}; choose from {PROJECTORS}")


@dataclass
class LanguageConfig:
    kind: str = "transformer"
    hidden: int = 256
    layers: int = 4
    heads: int = 4  # transformer only
    max_positions: int = 256  # transformer only: learned absolute positions
    dropout: float = 0.0
    vocab_size: int = 0  # filled in from the tokenizer

    def __post_init__(self) -> None:
        if self.kind not in LANGUAGE_MODELS:
            raise ConfigError(f"unknown language model {self.kind!r}; choose from {LANGUAGE_MODELS}")
        _require_positive("LanguageConfig", hidden=self.hidden, layers=self.layers, heads=self.heads,
                          max_positions=self.max_positions)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LanguageConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.vocab_size < 0:
            raise ConfigError(f"LanguageConfig.vocab_size must not be negative, got {self.vocab_size}")
        if self.kind == "transformer" and self.hidden % self.heads:
            raise ConfigError(f"hidden size {self.hidden} is not divisible by {self.heads} heads")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class PreprocessSpec:
    """How a decoded RGB image becomes the model's pixel tensor; the runtime follows it exactly."""

    image_size: int = 64
    # "shortest_edge_center_crop": resize the short side to image_size, crop the centre square.
    # "squash": resize both sides to image_size, ignoring aspect ratio.
    resize: str = "shortest_edge_center_crop"
    interpolation: str = "bilinear"  # antialiased when downscaling
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        if self.resize not in ("shortest_edge_center_crop", "squash"):
            raise ConfigError(f"unknown resize mode {self.resize!r}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ConfigError(f"unknown interpolation {self.interpolation!r}")
        if self.image_size < 8:
            raise ConfigError(f"image_size must be at least 8, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"PreprocessSpec.mean and std need 3 values each, got {self.mean!r} and {self.std!r}")
        _require_finite("PreprocessSpec", **{f"mean[{i}]": m for i, m in enumerate(self.mean)})
        _require_positive("PreprocessSpec", **{f"std[{i}]": v for i, v in enumerate(self.std)})
        if self.channel_order not in ("RGB", "BGR"):
            raise ConfigError(f"PreprocessSpec.channel_order must be RGB or BGR, got {self.channel_order!r}")


@dataclass
class PromptTemplate:
    """A chat layout: [bos] system user [image]\\n question assistant answer [eos] user ..."""

    system: str = ""
    user: str = "USER: "
    assistant: str = " ASSISTANT:"
    answer_prefix: str = " "
    image_separator: str = "\n"


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    prompt: PromptTemplate = field(default_factory=PromptTemplate)
    tokenizer_vocab_size: int = 1024

    def __post_init__(self) -> None:
        _require_positive("ModelConfig", tokenizer_vocab_size=self.tokenizer_vocab_size)


@dataclass
class StageConfig:
    """One training stage: what is trained, on which conversation tasks, for what share of steps."""

    name: str = "instruct"
    trainable: tuple[str, ...] = ("vision", "projector", "language")
    tasks: tuple[str, ...] | None = None  # None: every task
    fraction: float = 1.0
    lr: float | None = None  # None: TrainConfig.lr

    def __post_init__(self) -> None:
        unknown = set(self.trainable) - {"vision", "projector", "language"}
        if unknown:
            raise ConfigError(f"stage {self.name!r}: unknown trainable parts {sorted(unknown)}")
        if not self.trainable:
            raise ConfigError(f"stage {self.name!r} trains nothing")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"stage {self.name!r}: fraction must be in (0, 1], got {self.fraction}")
        if self.lr is not None:
            _require_positive(f"stage {self.name!r}", lr=self.lr)


# More optimizer steps than any run could take; a bound keeps schedules and ETAs finite.
MAX_STEPS = 100_000_000


@dataclass
class TrainConfig:
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-4
    # The vision encoder and projector learn from scratch far faster at a higher rate than the
    # language model tolerates; None uses ``lr`` for every part.
    vision_lr: float | None = 3e-3
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 50
    max_steps: int = 4000  # with --minutes, whichever runs out first ends the run
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_samples: int = 256  # validation questions answered by generation at each evaluation
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16
    max_seq_len: int = 256
    turns_per_example: int | None = 1  # None: whole conversations
    # Run the language model on two pieces of each batch, short and long examples, when that saves
    # padding (a few detailed descriptions among one-word answers); the loss is the whole batch's.
    split_by_length: bool = True
    threads: int | None = None
    stages: tuple[StageConfig, ...] = (
        StageConfig(name="align", tasks=("caption",), fraction=0.1),
        StageConfig(name="instruct", fraction=0.9),
    )

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"unknown precision {self.precision!r}; choose auto, fp32 or bf16")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "log_every", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps > MAX_STEPS:
            raise ConfigError(f"max_steps must be at most {MAX_STEPS:,}, got {self.max_steps:,}")
        _require_positive("TrainConfig", lr=self.lr, grad_clip=self.grad_clip)
        if self.vision_lr is not None:
            _require_positive("TrainConfig", vision_lr=self.vision_lr)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"TrainConfig.weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.eval_samples < 0:
            raise ConfigError(f"TrainConfig.eval_samples must not be negative, got {self.eval_samples}")
        if self.warmup_steps < 0:
            raise ConfigError(f"TrainConfig.warmup_steps must not be negative, got {self.warmup_steps}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"TrainConfig.threads must be at least 1, got {self.threads}")
        if not self.stages:
            raise ConfigError("TrainConfig.stages must name at least one stage")


# --------------------------------------------------------------------------- presets


def _transformer(hidden: int, layers: int, heads: int, max_positions: int = 256) -> LanguageConfig:
    return LanguageConfig(kind="transformer", hidden=hidden, layers=layers, heads=heads, max_positions=max_positions)


PRESETS: dict[str, typing.Callable[[], tuple[ModelConfig, TrainConfig]]] = {
    "tiny": lambda: (
        ModelConfig(
            vision=VisionConfig(backbone="convnet", widths=(8, 16), token_grid=(4, 4)),
            projector=ProjectorConfig("mlp2x_gelu"),
            language=_transformer(hidden=32, layers=2, heads=2, max_positions=128),
            preprocess=PreprocessSpec(image_size=32),
            tokenizer_vocab_size=320,
        ),
        TrainConfig(batch_size=8, lr=2e-3, vision_lr=4e-3, warmup_steps=5, max_steps=40, eval_every=20,
                    eval_samples=16, log_every=5, max_seq_len=128),
    ),
    "small": lambda: (
        ModelConfig(
            # 48 px through four stride-2 stages: a 3x3 grid of visual tokens
            vision=VisionConfig(backbone="convnet", widths=(32, 64, 128, 256), patch_shortcut=True),
            # Normalised visual tokens with a learned per-cell embedding: the language model can tell
            # which cell a token describes (with `vledge pretrain-vision`: 44.5% -> 73.9% structured).
            projector=ProjectorConfig("mlp2x_gelu", norm=True, positions=True),
            language=_transformer(hidden=128, layers=4, heads=4),
            preprocess=PreprocessSpec(image_size=48),
            tokenizer_vocab_size=1024,
        ),
        TrainConfig(),
    ),
    "base": lambda: (
        ModelConfig(
            vision=VisionConfig(backbone="resnet18", token_grid=None),
            projector=ProjectorConfig("mlp2x_gelu"),
            language=_transformer(hidden=512, layers=8, heads=8, max_positions=512),
            preprocess=PreprocessSpec(image_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
            tokenizer_vocab_size=8192,
        ),
        TrainConfig(batch_size=32, lr=5e-4, vision_lr=None, warmup_steps=200, max_steps=20000, eval_every=1000,
                    max_seq_len=512),
    ),
    "seed-lstm": lambda: (
        ModelConfig(
            vision=VisionConfig(backbone="resnet18", token_grid=(1, 1)),
            projector=ProjectorConfig("linear"),
            language=LanguageConfig(kind="lstm", hidden=512, layers=1),
            preprocess=PreprocessSpec(image_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
            tokenizer_vocab_size=4096,
        ),
        TrainConfig(batch_size=32, lr=1e-3, vision_lr=None, warmup_steps=100, max_steps=5000, eval_every=500),
    ),
    "tiny-lstm": lambda: (
        ModelConfig(
            vision=VisionConfig(backbone="convnet", widths=(8, 16), token_grid=(2, 2)),
            projector=ProjectorConfig("linear"),
            language=LanguageConfig(kind="lstm", hidden=32, layers=2),
            preprocess=PreprocessSpec(image_size=32),
            tokenizer_vocab_size=320,
        ),
        TrainConfig(batch_size=8, lr=2e-3, vision_lr=4e-3, warmup_steps=5, max_steps=40, eval_every=20,
                    eval_samples=16, log_every=5, max_seq_len=128),
    ),
}


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    """Fresh copies of a named configuration (tiny, small, base, seed-lstm, tiny-lstm)."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
    return factory()


# --------------------------------------------------------------------------- dict round trip


def to_dict(config: typing.Any) -> dict:
    """A plain-container copy (lists, not tuples) fit for JSON and weights-only checkpoints."""

    def plain(value: typing.Any) -> typing.Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def from_dict(cls: type, data: typing.Mapping) -> typing.Any:
    """Rebuild a dataclass from ``to_dict`` output, rejecting unknown keys by name."""
    if not isinstance(data, typing.Mapping):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    kwargs = {key: _coerce(hints[key], value, f"{cls.__name__}.{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def _coerce(hint: typing.Any, value: typing.Any, where: str) -> typing.Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where) if len(inner) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {type(value).__name__} {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected text, got {type(value).__name__} {value!r}")
    return value
