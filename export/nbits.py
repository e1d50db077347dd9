"""Block-wise MatMulNBits weights packed by vledge itself: 4-bit min/max with an exact block offset, 8-bit symmetric.

ONNX Runtime's own packer (``MatMulNBitsQuantizer``) stretches every block's range to include zero so that its
zero point is a whole number. A block of 32 weights that does not straddle zero then loses up to half its codes, and
a model whose weights already sit on a 4-bit min/max grid (every GGUF ``Q4_1`` model: ``w = d * q + m`` per block of
32 input values) does not land on that grid again. Measured on SmolLM2-135M-Instruct (``benchmarks/q4_choice.py``,
docs/results.md) that cost a third of the next-token agreement.

The ``minmax`` scheme here keeps each block's own minimum ``m`` and step ``d = (max - min) / 15`` (what llama.cpp's
``Q4_1`` stores). MatMulNBits dequantizes ``(q - z) * d`` with a whole-number ``z``; the part of ``m`` that ``z``
cannot express, ``r = m + z * d`` (at most ``d / 2``), is added back exactly by a small correction:

    y = MatMulNBits(Concat(x, ReduceSum(Reshape(x, [..., K / 32, 32]), -1)))

the input's K / 32 block sums appended to it, and ``r`` (one value per block and output) appended to the weight as
extra rows in symmetric 4-bit blocks of their own (their rounding, at most ``max|r| / 14``, is what remains; three
small nodes per MatMul, measured at 3 % of the product's time where a separate float MatMul + Add cost 30 %).

A float zero point would express ``m`` directly, but ONNX Runtime's CPU kernel then dequantizes the whole weight on
every call (75x slower on a 576 x 3072 decode product, measured), so the offset travels in ``R`` instead.

``symmetric`` 8-bit uses ``d = max|w| / 127`` and codes ``q + 128`` (llama.cpp's ``Q8_0`` grid, so a tied
embedding stored as ``Q8_0`` is reproduced exactly).
"""

from __future__ import annotations

import logging

import numpy as np

from vledge.errors import QuantizationError

__all__ = ["SCHEMES", "pack_gather", "pack_minmax4", "pack_offset_rows", "pack_symmetric8", "replace_gather",
           "replace_matmuls"]

log = logging.getLogger(__name__)

SCHEMES = ("minmax4", "symmetric8")


