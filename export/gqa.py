"""Llama-family attention exported as ONNX Runtime's ``com.microsoft.GroupQueryAttention``, checked against the plain graph.

The plain export computes each layer's attention from standard ops (MatMul, Softmax, the mask Add, the cache
Concat): about a dozen nodes a layer and two MatMuls over the whole cache. ONNX Runtime's GroupQueryAttention
does all of it in one kernel (its CPU and CUDA providers), reading each key/value head once for its group of
query heads, and appends the new keys and values to the cache itself. The decoder's inputs and outputs do not
change:

* the keys, values and present tensors keep their layout ([batch, key_value_heads, past, head_dim], "BNSH");
* rotary embeddings are ONNX Runtime's ``com.microsoft.RotaryEmbedding`` on the queries and keys before the op,
  from ``position_ids`` (so left padding keeps its meaning) and cos/sin tables of ``max_positions`` rows;
* ``attention_mask``'s padding becomes the op's ``attention_bias`` (the last query of a row sees every key, so
  that row of the causal mask is the padding bias), every row's ``seqlens_k`` is the total length minus one, and
  the op applies the causal part itself.

One limit comes with it: ONNX Runtime refuses a call that extends a non-empty cache by several positions for
more than one row at once ("batch_size must be 1 when sequence_length > 1 and past context is given"). The
manifest records it (``generation.cache_extend_rows`` = 1) and the runtime then reuses the prompt prefix's
cache for single rows only. :func:`export_gqa_decoder` writes the graph only if it reproduces the plain
decoder (``vledge.export.layer_fusion.check_rewrite``: logits and keys/values for a left-padded prefill and a
decode step); otherwise the plain graph stays, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from vledge.errors import QuantizationError

log = logging.getLogger(__name__)

OP = "GroupQueryAttention"
# ORT's GroupQueryAttention inputs after total_sequence_length, before attention_bias: cos_cache, sin_cache,
# position_ids (all unused: rotary is applied before the op).
_SKIPPED_INPUTS = 3
# What a decoder with these nodes cannot do in one call (docs/model-directory.md, "generation").
CACHE_EXTEND_ROWS = 1


class _GroupQueryAttention(torch.autograd.Function):
    """Reference arithmetic while tracing; one GroupQueryAttention node in the exported graph."""

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total, bias, heads: int, kv_heads: int):
        batch, seq, width = query.shape
        dim = width // heads
        q = query.view(batch, seq, heads, dim).transpose(1, 2)
        k = torch.cat([past_key, key.view(batch, seq, kv_heads, dim).transpose(1, 2)], dim=2)
        v = torch.cat([past_value, value.view(batch, seq, kv_heads, dim).transpose(1, 2)], dim=2)
        groups = heads // kv_heads
        total_len = k.shape[2]
        causal = torch.ones(seq, total_len, dtype=torch.bool).tril(total_len - seq)
        scores = torch.matmul(q, k.repeat_interleave(groups, dim=1).transpose(2, 3)) * dim ** -0.5 + bias
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        out = torch.matmul(scores.softmax(dim=-1), v.repeat_interleave(groups, dim=1))
        return out.transpose(1, 2).reshape(batch, seq, width), k, v

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total, bias, heads, kv_heads):
        # The optional inputs between total_sequence_length and attention_bias are spliced in after export
        # (the TorchScript exporter cannot write an empty input name): see _splice_optional_inputs.
        out, present_key, present_value = g.op(f"com.microsoft::{OP}", query, key, value, past_key, past_value,
                                               seqlens_k, total, bias, num_heads_i=heads, kv_num_heads_i=kv_heads,
                                               outputs=3)
        rank3, rank4 = [None] * 3, [None] * 4  # every axis dynamic; the graph's named axes say which is which
        out.setType(query.type().with_sizes(rank3))
        present_key.setType(past_key.type().with_sizes(rank4))
        present_value.setType(past_value.type().with_sizes(rank4))
        return out, present_key, present_value


class _RotaryEmbedding(torch.autograd.Function):
    """Reference arithmetic while tracing; one ``com.microsoft.RotaryEmbedding`` node in the exported graph.

    ``x`` [batch, seq, heads * head_dim] is rotated by the angles of ``position_ids`` [batch, seq], looked up in
    ``cos_cache`` / ``sin_cache`` [positions, head_dim / 2] (the halves layout, as ``rotate_half``).
    """

    @staticmethod
    def forward(ctx, x, position_ids, cos_cache, sin_cache, heads: int):
        batch, seq, width = x.shape
        dim = width // heads
        cos = torch.cat([cos_cache[position_ids]] * 2, dim=-1)[:, :, None]  # [B, S, 1, D]
        sin = torch.cat([sin_cache[position_ids]] * 2, dim=-1)[:, :, None]
        x = x.view(batch, seq, heads, dim)
        first, second = x[..., : dim // 2], x[..., dim // 2:]
        return (x * cos + torch.cat([-second, first], dim=-1) * sin).reshape(batch, seq, width)

    @staticmethod
    def symbolic(g, x, position_ids, cos_cache, sin_cache, heads):
        out = g.op("com.microsoft::RotaryEmbedding", x, position_ids, cos_cache, sin_cache, interleaved_i=0,
                   num_heads_i=heads)
        out.setType(x.type().with_sizes([None] * 3))
        return out


def rotary_caches(rotary: nn.Module, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [positions, head_dim / 2] with the same float32 products as ``RotaryEmbedding.forward``."""
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * rotary.inv_freq.float()[None, :]
    return angles.cos(), angles.sin()


