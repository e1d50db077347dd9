"""A Llama-family decoder (Llama, Qwen2, Mistral, SmolLM2) over input embeddings, with a KV cache.

The layers follow Hugging Face's definitions so that a pretrained folder's weights fit by name:
RMSNorm, rotary position embeddings (``rope_theta``; ``rope_scaling`` none, linear or llama3),
grouped-query attention (``kv_heads`` key/value heads shared by ``heads // kv_heads`` query heads),
a SwiGLU MLP and an optionally tied LM head. The forward contract is ``TransformerLM``'s: inputs_embeds,
attention_mask over past+new, position_ids, past key/values in; logits and presents out. The cache
holds the un-repeated key/value heads, [batch, kv_heads, past, head_dim], already rotated.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vledge.models.transformer import attention_bias, run_layer

if TYPE_CHECKING:  # the config's class lives in its family module, which imports this module lazily
    from vledge.families.llama import LlamaConfig

KV = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """[head_dim / 2] angular frequencies, scaled as ``rope_scaling`` says."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = config.rope_type
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by ``factor``, short ones kept, a smooth blend between.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelength < old_context / high) & ~(wavelength > old_context / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rotary_inverse_frequencies(config), persistent=False)

    def reset_buffers(self) -> None:
        """The frequencies again, on the CPU (after a meta-device build, vledge.models.vlm.materialize_buffers)."""
        self.inv_freq = rotary_inverse_frequencies(self.config)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [batch, 1, seq, head_dim] for the given positions, computed in float32."""
        angles = position_ids[:, :, None].float() * self.inv_freq[None, None, :]  # [B, S, head_dim/2]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos()[:, None].to(dtype), angles.sin()[:, None].to(dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.heads, config.key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden, self.heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden, self.kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden, self.kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden, bias=False)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                past: KV | None) -> tuple[torch.Tensor, KV]:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, S, D]
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # [B, KV, past+S, D]
            v = torch.cat([past[1], v], dim=2)
        if torch.is_grad_enabled():
            y = self._repeated_attention(q, k, v, mask)
        else:
            y = self._grouped_attention(q, k, v, mask)
        y = y.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)
        return self.o_proj(y), (k, v)

    def _repeated_attention(self, q, k, v, mask):
        """Training: each key/value head repeated for its query heads, through PyTorch's fused SDPA."""
        groups = self.heads // self.kv_heads
        k_all = k.repeat_interleave(groups, dim=1) if groups > 1 else k  # [B, H, past+S, D]
        v_all = v.repeat_interleave(groups, dim=1) if groups > 1 else v
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask,
                                              dropout_p=self.dropout if self.training else 0.0)

    def _grouped_attention(self, q, k, v, mask):
        """Inference and export: the query heads of a group attend to their shared key/value head as
        one matrix, so the cache is never copied per query head (at SmolLM2-135M's size that copy
        would move 70 MB per token at a past of 512) and the graph stays a plain MatMul-Softmax-MatMul."""
        batch, heads, seq, dim = q.shape
        groups = heads // self.kv_heads
        q = q.reshape(batch, self.kv_heads, groups * seq, dim)  # head h = kv * groups + g, as repeat_interleave
        scores = torch.matmul(q, k.transpose(2, 3)) * dim ** -0.5  # [B, KV, G*S, past+S]
        scores = scores.view(batch, self.kv_heads, groups, seq, -1) + mask[:, :, None]  # mask [B, 1, 1, S, T]
        weights = scores.softmax(dim=-1).view(batch, self.kv_heads, groups * seq, -1)
        return torch.matmul(weights, v).view(batch, heads, seq, dim)


# A gated MLP's activation by its Hugging Face name (``hidden_act``).
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "relu": F.relu}


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU with the default silu."""

    def __init__(self, config: LlamaConfig, activation: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.up_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.down_proj = nn.Linear(config.intermediate, config.hidden, bias=False)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, activation: str = "silu") -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden, config.rms_norm_eps)
        self.mlp = MLP(config, activation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                past: KV | None) -> tuple[torch.Tensor, KV]:
        attended, present = self.self_attn(self.input_layernorm(x), mask, rotary, past)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), present


class LlamaLM(nn.Module):
    """The decoder without its token embeddings (the fusion model owns those, as for every LM).

    Parameter names are Hugging Face's without the ``model.`` prefix (``layers.0.self_attn.q_proj.weight``,
    ``norm.weight``, ``lm_head.weight``), so a pretrained state dict maps over by a prefix change.
    """

    def __init__(self, config: LlamaConfig, activation: str = "silu") -> None:
        super().__init__()
        self.config = config
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(DecoderLayer(config, activation) for _ in range(config.layers))
        self.norm = RMSNorm(config.hidden, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        # Recompute each layer's activations in the backward pass instead of keeping them (training only).
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: list[KV] | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Logits [B, S, vocab] (or [B, 1, vocab] with ``last_only``) and one (key, value) per layer."""
        x = inputs_embeds
        mask = attention_bias(attention_mask, inputs_embeds.shape[1], x.dtype)
        rotary = self.rotary(position_ids, x.dtype)
        presents = []
        for index, layer in enumerate(self.layers):
            past = past_key_values[index] if past_key_values is not None else None
            x, present = run_layer(layer, self.gradient_checkpointing and self.training, x, mask, rotary, past)
            presents.append(present)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)), presents
