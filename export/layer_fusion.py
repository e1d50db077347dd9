"""Fewer nodes per decode step, after attention fusion: fused residual + LayerNorm, and the mask computed inside attention.

A ``small`` decode step is bound by per-node overhead, not FLOPs, so every node removed pays:

* residual ``Add`` + ``LayerNormalization`` pairs (and the bias ``Add`` of the projection before them)
  become ``com.microsoft.SkipLayerNormalization`` (ONNX Runtime's transformer optimizer fusions;
  the online optimiser does not fuse them here, because the residual sum also feeds the next layer);
* the additive attention bias, rebuilt from shapes at every step by about a dozen nodes (Shape,
  Slice, Range, LessOrEqual, And, Where, ...), is dropped: each ``MultiHeadAttention`` takes the
  ``attention_mask`` itself as its ``key_padding_mask`` (one int32 Cast, shared) with
  ``unidirectional=1`` for the causal part.

The graph's inputs and outputs do not change. Every rewrite is checked numerically against the
graph before it (logits and the keys/values at real positions, for a padded prefill and a decode
step), or nothing is written. On the ``small`` decoder: 79 -> 47 nodes after ONNX Runtime's
session optimisation, and 6-8 % less time for the bare graph at past 40, one thread (most of it
from the mask; moving the q/k/v bias into the attention as well measured no faster).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vledge.errors import QuantizationError
from vledge.export.fusion import decoder_probe
from vledge.export.onnx_files import atomic_output, copy_graph, cpu_session, load_graph, save_graph, source_graph, validate_graph

log = logging.getLogger(__name__)

MASK_NAME = "attention_mask_int32"


def _fuse_skip_layer_norms(model) -> int:
    from onnxruntime.transformers.fusion_skiplayernorm import (FusionBiasSkipLayerNormalization,
                                                               FusionSkipLayerNormalization)
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)
    before = len(model.graph.node)
    FusionSkipLayerNormalization(wrapped).apply()
    FusionBiasSkipLayerNormalization(wrapped).apply()
    wrapped.prune_graph()
    wrapped.topological_sort()
    return before - len(model.graph.node)


def _mask_inside_attention(model) -> bool:
    """Point every MultiHeadAttention at the padding mask (with causal masking on); False if not applicable."""
    from onnx import TensorProto, helper

    graph = model.graph
    attentions = [node for node in graph.node if node.op_type == "MultiHeadAttention"]
    if not attentions or "attention_mask" not in {value.name for value in graph.input}:
        return False
    biases = {node.input[5] if len(node.input) > 5 else "" for node in attentions}
    if len(biases) != 1 or "" in biases:
        return False
    if any(len(node.input) > 4 and node.input[4] for node in attentions):
        return False
    graph.node.insert(0, helper.make_node("Cast", ["attention_mask"], [MASK_NAME], to=TensorProto.INT32,
                                          name="AttentionMaskInt32"))
    for node in attentions:
        inputs = list(node.input) + [""] * max(0, 6 - len(node.input))
        inputs[4], inputs[5] = MASK_NAME, ""
        del node.input[:]
        node.input.extend(inputs)
        kept = [a for a in node.attribute if a.name != "unidirectional"]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("unidirectional", 1)])
    return True


def _prune(model) -> None:
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)
    wrapped.prune_graph()
    wrapped.topological_sort()


def check_rewrite(reference: Path, candidate: Path, tolerance: float, label: Path) -> None:
    """Raise QuantizationError unless ``candidate`` gives ``reference``'s logits and its keys/values wherever the
    mask is 1, on the decoder probe (a left-padded prefill and decode steps).

    Keys and values at padded positions may differ (a padded query's own attention is never read:
    the mask hides those keys from every real query). Shared by every decoder rewrite (this module's,
    vledge.export.llama_fusion's), so each is held to the same check.
    """
    try:
        want, got = decoder_probe(cpu_session(reference)), decoder_probe(cpu_session(candidate))
    except QuantizationError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception classes
        raise QuantizationError(f"{label}: the rewritten decoder fails to run on the probe inputs ({exc})") from exc
    for step, (a, b) in enumerate(zip(want, got)):
        for index, (x, y) in enumerate(zip(a, b)):
            if x.shape != y.shape:
                raise QuantizationError(f"{label}: output {index} has shape {y.shape}, expected {x.shape}")
            if index > 0 and x.ndim == 4:  # present [batch, heads, past, head_dim]: row 0's first position is padding
                x, y = x[1:], y[1:]
            scale = max(1.0, float(np.abs(x).max()))
            error = float(np.abs(x - y).max())
            if not error <= tolerance * scale:
                raise QuantizationError(f"{label}: the rewritten graph differs from {reference.name} at step {step}, "
                                        f"output {index} (max abs diff {error:.3g} > {tolerance * scale:.3g})")


def write_checked(model, src: Path, dst: Path, tolerance: float) -> None:
    """Write the rewritten ``model`` to ``dst``, atomically and only if it passes :func:`check_rewrite` against
    ``src`` (QuantizationError otherwise, with ``dst`` untouched)."""
    with atomic_output(dst) as out:
        save_graph(model, out, dst)
        validate_graph(out)
        check_rewrite(src, out, tolerance, dst)


def fuse_layers(src: Path, dst: Path, tolerance: float = 1e-4) -> Path:
    """Fuse residual + LayerNorm pairs and move the attention mask into attention, checked against ``src``.

    A graph without MultiHeadAttention (an LSTM, or attention left unfused) gets only the
    LayerNorm fusions. A rewrite that does not reproduce ``src`` (a decoder whose attention this
    module does not know) is dropped with a warning: first the mask rewrite, then everything, and
    ``src`` is copied unchanged; an export never fails here.
    """
    src = source_graph(src)
    for move_mask in (True, False):
        model = load_graph(src)
        fused = _fuse_skip_layer_norms(model)
        masked = move_mask and _mask_inside_attention(model)
        if masked:
            _prune(model)
        if not fused and not masked:
            break
        try:
            write_checked(model, src, Path(dst), tolerance)
        except QuantizationError as exc:
            log.warning("%s: %s; %s", src.name, exc,
                        "trying without the mask inside attention" if masked else "left as it was")
            if masked:
                continue
            break
        log.info("%s: %d nodes fewer from LayerNorm fusion%s", src.name, fused,
                 "; attention mask inside attention" if masked else "")
        return Path(dst)
    with atomic_output(Path(dst)) as out:
        copy_graph(src, out, Path(dst))
    return Path(dst)