def _attention_forward(self, x: torch.Tensor, mask: torch.Tensor, rotary, past):
    """``vledge.models.llama.Attention.forward`` for the export: the projections, then RotaryEmbedding on the queries
    and keys (``rotary`` is the position ids here) and GroupQueryAttention."""
    batch, seq, _ = x.shape
    heads, kv_heads = self.heads, self.kv_heads
    position_ids = rotary[0]
    cos_cache, sin_cache = self.rotary_caches
    q = _RotaryEmbedding.apply(self.q_proj(x), position_ids, cos_cache, sin_cache, heads)
    k = _RotaryEmbedding.apply(self.k_proj(x), position_ids, cos_cache, sin_cache, kv_heads)
    v = self.v_proj(x)
    seqlens, total, padding = _attention_inputs(self.step_inputs, mask, batch, seq)
    y, present_k, present_v = _GroupQueryAttention.apply(q, k, v, past[0], past[1], seqlens, total, padding,
                                                         heads, kv_heads)
    return self.o_proj(y), (present_k, present_v)


def _attention_inputs(shared: dict, mask: torch.Tensor, batch: int, seq: int):
    """(seqlens_k, total_sequence_length, attention_bias) of one forward, made by its first layer and reused by the
    others (every layer gets the same ``mask`` object), so the graph computes them once a step, not once a layer."""
    if shared.get("mask") is not mask:
        total_len = mask.shape[-1]
        padding = mask[:, :, -1:, :].expand(batch, 1, seq, total_len)  # the last query's row: padding only
        seqlens = mask[:, 0, -1, :].new_ones(mask.shape[0], total_len).sum(-1).to(torch.int32) - 1
        shared.update(mask=mask, inputs=(seqlens, seqlens.max() + 1, padding))
    return shared["inputs"]


@contextlib.contextmanager
def grouped_query_attention(model: nn.Module):
    """Within the block, every Llama-family decoder in ``model`` exports its attention as RotaryEmbedding +
    GroupQueryAttention: each LM's rotary module hands the position ids on, and its attention modules read them."""
    from vledge.models.llama import LlamaLM

    patched: list[nn.Module] = []
    for lm in (m for m in model.modules() if isinstance(m, LlamaLM)):
        caches = rotary_caches(lm.rotary, lm.config.max_positions)
        lm.rotary.forward = lambda position_ids, dtype: (position_ids, None)
        patched.append(lm.rotary)
        shared: dict = {}  # the step's GroupQueryAttention inputs, one set for all of this LM's layers
        for layer in lm.layers:
            layer.self_attn.forward = _attention_forward.__get__(layer.self_attn)
            layer.self_attn.rotary_caches = caches
            layer.self_attn.step_inputs = shared
            patched.append(layer.self_attn)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # back to the class's method
            module.__dict__.pop("rotary_caches", None)
            module.__dict__.pop("step_inputs", None)


def _splice_optional_inputs(path: Path) -> int:
    """Insert the empty optional inputs before each node's attention_bias; returns how many nodes."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    count = 0
    for node in model.graph.node:
        if node.op_type == OP and node.domain == "com.microsoft" and len(node.input) == 8:
            inputs = list(node.input)
            del node.input[:]
            node.input.extend(inputs[:7] + [""] * _SKIPPED_INPUTS + inputs[7:])
            count += 1
    onnx.save(model, str(path))
    return count


def export_gqa_decoder(export, plain: Path, tolerance: float = 1e-4) -> bool:
    """Export the decoder again with GroupQueryAttention (``export(path)`` runs the traced export of the model
    inside :func:`grouped_query_attention`) and put it in ``plain``'s place if it reproduces ``plain``.

    Returns whether it did; a graph that does not reproduce the plain one is dropped with a warning.
    """
    from vledge.export.layer_fusion import check_rewrite

    candidate = plain.with_name(plain.stem + "_gqa.onnx")
    try:
        export(candidate)
        if not _splice_optional_inputs(candidate):
            raise QuantizationError("no attention was exported as GroupQueryAttention")
        check_rewrite(plain, candidate, tolerance, candidate)
    except (QuantizationError, RuntimeError) as exc:
        log.warning("%s: GroupQueryAttention dropped, the decoder keeps standard attention ops: %s", plain.name, exc)
        candidate.unlink(missing_ok=True)
        return False
    candidate.replace(plain)
    log.info("%s: attention as GroupQueryAttention (checked against standard ops)", plain.name)
    return True
