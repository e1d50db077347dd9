"""The Llama family (Llama 2/3, SmolLM2, TinyLlama): RMSNorm, rotary positions, grouped-query attention, SwiGLU.

Qwen2 and Mistral derive from it (``vledge.families.qwen2``, ``vledge.families.mistral``), overriding only what
differs. The torch module is ``vledge.models.llama.LlamaLM``, whose parameter names are Hugging Face's without the
``model.`` prefix, so the tensor-name mapping is a prefix change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from vledge.config import LanguageConfig, require_at_most
from vledge.errors import ConfigError
from vledge.families.base import LanguageFamily
from vledge.families.hf_config import (MAX_HEAD_DIM, MAX_HEADS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH,
                                        HFConfig)

# Rotary scalings vledge implements ("default" is none).
ROPE_SCALINGS = ("default", "linear", "llama3")
# What each scaling needs besides its type.
_ROPE_NUMBERS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                   "original_max_position_embeddings")}
MLP_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")


@dataclass
class LlamaConfig(LanguageConfig):
    kind: str = "llama"
    kv_heads: int = 0  # grouped-query attention: key/value heads; 0 means ``heads``
    intermediate: int = 0  # SwiGLU MLP width
    attention_head_dim: int = 0  # 0 means hidden // heads
    rope_theta: float = 10000.0
    # None or Hugging Face's rope_scaling mapping: {"rope_type": "linear"|"llama3", "factor": ..., ...}
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.attention_head_dim and self.hidden % self.heads:
            raise ConfigError(f"hidden size {self.hidden} is not divisible by {self.heads} heads")
        if self.kv_heads < 0 or self.heads % self.key_value_heads:
            raise ConfigError(f"{self.heads} attention heads are not a multiple of {self.key_value_heads} "
                              "key/value heads")
        if self.intermediate < 1:
            raise ConfigError(f"a {self.kind} language model needs its MLP width (intermediate)")
        require_at_most(type(self).__name__, kv_heads=(self.kv_heads, MAX_HEADS),
                        intermediate=(self.intermediate, MAX_WIDTH), attention_head_dim=(self.attention_head_dim,
                                                                                         MAX_HEAD_DIM))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ConfigError(f"rope_scaling must be a mapping, got {type(self.rope_scaling).__name__}")
        if self.rope_type not in ROPE_SCALINGS:
            raise ConfigError(f"rope type {self.rope_type!r} is not supported (vledge implements "
                              f"{', '.join(ROPE_SCALINGS)})")
        for number in _ROPE_NUMBERS.get(self.rope_type, ()):
            value = (self.rope_scaling or {}).get(number)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"rope_scaling {self.rope_type!r} needs a positive number {number}, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden // self.heads

    @property
    def key_value_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        return str(scaling.get("rope_type", scaling.get("type", "default")))


class LlamaFamily(LanguageFamily):
    name = "llama"
    config_class = LlamaConfig
    cache = "kv"
    # residual + RMSNorm fusion and packed q/k/v and gate/up projections (vledge.export.llama_fusion), after the
    # attention was exported as ONNX Runtime's GroupQueryAttention (vledge.export.gqa)
    decoder_fusions = ("llama",)
    attention_op = "GroupQueryAttention"
    # int8 decoder as 8-bit weight-only MatMulNBits (block 32, symmetric): on SmolLM2-135M it tracked fp32 far
    # closer than dynamic MatMulInteger and ran faster (vledge.export.quantize.quantize_decoder_int8_weight_only)
    int8_weights = "matmulnbits"
    # The head is vocab x hidden (49152 x 576 for SmolLM2-135M): in float it is as large as all the 4-bit layers
    # together and dominates a q4 step, so q4 stores it 8-bit (int8 or float keep the head's accuracy).
    q4_head_bits = 8
    # 4-bit as min/max blocks of 32 with their exact offset (llama.cpp's Q4_1 grid): on SmolLM2-135M-Instruct it kept
    # 94.9 % top-1 and perplexity within 0.4 % of fp32 where ONNX Runtime's packer kept 57-66 % (docs/results.md)
    q4_scheme = "minmax"
    lora = True
    transformers_js = True
    hf_architectures = ("LlamaForCausalLM",)
    hf_model_types = ("llama",)
    mlp_activation: ClassVar[str] = "silu"
    # Llama's config may ask for biases vledge's module does not have (Qwen2's q/k/v biases are its own field).
    refuse_attention_bias: ClassVar[bool] = True
    # A sliding attention window: None (none), "always" (Mistral: sliding_window applies whenever set) or
    # "opt_in" (Qwen2: only with use_sliding_window). A window shorter than the context is refused.
    sliding_window: ClassVar[str | None] = None
    # transformers' config class defaults for the keys a saved config.json may leave out
    hf_defaults: ClassVar[dict[str, Any]] = {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "hidden_act": "silu",
    }

    def module(self, config: LlamaConfig):
        from vledge.models.llama import LlamaLM

        return LlamaLM(config, activation=self.mlp_activation)

    def architecture_facts(self, config: LlamaConfig) -> dict[str, Any]:
        return {**super().architecture_facts(config), "rope_theta": config.rope_theta,
                "rope_scaling": config.rope_scaling, "intermediate": config.intermediate,
                "tie_embeddings": config.tie_embeddings,
                "source_architecture": (config.source or {}).get("architecture")}

    def parameter_count(self, config: LlamaConfig) -> int:
        hidden, dim, kv = config.hidden, config.head_dim, config.key_value_heads
        attention = hidden * dim * (2 * config.heads + 2 * kv) + (dim * (config.heads + 2 * kv) if config.qkv_bias
                                                                   else 0)
        layer = attention + 3 * hidden * config.intermediate + 2 * hidden
        head = 0 if config.tie_embeddings else config.vocab_size * hidden
        return config.layers * layer + hidden + head

    # ---------------------------------------------------------------- Hugging Face

    def check_hf_config(self, values: HFConfig, context: int) -> None:
        """ConfigError for settings of this family's config.json that vledge does not run exactly."""
        if self.refuse_attention_bias and (values.bool("attention_bias", default=False)
                                           or values.bool("mlp_bias", default=False)):
            raise ConfigError(f"{values.where}: attention_bias / mlp_bias are not supported for {self.name}")
        window = values.raw("sliding_window", None)
        applies = self.sliding_window == "always" or (
            self.sliding_window == "opt_in" and values.bool("use_sliding_window", default=False))
        if window is not None and applies and values.int("sliding_window", high=2**31) < context:
            raise ConfigError(f"{values.where}: sliding_window {window} is shorter than the context vledge uses "
                              f"({context} tokens); lower --max-seq-len to at most the window")

    def from_hf_config(self, config_json: Mapping[str, Any], where: str, context: int) -> LlamaConfig:
        values = HFConfig(config_json, where, self.hf_defaults)
        activation = values.str("hidden_act")
        if activation != self.mlp_activation:
            raise ConfigError(f"{where}: hidden_act {activation!r} is not supported for {self.name} "
                              f"(only {self.mlp_activation})")
        self.check_hf_config(values, context)
        hidden = values.int("hidden_size")
        heads = values.int("num_attention_heads", high=MAX_HEADS)
        if hidden % heads and not values.has("head_dim"):
            raise ConfigError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = values.int("head_dim", high=MAX_HEAD_DIM, default=hidden // heads)
        # transformers 5 writes rope_parameters (rope_theta inside); 4.x rope_theta and rope_scaling.
        key = "rope_parameters" if values.has("rope_parameters") else "rope_scaling"
        rope = values.mapping(key, default=None) or {}
        theta = rope.pop("rope_theta", None)
        if values.has("rope_theta") or theta is None:
            theta = values.float("rope_theta", positive=True, default=10000.0)
        elif isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            raise ConfigError(f"{where}: {key}.rope_theta must be a positive number, got {theta!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if not isinstance(rope_type, str):
            raise ConfigError(f"{where}: {key}.rope_type must be text, got {rope_type!r}")
        if rope_type == "default":
            rope = {}
        elif rope_type not in ROPE_SCALINGS:
            raise ConfigError(f"{where}: rope type {rope_type!r} is not supported (vledge implements "
                              f"{', '.join(ROPE_SCALINGS)})")
        try:
            return self.config_class(
                kind=self.name, hidden=hidden, layers=values.int("num_hidden_layers", high=MAX_LAYERS),
                heads=heads, kv_heads=values.int("num_key_value_heads", high=MAX_HEADS, default=heads),
                intermediate=values.int("intermediate_size"),
                attention_head_dim=head_dim if head_dim != hidden // heads else 0,
                max_positions=values.int("max_position_embeddings", high=MAX_POSITIONS, default=context),
                rope_theta=float(theta), rope_scaling=rope or None,
                rms_norm_eps=values.float("rms_norm_eps", positive=True),
                tie_embeddings=values.bool("tie_word_embeddings"),
                vocab_size=values.int("vocab_size", high=MAX_VOCAB),
            )
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_hf_config(self, config: LlamaConfig) -> dict[str, Any]:
        return {
            "vocab_size": config.vocab_size, "hidden_size": config.hidden, "intermediate_size": config.intermediate,
            "num_hidden_layers": config.layers, "num_attention_heads": config.heads,
            "num_key_value_heads": config.key_value_heads, "head_dim": config.head_dim,
            "max_position_embeddings": config.max_positions, "rms_norm_eps": config.rms_norm_eps,
            "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
            "tie_word_embeddings": config.tie_embeddings, "hidden_act": self.mlp_activation,
        }

    def hf_tensor_name(self, name: str) -> str:
        if name == "embed_tokens.weight":
            return "model.embed_tokens.weight"
        if name == "language.lm_head.weight":
            return "lm_head.weight"
        if name.startswith("language."):
            return "model." + name[len("language."):]
        raise ConfigError(f"{name!r} is not a language model tensor")

    def hf_ignored(self, hf_name: str) -> bool:
        return hf_name.endswith(".rotary_emb.inv_freq")  # a buffer older folders saved; recomputed


FAMILY = LlamaFamily()
