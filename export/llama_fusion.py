"""Fewer, larger nodes in a Llama-family decoder: RMSNorm fusions and packed projections.

The exported Llama, Qwen2 and Mistral decoders compute each RMSNorm from Pow/ReduceMean/Add/Sqrt/Div/Mul
and each projection as its own MatMul. This pass rewrites, without touching the graph's inputs or outputs:

* RMSNorm into ``SimplifiedLayerNormalization`` and residual ``Add`` + RMSNorm into
  ``com.microsoft.SkipSimplifiedLayerNormalization`` (ONNX Runtime's transformer optimizer fusions; its
  session optimiser fuses the plain norm but not the residual, which also feeds the next layer);
* MatMuls that read the same activation with constant weights of the same input width (the query, key and
  value projections; the gate and up projections) into one MatMul over the concatenated weights and a
  ``Split``: one weight pass over the activation instead of three or two, and one ``MatMulNBits`` each
  after 4-bit quantization.

Every rewrite is checked numerically against the graph before it (logits and the keys/values at real
positions for a left-padded prefill and a decode step); one that fails is dropped with a warning and the
graph is written unchanged, so an export never fails here.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from vledge.errors import QuantizationError
from vledge.export.layer_fusion import write_checked
from vledge.export.onnx_files import (atomic_output, copy_graph, load_graph, quiet, source_graph)

log = logging.getLogger(__name__)


def _fuse_rms_norms(model) -> tuple[int, int]:
    """(plain RMSNorms left in standard ops, SkipSimplifiedLayerNormalization nodes made)."""
    from onnxruntime.transformers.fusion_simplified_layernorm import (FusionSimplifiedLayerNormalization,
                                                                      FusionSkipSimplifiedLayerNormalization)
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)
    # its shape inference warns about the dynamic mask arithmetic it cannot bound; nothing a user can act on
    shapes = logging.getLogger("symbolic_shape_infer")
    level = shapes.level
    shapes.setLevel(logging.ERROR)
    try:
        with quiet():
            FusionSimplifiedLayerNormalization(wrapped).apply()
            FusionSkipSimplifiedLayerNormalization(wrapped).apply()
    finally:
        shapes.setLevel(level)
    plain = _expand_plain_norms(model)
    wrapped.prune_graph()
    wrapped.topological_sort()
    return plain, [node.op_type for node in model.graph.node].count("SkipSimplifiedLayerNormalization")


def _expand_plain_norms(model) -> int:
    """Write each remaining default-domain SimplifiedLayerNormalization back as standard ops; returns how many.

    That op is ONNX Runtime's, not ONNX's (the checker rejects it at opset 17); its session optimiser fuses
    the standard form again when it loads the graph.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    count = 0
    for node in list(graph.node):
        if node.op_type != "SimplifiedLayerNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, gamma, out, tag = node.input[0], node.input[1], node.output[0], node.name or node.output[0]
        eps = numpy_helper.from_array(np.asarray(attributes.get("epsilon", 1e-5), np.float32), f"{tag}.epsilon")
        graph.initializer.append(eps)
        replacement = [
            helper.make_node("Mul", [x, x], [f"{tag}.square"], name=f"{tag}/Square"),
            helper.make_node("ReduceMean", [f"{tag}.square"], [f"{tag}.mean"], axes=[-1], keepdims=1,
                             name=f"{tag}/ReduceMean"),
            helper.make_node("Add", [f"{tag}.mean", eps.name], [f"{tag}.var"], name=f"{tag}/AddEps"),
            helper.make_node("Sqrt", [f"{tag}.var"], [f"{tag}.std"], name=f"{tag}/Sqrt"),
            helper.make_node("Div", [x, f"{tag}.std"], [f"{tag}.normed"], name=f"{tag}/Div"),
            helper.make_node("Mul", [f"{tag}.normed", gamma], [out], name=f"{tag}/Scale"),
        ]
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(replacement):
            graph.node.insert(position + offset, new)
        count += 1
    return count


def _pack_projections(model) -> int:
    """Pack sibling weight MatMuls (same activation, same input width) into MatMul + Split; returns the packs."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer
               if tensor.data_type == TensorProto.FLOAT and len(tensor.dims) == 2}
    used = defaultdict(int)  # a weight read by another node too cannot be removed
    for node in graph.node:
        for name in node.input:
            used[name] += 1
    groups: dict[str, list] = defaultdict(list)
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and used[node.input[1]] == 1:
            groups[node.input[0]].append(node)
    packs = 0
    for activation, nodes in groups.items():
        if len(nodes) < 2 or len({weights[n.input[1]].dims[0] for n in nodes}) != 1:
            continue
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        name = f"{nodes[0].name or nodes[0].output[0]}_packed"
        packed = numpy_helper.from_array(np.concatenate(arrays, axis=1).astype(np.float32), f"{name}.weight")
        sizes = numpy_helper.from_array(np.asarray([a.shape[1] for a in arrays], np.int64), f"{name}.split")
        matmul = helper.make_node("MatMul", [activation, packed.name], [f"{name}.output"], name=name)
        split = helper.make_node("Split", [matmul.output[0], sizes.name], [n.output[0] for n in nodes], axis=-1,
                                 name=f"{name}_split")
        position = min(list(graph.node).index(n) for n in nodes)
        for node in nodes:
            graph.node.remove(node)
        graph.node.insert(position, split)
        graph.node.insert(position, matmul)
        for node in nodes:
            graph.initializer.remove(weights[node.input[1]])
        graph.initializer.extend([packed, sizes])
        packs += 1
    return packs


def fuse_llama(src: Path, dst: Path, tolerance: float = 1e-4) -> Path:
    """RMSNorm fusions and packed projections for a Llama-family decoder, each checked against ``src``.

    The norm fusions and the packing are tried together, then each alone; the first that reproduces
    ``src`` is written. If none does, ``src`` is copied unchanged with a warning.
    """
    src = source_graph(src)
    for norms, pack in ((True, True), (True, False), (False, True)):
        model = load_graph(src)
        before = len(model.graph.node)
        made = _fuse_rms_norms(model) if norms else (0, 0)
        packs = _pack_projections(model) if pack else 0
        if not any(made) and not packs:
            continue
        try:
            write_checked(model, src, Path(dst), tolerance)
        except QuantizationError as exc:
            log.warning("%s: Llama fusion (norms %s, packing %s) dropped: %s", src.name, norms, pack, exc)
            continue
        log.info("%s: %d -> %d nodes (%d RMSNorms left to the session optimiser, %d SkipSimplifiedLayerNormalization, "
                 "%d packed projections)", src.name, before, len(model.graph.node), made[0], made[1], packs)
        return Path(dst)
    if Path(dst) != src:
        with atomic_output(Path(dst)) as out:
            copy_graph(src, out, Path(dst))
    return Path(dst)
