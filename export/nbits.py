"""Block-wise MatMulNBits weights packed by vledge itself: 4-bit min/max with an exact block offset, 8-bit symmetric.

ONNX Runtime's own packer (``MatMulNBitsQuantizer``) stretches every block's range to include zero so that its
zero point is a whole number. A block of 32 weights that does not straddle zero then loses up to half its codes, and
a model whose weights already sit on a 4-bit min/max grid (every GGUF ``Q4_1`` model: ``w = d * q + m`` per block of
32 input values) does not land on that grid again. Measured on SmolLM2-135M-Instruct (``benchmarks/q4_choice.py``,
docs/results.md) that cost a third of the next-token agreement.

The ``minmax`` scheme here keeps each block's own minimum ``m`` and step ``d = (max - min) / 15`` (what llama.cpp's
``Q4_1`` stores). MatMulNBits dequantizes ``(q - z) * d`` with a whole-number ``z``; the part of ``m`` that ``z``
cannot express, ``r = m + z * d`` (at most ``d / 2``), is added back exactly by a small correction:

    y = MatMulNBits(x) + ReduceSum(Reshape(x, [..., K / 32, 32]), -1) @ R        (R: [K / 32, N], r per block)

A float zero point would express ``m`` directly, but ONNX Runtime's CPU kernel then dequantizes the whole weight on
every call (75x slower on a 576 x 3072 decode product, measured), so the offset travels in ``R`` instead.

``symmetric`` 8-bit uses ``d = max|w| / 127`` and codes ``q + 128`` (llama.cpp's ``Q8_0`` grid, so a tied
embedding stored as ``Q8_0`` is reproduced exactly).
"""

from __future__ import annotations

import logging

import numpy as np

from vledge.errors import QuantizationError

__all__ = ["SCHEMES", "pack_minmax4", "pack_symmetric8", "replace_matmuls"]

log = logging.getLogger(__name__)

SCHEMES = ("minmax4", "symmetric8")