def _blocks(weight: np.ndarray, block: int) -> np.ndarray:
    """``weight`` [K, N] as [N, K / block, block] (K must be a multiple of ``block``)."""
    k, n = weight.shape
    if k % block:
        raise QuantizationError(f"a weight with {k} input rows is not a whole number of blocks of {block}")
    return np.ascontiguousarray(weight.T, dtype=np.float32).reshape(n, k // block, block)


def pack_minmax4(weight: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """4-bit codes [N, K/block, block/2]; scales, zero points (unpacked) and offsets, each [N, K/block].

    Dequantized: ``(q - z) * d + r`` per block, ``r`` being the part of the block's minimum that the whole-number
    zero point ``z`` cannot express (see the module docstring).
    """
    w = _blocks(weight, block)
    low, high = w.min(-1), w.max(-1)
    scale = (high - low) / 15.0
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.rint((w - low[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    zero = np.clip(np.rint(-low / scale), 0, 15).astype(np.uint8)
    offset = (low + zero * scale).astype(np.float32)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8), scale, zero, offset


def pack_offset_rows(offset: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The offsets [N, K/block] as extra 4-bit rows of the weight: symmetric blocks (``d = max|r| / 7``, zero point 8).

    They multiply the input's block sums, appended to the input (``Concat``), so one MatMulNBits computes both the
    codes' product and the offsets' (a separate float MatMul and Add measured 10x the cost: more nodes per step).
    """
    n, count = offset.shape
    rows = -(-count // block) * block
    padded = np.zeros((n, rows), np.float32)
    padded[:, :count] = offset
    padded = padded.reshape(n, rows // block, block)
    scale = np.abs(padded).max(-1) / 7.0
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    codes = (np.clip(np.rint(padded / scale[..., None]), -7, 7) + 8).astype(np.uint8)
    zero = np.full(scale.shape, 8, np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8), scale, zero


def _pack_zero_points(zero: np.ndarray) -> np.ndarray:
    """Unpacked 4-bit zero points [N, blocks] as MatMulNBits stores them: two a byte, low nibble first, per row."""
    n, blocks = zero.shape
    padded = np.zeros((n, blocks + blocks % 2), np.uint8)
    padded[:, :blocks] = zero
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


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
    information where it has one, else ``input_rank`` (a decoder's hidden states are [batch, seq, hidden]; a
    wrong guess fails loudly when the graph first runs, in the export's parity measurement). A MatMul whose weight
    rows are not a whole number of blocks is left as it is (the caller's fallback quantizes it).
    ``offset_correction=False`` drops ``R`` (measurement only: each block is then off by its rounded offset).
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
            inputs, width = node.input[0], k
            if offset_correction:
                extra_codes, extra_scale, extra_zero = pack_offset_rows(offset, block)
                codes = np.concatenate([codes, extra_codes], axis=1)
                scale = np.concatenate([scale, extra_scale], axis=1)
                zero = np.concatenate([zero, extra_zero], axis=1)
                width = k + k // block
            attrs["K"] = width
            new = [numpy_helper.from_array(codes, f"{weight.name}_Q4"),
                   numpy_helper.from_array(scale.reshape(-1), f"{weight.name}_scales"),
                   numpy_helper.from_array(_pack_zero_points(zero), f"{weight.name}_zero_points")]
            if offset_correction:
                new += [numpy_helper.from_array(np.asarray([0] * (rank - 1) + [k // block, block], np.int64),
                                                f"{base}_block_shape"),
                        numpy_helper.from_array(np.asarray([-1], np.int64), f"{base}_last_axis")]
                grouped, sums, inputs = f"{base}_blocks", f"{base}_block_sums", f"{base}_with_block_sums"
                nodes += [helper.make_node("Reshape", [node.input[0], new[3].name], [grouped], name=f"{base}_group"),
                          helper.make_node("ReduceSum", [grouped, new[4].name], [sums], name=f"{base}_sum",
                                           keepdims=0),
                          helper.make_node("Concat", [node.input[0], sums], [inputs], name=f"{base}_append",
                                           axis=-1)]
            nodes.append(helper.make_node("MatMulNBits", [inputs, *(t.name for t in new[:3])], list(node.output),
                                          name=f"{base}_Q4", domain="com.microsoft", **attrs))
        model.graph.initializer.extend(new)
        dropped.add(weight.name)
        replaced += 1
    _install(model, nodes, dropped, replaced)
    return replaced


def pack_gather(table: np.ndarray, bits: int, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A token table [vocab, hidden] as GatherBlockQuantized uint8 data and float32 scales [vocab, hidden/block].

    Symmetric blocks along ``hidden`` with ONNX Runtime's default zero point (2^(bits-1)): ``d = max|w| / 127`` and
    one code a byte for 8 bits (llama.cpp's ``Q8_0`` grid); ``d = max|w| / 7`` and two codes a byte, low nibble
    first, for 4 bits.
    """
    if bits not in (4, 8):
        raise QuantizationError(f"a token table is quantized to 4 or 8 bits, not {bits}")
    vocab, hidden = table.shape
    if hidden % block:
        raise QuantizationError(f"a token table of width {hidden} is not a whole number of blocks of {block}")
    levels = (1 << (bits - 1)) - 1
    w = np.asarray(table, np.float32).reshape(vocab, hidden // block, block)
    scale = np.abs(w).max(-1) / levels
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    codes = (np.clip(np.rint(w / scale[..., None]), -levels, levels) + levels + 1).astype(np.uint8).reshape(vocab, -1)
    if bits == 4:
        codes = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return codes, scale


def replace_gather(model, bits: int, block: int = 32) -> int:
    """Replace each Gather of a 2-D float initializer along axis 0 by GatherBlockQuantized; returns how many."""
    from onnx import helper, numpy_helper

    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    nodes, replaced, dropped = [], 0, set()
    for node in model.graph.node:
        table = initializers.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or len(table.dims) != 2 or table.data_type != 1 or axis != 0 or table.dims[1] % block:
            nodes.append(node)
            continue
        codes, scale = pack_gather(numpy_helper.to_array(table), bits, block)
        new = [numpy_helper.from_array(codes, f"{table.name}_q{bits}"),
               numpy_helper.from_array(scale, f"{table.name}_scales")]
        model.graph.initializer.extend(new)
        nodes.append(helper.make_node("GatherBlockQuantized", [new[0].name, node.input[1], new[1].name],
                                      list(node.output), name=f"{node.name or node.output[0]}_q{bits}",
                                      domain="com.microsoft", bits=bits, block_size=block, gather_axis=0,
                                      quantize_axis=1))
        dropped.add(table.name)
        replaced += 1
    _install(model, nodes, dropped, replaced)
    return replaced


def _install(model, nodes: list, dropped: set[str], replaced: int) -> None:
    """Make ``nodes`` the graph's, drop the initializers ``dropped`` names that no node reads any more, and
    import the com.microsoft domain if a node of it was made."""
    from onnx import helper

    still_used = {name for node in nodes for name in node.input}
    kept = [tensor for tensor in model.graph.initializer if tensor.name not in dropped or tensor.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if replaced and not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
