"""A GPT-style pre-norm transformer decoder over input embeddings, with a KV cache.

Its forward signature is the merged ONNX decoder's: inputs_embeds, attention_mask over
past+new positions, position_ids, past key/values in; logits and present key/values out.
One code path serves prefill (no past) and decode steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vledge.config import LanguageConfig

KV = tuple[torch.Tensor, torch.Tensor]


def run_layer(layer: nn.Module, checkpointed: bool, *args):
    """``layer(*args)``; ``checkpointed`` keeps only the layer's inputs for the backward pass and recomputes
    the rest there (same values: dropout's random state is replayed), trading compute for memory."""
    if checkpointed and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class SelfAttention(nn.Module):
    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = config.heads, config.head_dim
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden)
        self.proj = nn.Linear(config.hidden, config.hidden)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(x).split(hidden, dim=2)
        q, k, v = (t.view(batch, seq, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, seq, hidden)
        return self.proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.hidden, 4 * config.hidden)
        self.proj = nn.Linear(4 * config.hidden, config.hidden)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        attended, present = self.attn(self.ln_1(x), mask, past)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), present


def attention_bias(attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, query, past+query]: causal and hiding padded keys.

    A finite minimum (not -inf) keeps rows of padded queries from becoming NaN.
    """
    total = attention_mask.shape[1]
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = key_pos[total - query_len:]
    causal = key_pos[None, :] <= query_pos[:, None]
    allowed = causal[None, None, :, :] & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class TransformerLM(nn.Module):
    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.config = config
        self.wpe = nn.Embedding(config.max_positions, config.hidden)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.hidden)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        # Recompute each block's activations in the backward pass instead of keeping them (training only).
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: list[KV] | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Logits [B, S, vocab] (or [B, 1, vocab] with ``last_only``) and one (key, value) per block."""
        x = self.drop(inputs_embeds + self.wpe(position_ids))
        mask = attention_bias(attention_mask, inputs_embeds.shape[1], x.dtype)
        presents = []
        for index, block in enumerate(self.blocks):
            past = past_key_values[index] if past_key_values is not None else None
            x, present = run_layer(block, self.gradient_checkpointing and self.training, x, mask, past)
            presents.append(present)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.ln_f(x)), presents