def _blocks(weight: np.ndarray, block: int) -> np.ndarray:
    """``weight`` [K, N] as [N, K / block, block] (K must be a multiple of ``block``)."""
    k, n = weight.shape
    if k % block:
        raise QuantizationError(f"a weight with {k} input rows is not a whole number of blocks of {block}")
    return np.ascontiguousarray(weight.T, dtype=np.float32).reshape(n, k // block, block)


def pack_minmax4(weight: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """4-bit codes [N, K/block, block/2], scales [N*K/block], zero points [N*ceil(K/block/2)], offsets R [K/block, N].

    Dequantized: ``(q - z) * d`` per block plus ``R`` times the block's input sum (see the module docstring).
    """
    w = _blocks(weight, block)
    low, high = w.min(-1), w.max(-1)
    scale = (high - low) / 15.0
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.rint((w - low[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    zero = np.clip(np.rint(-low / scale), 0, 15).astype(np.uint8)
    offset = (low + zero * scale).astype(np.float32)  # what the whole-number zero point leaves out
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    n, blocks = zero.shape
    padded = np.zeros((n, blocks + blocks % 2), np.uint8)
    padded[:, :blocks] = zero
    zero_packed = (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)
    return packed, scale.reshape(-1), zero_packed.reshape(-1), np.ascontiguousarray(offset.T)


def pack_symmetric8(weight: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """8-bit codes [N, K/block, block] (``q + 128``) and scales [N*K/block] with ``d = max|w| / 127``."""
    w = _blocks(weight, block)
    scale = np.abs(w).max(-1) / 127.0
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    codes = (np.clip(np.rint(w / scale[..., None]), -127, 127) + 128).astype(np.uint8)
    return codes, scale.reshape(-1)


def _rank(model, name: str) -> int | None:
    for value in (*model.graph.value_info, *model.graph.input):
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return len(value.type.tensor_type.shape.dim)
    return None


def replace_matmuls(model, scheme: str, names: set[str], block: int = 32, accuracy_level: int = 4,
                    input_rank: int = 3, offset_correction: bool = True) -> int:
    """Replace the weight MatMuls named in ``names`` by MatMulNBits packed with ``scheme``; returns how many.

    The offset correction of ``minmax4`` reshapes the MatMul's input and needs its rank: the graph's shape
    information where it has one, else ``input_rank`` (a decoder's hidden states are [batch, seq, hidden]; the
    exporter's numerical check of the rewritten graph catches a wrong guess). A MatMul whose weight rows are not a
    whole number of blocks is left as it is (the caller's fallback quantizes it). ``offset_correction=False``
    drops ``R`` (measurement only: each block is then off by its rounded offset).
    """
    from onnx import helper, numpy_helper

    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown MatMulNBits scheme {scheme!r}; choose from {SCHEMES}")
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    nodes, replaced, dropped = [], 0, set()
    for node in model.graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if node.name not in names or weight is None or len(weight.dims) != 2 or weight.dims[0] % block:
            nodes.append(node)
            continue
        rank = _rank(model, node.input[0]) or input_rank
        array = numpy_helper.to_array(weight).astype(np.float32)
        k, n = array.shape
        base = node.name or node.output[0]
        attrs = dict(K=k, N=n, bits=4 if scheme == "minmax4" else 8, block_size=block, accuracy_level=accuracy_level)
        if scheme == "symmetric8":
            codes, scale = pack_symmetric8(array, block)
            new = [numpy_helper.from_array(codes, f"{weight.name}_Q8"), numpy_helper.from_array(scale,
                                                                                               f"{weight.name}_scales")]
            nodes.append(helper.make_node("MatMulNBits", [node.input[0], new[0].name, new[1].name], list(node.output),
                                          name=f"{base}_Q8", domain="com.microsoft", **attrs))
        else:
            codes, scale, zero, offset = pack_minmax4(array, block)
            new = [numpy_helper.from_array(codes, f"{weight.name}_Q4"),
                   numpy_helper.from_array(scale, f"{weight.name}_scales"),
                   numpy_helper.from_array(zero, f"{weight.name}_zero_points"),
                   numpy_helper.from_array(offset, f"{weight.name}_offsets"),
                   numpy_helper.from_array(np.asarray([0] * (rank - 1) + [k // block, block], np.int64),
                                           f"{base}_block_shape"),
                   numpy_helper.from_array(np.asarray([-1], np.int64), f"{base}_last_axis")]
            if not offset_correction:
                model.graph.initializer.extend(new[:3])
                nodes.append(helper.make_node("MatMulNBits", [node.input[0], *(t.name for t in new[:3])],
                                              list(node.output), name=f"{base}_Q4", domain="com.microsoft", **attrs))
                dropped.add(weight.name)
                replaced += 1
                continue
            main, sums, grouped, corrected = (f"{base}_nbits", f"{base}_block_sums", f"{base}_blocks",
                                              f"{base}_offset")
            nodes += [
                helper.make_node("MatMulNBits", [node.input[0], new[0].name, new[1].name, new[2].name], [main],
                                 name=f"{base}_Q4", domain="com.microsoft", **attrs),
                helper.make_node("Reshape", [node.input[0], new[4].name], [grouped], name=f"{base}_group"),
                helper.make_node("ReduceSum", [grouped, new[5].name], [sums], name=f"{base}_sum", keepdims=0),
                helper.make_node("MatMul", [sums, new[3].name], [corrected], name=f"{base}_offset_mm"),
                helper.make_node("Add", [main, corrected], list(node.output), name=f"{base}_offset_add"),
            ]
        model.graph.initializer.extend(new)
        dropped.add(weight.name)
        replaced += 1
    still_used = {name for node in nodes for name in node.input}
    kept = [tensor for tensor in model.graph.initializer if tensor.name not in dropped or tensor.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if replaced and not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return replaced
