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

from vledge.config_fields import (  # noqa: F401 (re-exported)
    from_dict,
    require_at_most,
    require_finite,
    require_positive,
    to_dict,
)
from vledge.bounds import check_train_counts
from vledge.config_preprocess import (  # noqa: F401 (re-exported: PreprocessSpec is part of every ModelConfig)
    INTERPOLATIONS,
    PASS_ORDERS,
    TILE_RESAMPLES,
    ImageTiles,
    PreprocessSpec,
)
from vledge.errors import ConfigError
from vledge.families import language_family, vision_family
from vledge.families.hf_config import MAX_HEADS, MAX_IMAGE_SIZE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH

VIT_ACTIVATIONS = ("quick_gelu", "gelu_pytorch_tanh", "gelu")
VIT_SELECT = ("default", "full")
VIT_REDUCTIONS = ("avg_pool_2x2", "pixel_shuffle_2x2")
PROJECTORS = ("linear", "mlp2x_gelu", "pixel_shuffle")


@dataclass
class ViTConfig:
    """A CLIP or SigLIP vision transformer (the numbers of its Hugging Face ``vision_config``)."""

    family: str = "clip"
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    patch_size: int = 16
    image_size: int = 224
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # Hidden states whose tokens become visual tokens (LLaVA's vision_feature_layer): index 0 is
    # the embeddings, i the output of block i, negative counts from the last block; several are
    # concatenated along the feature axis.
    feature_layers: tuple[int, ...] = (-2,)
    # "default" drops the first token (CLIP's class token), "full" keeps every token.
    select: str = "default"
    # Optional 2x2 token reduction for edge use: average pooling, or pixel shuffle (4x wider tokens).
    reduction: str | None = None
    # Apply the tower's final LayerNorm to the chosen hidden states (SigLIP's last_hidden_state).
    post_norm: bool = False

    def __post_init__(self) -> None:
        if vision_family(self.family).config_field != "vit":
            raise ConfigError(f"vision family {self.family!r} is not a vision transformer")
        if self.hidden_act not in VIT_ACTIVATIONS:
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} is not supported; choose from {VIT_ACTIVATIONS}")
        if self.select not in VIT_SELECT:
            raise ConfigError(f"vision_feature_select_strategy {self.select!r} is not supported; choose from {VIT_SELECT}")
        if self.reduction is not None and self.reduction not in VIT_REDUCTIONS:
            raise ConfigError(f"unknown token reduction {self.reduction!r}; choose from {VIT_REDUCTIONS}")
        require_at_most("ViTConfig", hidden=(self.hidden, MAX_WIDTH), layers=(self.layers, MAX_LAYERS),
                        heads=(self.heads, MAX_HEADS), intermediate=(self.intermediate, MAX_WIDTH),
                        image_size=(self.image_size, MAX_IMAGE_SIZE), patch_size=(self.patch_size, MAX_IMAGE_SIZE))
        if min(self.hidden, self.layers, self.heads, self.intermediate, self.patch_size) < 1 or self.hidden % self.heads:
            raise ConfigError(f"vision transformer: hidden {self.hidden} must be a positive multiple of heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not self.feature_layers:
            raise ConfigError("vision_feature_layer names no layer")
        for layer in self.feature_layers:
            if not -self.layers - 1 <= layer <= self.layers:
                raise ConfigError(f"vision_feature_layer {layer} is outside the tower's {self.layers} layers")
        if self.reduction is not None:
            side = math.isqrt(self.tokens_before_reduction)
            if side * side != self.tokens_before_reduction or side % 2:
                raise ConfigError(f"token reduction {self.reduction!r} needs an even square grid of tokens, got "
                                  f"{self.tokens_before_reduction} (select {self.select!r})")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_before_reduction(self) -> int:
        tokens = self.grid * self.grid + (1 if vision_family(self.family).class_token else 0)
        return tokens - 1 if self.select == "default" else tokens

    @property
    def num_tokens(self) -> int:
        return self.tokens_before_reduction // 4 if self.reduction else self.tokens_before_reduction

    @property
    def out_features(self) -> int:
        width = self.hidden * len(self.feature_layers)
        return width * 4 if self.reduction == "pixel_shuffle_2x2" else width


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
    # clip / siglip only: the vision transformer's architecture
    vit: ViTConfig | None = None

    def __post_init__(self) -> None:
        family = vision_family(self.backbone)  # ConfigError naming the known backbones
        if family.config_field == "vit":
            if self.vit is None or self.vit.family != self.backbone:
                raise ConfigError(f"vision backbone {self.backbone!r} needs its vit config (family {self.backbone!r})")
            if self.token_grid is not None:
                raise ConfigError("token_grid applies to CNN backbones; a vision transformer uses vit.reduction")
        if not self.widths:
            raise ConfigError("VisionConfig.widths must name at least one stage")
        require_positive("VisionConfig", **{f"widths[{i}]": w for i, w in enumerate(self.widths)})
        require_at_most("VisionConfig", stages=(len(self.widths), MAX_LAYERS),
                        **{f"widths[{i}]": (w, MAX_WIDTH) for i, w in enumerate(self.widths)})
        if self.token_grid is not None:
            if len(self.token_grid) != 2:
                raise ConfigError(f"VisionConfig.token_grid must be (rows, cols), got {self.token_grid!r}")
            require_positive("VisionConfig", token_grid_rows=self.token_grid[0], token_grid_cols=self.token_grid[1])
        family.check(self)


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
    # pixel_shuffle (Idefics3's connector): each scale x scale block of visual tokens becomes one token
    # scale**2 as wide, then one bias-free linear map to the language model's width.
    scale_factor: int = 1

    def __post_init__(self) -> None:
        if self.kind not in PROJECTORS:
            raise ConfigError(f"unknown projector {self.kind!r}; choose from {PROJECTORS}")
        if isinstance(self.scale_factor, bool) or not isinstance(self.scale_factor, int) or \
                not 1 <= self.scale_factor <= 16:
            raise ConfigError(f"ProjectorConfig.scale_factor must be an integer 1..16, got {self.scale_factor!r}")
        if self.scale_factor != 1 and self.kind != "pixel_shuffle":
            raise ConfigError(f"ProjectorConfig.scale_factor applies to the pixel_shuffle projector only, not "
                              f"{self.kind!r}")
        if self.kind == "pixel_shuffle" and (self.norm or self.positions):
            raise ConfigError("the pixel_shuffle projector takes neither norm nor positions")


# Fields the flat language config of earlier releases wrote for every family, with the values they had when
# unused: a checkpoint or manifest from then still reads, as long as a field that does not apply holds that value.
_FLAT_DEFAULTS = {"kv_heads": 0, "intermediate": 0, "attention_head_dim": 0, "rope_theta": 10000.0,
                  "rope_scaling": None, "rms_norm_eps": 1e-6, "tie_embeddings": False, "qkv_bias": False}


@dataclass
class LanguageConfig:
    """The numbers every language model family has; each family's own config derives from it.

    ``kind`` names the family (``vledge.families``); the family's module defines the class that adds its own fields
    (``LlamaConfig``'s rotary settings, say). Built through that class: ``language_config(kind, **numbers)``.
    """

    kind: str = "transformer"
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    max_positions: int = 256  # learned absolute positions, or the rotary models' context length
    dropout: float = 0.0
    vocab_size: int = 0  # filled in from the tokenizer
    tie_embeddings: bool = False  # the LM head shares the token embedding matrix
    # Where pretrained weights came from: folder, architecture, config.json, weight files' sha256.
    source: dict | None = None

    def __post_init__(self) -> None:
        family = language_family(self.kind)
        if not isinstance(self, family.config_class):
            raise ConfigError(f"a {self.kind!r} language model is configured by {family.config_class.__name__}, "
                              f"not {type(self).__name__}")
        require_positive(type(self).__name__, hidden=self.hidden, layers=self.layers, heads=self.heads,
                         max_positions=self.max_positions)
        require_at_most(type(self).__name__, hidden=(self.hidden, MAX_WIDTH), layers=(self.layers, MAX_LAYERS),
                        heads=(self.heads, MAX_HEADS), max_positions=(self.max_positions, MAX_POSITIONS),
                        vocab_size=(self.vocab_size, MAX_VOCAB))
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LanguageConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.vocab_size < 0:
            raise ConfigError(f"LanguageConfig.vocab_size must not be negative, got {self.vocab_size}")

    @property
    def family(self):
        return language_family(self.kind)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def key_value_heads(self) -> int:
        """Heads of the key/value cache (fewer than ``heads`` under grouped-query attention)."""
        return self.heads

    @property
    def has_kv_cache(self) -> bool:
        """True for attention LMs (past_key_values in and present out); False for a recurrent state."""
        return self.family.has_kv_cache

    @classmethod
    def __from_plain__(cls, data: typing.Mapping) -> LanguageConfig:
        """The family's own config class from a plain dict (``to_dict`` output, or an earlier release's flat one)."""
        if not isinstance(data, typing.Mapping):
            raise ConfigError(f"LanguageConfig: expected a mapping, got {type(data).__name__}")
        kind = data.get("kind", "transformer")
        if not isinstance(kind, str):
            raise ConfigError(f"LanguageConfig.kind: expected text, got {type(kind).__name__} {kind!r}")
        target = language_family(kind).config_class
        names = {f.name for f in dataclasses.fields(target)}
        kept = {}
        for key, value in data.items():
            if key in names:
                kept[key] = value
            elif key in _FLAT_DEFAULTS and value == _FLAT_DEFAULTS[key]:
                continue  # an earlier release's flat config: a field of another family, unused
            else:
                raise ConfigError(f"{target.__name__}: field {key!r} does not apply to a {kind!r} language model")
        return from_dict(target, kept)


def language_config(kind: str, **numbers) -> LanguageConfig:
    """A language config of the family ``kind`` (its own class, with its own fields)."""
    try:
        return language_family(kind).config_class(kind=kind, **numbers)
    except TypeError as exc:
        raise ConfigError(f"{kind} language model: {exc}") from None


@dataclass
class PromptTemplate:
    """A chat layout: [bos] system user [image]\\n question assistant answer [eos] user ..."""

    system: str = ""
    user: str = "USER: "
    assistant: str = " ASSISTANT:"
    answer_prefix: str = " "
    image_separator: str = "\n"
    # Text after an answer's end token and before the next turn's ``user`` (a chat template's newline).
    turn_separator: str = ""


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=lambda: language_config("transformer"))
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    prompt: PromptTemplate = field(default_factory=PromptTemplate)
    tokenizer_vocab_size: int = 1024
    # Role ("pad", "bos", "eos", "unk", "image") -> token text in tokenizer.json; None: vledge's own
    # names (<pad>, <s>, </s>, <unk>, <image>). A pretrained LM's tokenizer names its own; no "bos"
    # means no token is put before the prompt.
    special_tokens: dict[str, str] | None = None

    def __post_init__(self) -> None:
        require_positive("ModelConfig", tokenizer_vocab_size=self.tokenizer_vocab_size)


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
            require_positive(f"stage {self.name!r}", lr=self.lr)


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
        require_positive("TrainConfig", lr=self.lr, grad_clip=self.grad_clip)
        if self.vision_lr is not None:
            require_positive("TrainConfig", vision_lr=self.vision_lr)
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
        check_train_counts(self.grad_accum, self.threads)
        if not self.stages:
            raise ConfigError("TrainConfig.stages must name at least one stage")


# --------------------------------------------------------------------------- presets


def _transformer(hidden: int, layers: int, heads: int, max_positions: int = 256) -> LanguageConfig:
    return language_config("transformer", hidden=hidden, layers=layers, heads=heads, max_positions=max_positions)


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
            language=language_config("lstm", hidden=512, layers=1),
            preprocess=PreprocessSpec(image_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
            tokenizer_vocab_size=4096,
        ),
        TrainConfig(batch_size=32, lr=1e-3, vision_lr=None, warmup_steps=100, max_steps=5000, eval_every=500),
    ),
    "tiny-lstm": lambda: (
        ModelConfig(
            vision=VisionConfig(backbone="convnet", widths=(8, 16), token_grid=(2, 2)),
            projector=ProjectorConfig("linear"),
            language=language_config("lstm", hidden=32, layers=2),
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
