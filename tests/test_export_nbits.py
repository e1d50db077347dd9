"""vledge's own MatMulNBits / GatherBlockQuantized packing, run by ONNX Runtime against the float product."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vledge.errors import QuantizationError
from vledge.export.nbits import pack_gather, pack_minmax4, replace_gather, replace_matmuls

K, N = 96, 40


def _q4_1_grid(rng, k=K, n=N) -> np.ndarray:
    """A weight [K, N] on llama.cpp's Q4_1 grid: w = d * q + m per block of 32 input rows, q in 0..15."""
    step = rng.random((n, k // 32, 1)).astype(np.float32) * 0.02 + 0.001
    low = (rng.random((n, k // 32, 1)).astype(np.float32) - 0.7) * 0.1  # some blocks all above zero
    codes = rng.integers(0, 16, (n, k // 32, 32))
    codes[..., 0], codes[..., 1] = 0, 15
    return (step * codes + low).reshape(n, k).T.astype(np.float32)


def _matmul_model(weight: np.ndarray, rank: int = 3):
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    dims = ["b", "s", weight.shape[0]][-rank:]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims[:-1] + [weight.shape[1]])],
                              [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _run(model, feeds):
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _relative(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_minmax_codes_reproduce_a_q4_1_grid():
    weight = _q4_1_grid(np.random.default_rng(0))
    packed, scale, zero, offset = pack_minmax4(weight)
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(N, K // 32, 32).astype(np.float32)
    rebuilt = (codes - zero[..., None]) * scale[..., None] + offset[..., None]
    assert np.abs(rebuilt.reshape(N, K).T - weight).max() < 1e-6
    assert np.abs(offset).max() > 1e-4  # the whole-number zero point alone would not be exact


@pytest.mark.parametrize("rank", [2, 3])
def test_minmax_offsets_travel_in_the_same_product(rank):
    rng = np.random.default_rng(1)
    weight = _q4_1_grid(rng)
    x = rng.standard_normal((2, 3, K)[-rank:]).astype(np.float32) + 0.5  # block sums far from zero
    want = x @ weight
    errors = {}
    for correction in (True, False):
        model = _matmul_model(weight, rank)
        model.graph.value_info.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K][-rank:]))
        assert replace_matmuls(model, "minmax4", {"mm"}, accuracy_level=0, offset_correction=correction) == 1
        ops = [node.op_type for node in model.graph.node]
        assert ops == (["Reshape", "ReduceSum", "Concat", "MatMulNBits"] if correction else ["MatMulNBits"])
        assert all(t.name != "W" for t in model.graph.initializer)
        errors[correction] = _relative(_run(model, {"x": x}), want)
    assert errors[True] < 0.02 and errors[False] > 5 * errors[True], errors


def test_symmetric8_reproduces_a_q8_0_grid_and_keeps_ragged_weights():
    rng = np.random.default_rng(2)
    step = rng.random((N, K // 32, 1)).astype(np.float32) * 0.01 + 0.001
    codes = rng.integers(-127, 128, (N, K // 32, 32))
    codes[..., 0] = 127
    weight = (step * codes).reshape(N, K).T.astype(np.float32)
    model = _matmul_model(weight)
    assert replace_matmuls(model, "symmetric8", {"mm"}, accuracy_level=0) == 1
    x = rng.standard_normal((1, 2, K)).astype(np.float32)
    assert _relative(_run(model, {"x": x}), x @ weight) < 1e-5
    ragged = _matmul_model(rng.standard_normal((40, 8)).astype(np.float32))
    assert replace_matmuls(ragged, "minmax4", {"mm"}) == 0  # 40 rows: not whole blocks, left to the caller
    with pytest.raises(QuantizationError, match="scheme"):
        replace_matmuls(ragged, "minmax3", {"mm"})


@pytest.mark.parametrize("bits", [8, 4])
def test_token_table_as_gather_block_quantized(bits):
    rng = np.random.default_rng(3)
    vocab, hidden = 50, 64
    step = rng.random((vocab, hidden // 32, 1)).astype(np.float32) * 0.01 + 0.001
    codes = rng.integers(-127, 128, (vocab, hidden // 32, 32))
    codes[..., 3] = -127  # each block reaches the grid's end, as llama.cpp's Q8_0 does
    table = (step * codes).reshape(vocab, hidden).astype(np.float32)
    node = helper.make_node("Gather", ["table", "input_ids"], ["inputs_embeds"], name="embed")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["b", "s", hidden])],
                              [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    assert replace_gather(model, bits) == 1
    assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized"]
    ids = rng.integers(0, vocab, (2, 5)).astype(np.int64)
    got = _run(model, {"input_ids": ids})
    codes, scale = pack_gather(table, bits)
    if bits == 4:
        codes = np.stack([codes & 15, codes >> 4], -1).reshape(vocab, hidden)
    levels = (1 << (bits - 1)) - 1
    rebuilt = ((codes.astype(np.float32) - levels - 1).reshape(vocab, -1, 32) * scale[..., None]).reshape(vocab, -1)
    assert np.abs(got - rebuilt[ids]).max() < 1e-6  # the layout ONNX Runtime reads is the one written
    error = _relative(got, table[ids])
    assert (error < 1e-6) if bits == 8 else (0 < error < 0.2), error  # 8-bit: the Q8_0 grid again
    with pytest.raises(QuantizationError, match="4 or 8"):
        pack_gather(table, 2)
