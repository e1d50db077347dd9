"""Optimised, int8, 4-bit and fp16 variants of tiny random models, checked with real ONNX Runtime runs.

Drift bounds come from measurements on these models (seeded, CPU): int8 decoders drift about
1 % of the logits' std, q4 about 2 %, fp16 well under 0.1 %; the bounds leave several times
that as margin. The models' weights are re-drawn with PyTorch's default initialisers and
perturbed norms, so that logits spread like a trained model's rather than the near-zero
GPT-style init.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from vledge.errors import QuantizationError  # noqa: E402
from vledge.export import fusion, layer_fusion, onnx_files, optimize  # noqa: E402
from vledge.export import quantize as q  # noqa: E402
from vledge.export.quantize import QuantizeOptions  # noqa: E402

VOCAB = 320


def _randomize(model) -> None:
    """Spread weights like a trained model's: default fan-in inits, random biases and norm scales."""
    from torch import nn

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding, nn.LSTM)):
                module.reset_parameters()
            if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
                module.bias.copy_(0.2 * torch.randn_like(module.bias))
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)


def _export(kind: str, out: Path) -> tuple[dict[str, Path], object]:
    from vledge.config import preset
    from vledge.export.graphs import export_graphs
    from vledge.models.vlm import VisionLanguageModel

    torch.manual_seed(0)
    model_config, _ = preset(kind)
    model_config.language.vocab_size = VOCAB
    model = VisionLanguageModel(model_config, image_token_id=4)
    _randomize(model)
    return export_graphs(model.eval(), out), model_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _export("tiny", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_lstm(tmp_path_factory):
    return _export("tiny-lstm", tmp_path_factory.mktemp("tiny-lstm"))


@pytest.fixture(params=["tiny", "tiny-lstm"])
def exported(request, tiny, tiny_lstm):
    return {"tiny": tiny, "tiny-lstm": tiny_lstm}[request.param]


def _session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _decode(path: Path, seed: int = 0, batch: int = 2, prompt: int = 5, steps: int = 2) -> list[dict[str, np.ndarray]]:
    """A left-padded prefill with an empty past, then decode steps feeding the presents back; named outputs."""
    session = _session(path)
    rng = np.random.default_rng(seed)
    inputs = {value.name: value for value in session.get_inputs()}
    names = [value.name for value in session.get_outputs()]
    hidden = inputs["inputs_embeds"].shape[2]
    results = []
    if "past_hidden" in inputs:
        layers = inputs["past_hidden"].shape[0]
        hidden_state = cell = np.zeros((layers, batch, hidden), np.float32)
        for length in [prompt] + [1] * steps:
            x = rng.standard_normal((batch, length, hidden)).astype(np.float32)
            feed = {"inputs_embeds": x, "past_hidden": hidden_state, "past_cell": cell}
            out = dict(zip(names, session.run(None, feed)))
            hidden_state, cell = out["present_hidden"], out["present_cell"]
            results.append(out)
        return results
    past = {name: np.zeros((batch, inputs[name].shape[1], 0, inputs[name].shape[3]), np.float32)
            for name in inputs if name.startswith("past_key_values.")}
    mask = np.ones((batch, prompt), np.int64)
    mask[0, :2] = 0
    length = prompt
    for _ in range(steps + 1):
        x = rng.standard_normal((batch, length, hidden)).astype(np.float32)
        positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)[:, -length:]
        out = dict(zip(names, session.run(None, {"inputs_embeds": x, "attention_mask": mask, "position_ids": positions,
                                                 **past})))
        results.append(out)
        past = {name.replace("present.", "past_key_values.", 1): value
                for name, value in out.items() if name != "logits"}
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        length = 1
    return results


def _logits(steps: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([step["logits"].reshape(step["logits"].shape[0], -1) for step in steps])


def _drift(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """Worst row cosine similarity and mean abs difference relative to the reference's std."""
    reference = reference.reshape(reference.shape[0], -1)
    candidate = candidate.reshape(candidate.shape[0], -1)
    cosine = (reference * candidate).sum(-1) / np.linalg.norm(reference, axis=-1) / np.linalg.norm(candidate, axis=-1)
    return float(cosine.min()), float(np.abs(reference - candidate).mean() / reference.std())


def _ops(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def _same_interface(reference: list[dict], candidate: list[dict]) -> None:
    for want, got in zip(reference, candidate, strict=True):
        assert list(got) == list(want)
        for name in want:
            assert got[name].shape == want[name].shape, name
            assert got[name].dtype == np.float32, name
            assert np.isfinite(got[name]).all(), name


# --------------------------------------------------------------------------- the matrix and its errors


def test_available_precisions_and_refusals(tiny, tmp_path):
    paths, _ = tiny
    assert q.AVAILABLE == {
        "vision_encoder": ("fp32", "fp16", "int8"),
        "embed_tokens": ("fp32", "fp16", "int8"),
        "decoder_model_merged": ("fp32", "fp16", "int8", "q4"),
    }
    with pytest.raises(QuantizationError, match="embed_tokens.*drifted"):
        q.quantize_component("embed_tokens", "q4", paths["embed_tokens"], tmp_path / "e.onnx")
    with pytest.raises(QuantizationError, match="convolutions"):
        q.quantize_component("vision_encoder", "q4", paths["vision_encoder"], tmp_path / "v.onnx")
    with pytest.raises(QuantizationError, match="unknown component"):
        q.quantize_component("projector", "int8", paths["vision_encoder"], tmp_path / "p.onnx")
    with pytest.raises(QuantizationError, match="no bf16 variant"):
        q.quantize_component("decoder_model_merged", "bf16", paths["decoder_model_merged"], tmp_path / "d.onnx")
    with pytest.raises(QuantizationError, match="needs calibration"):
        q.quantize_component("vision_encoder", "int8", paths["vision_encoder"], tmp_path / "v.onnx")
    with pytest.raises(QuantizationError, match="no such ONNX file"):
        q.quantize_component("decoder_model_merged", "int8", tmp_path / "missing.onnx", tmp_path / "d.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(QuantizationError, match="not a readable ONNX model"):
        q.quantize_decoder_int8(junk, tmp_path / "d.onnx")
    assert not any(path.name.endswith(".onnx") and path != junk for path in tmp_path.iterdir())


def test_fp32_passthrough_is_validated_copy(tiny, tmp_path):
    paths, _ = tiny
    out = q.quantize_component("embed_tokens", "fp32", paths["embed_tokens"], tmp_path / "embed_tokens.onnx")
    assert out.read_bytes() == paths["embed_tokens"].read_bytes()


def test_embed_int8_is_an_8bit_table(tiny, tmp_path):
    paths, config = tiny
    target = tmp_path / "embed_tokens_int8.onnx"
    if config.language.hidden % 32:
        with pytest.raises(QuantizationError, match="multiple of 32"):
            q.quantize_component("embed_tokens", "int8", paths["embed_tokens"], target)
        return
    out = q.quantize_component("embed_tokens", "int8", paths["embed_tokens"], target)
    assert _ops(out) == ["GatherBlockQuantized"]
    ids = np.arange(min(40, config.language.vocab_size), dtype=np.int64).reshape(2, -1)
    want = _session(paths["embed_tokens"]).run(None, {"input_ids": ids})[0]
    got = _session(out).run(None, {"input_ids": ids})[0]
    assert got.shape == want.shape and np.abs(got - want).max() <= np.abs(want).max() / 127 + 1e-6
    assert out.stat().st_size < paths["embed_tokens"].stat().st_size / 2


def test_reduce_range_follows_vnni(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert q.cpu_supports_vnni(cpuinfo) is False
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert q.cpu_supports_vnni(cpuinfo) is True
    assert q.cpu_supports_vnni(tmp_path / "absent") is None
    assert q.resolve_reduce_range(False) is False and q.resolve_reduce_range(True) is True
    assert q.resolve_reduce_range(None) is (q.cpu_supports_vnni() is not True)


# --------------------------------------------------------------------------- graph optimisation


@pytest.mark.parametrize("level", ["basic", "extended"])
def test_optimize_graph_is_portable_and_exact(exported, tmp_path, level):
    paths, _ = exported
    src = paths["decoder_model_merged"]
    out = optimize.optimize_graph(src, tmp_path / "decoder.onnx", level)
    assert len(_ops(out)) < len(_ops(src))
    assert not optimize.non_portable_ops(onnx_files.op_types(onnx.load(str(out))))
    reference, candidate = _decode(src), _decode(out)
    _same_interface(reference, candidate)
    np.testing.assert_allclose(_logits(candidate), _logits(reference), rtol=1e-4, atol=1e-5)
    vision = optimize.optimize_graph(paths["vision_encoder"], tmp_path / "vision.onnx", level)
    pixels = np.random.default_rng(1).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_session(vision).run(None, {"pixel_values": pixels})[0],
                               _session(paths["vision_encoder"]).run(None, {"pixel_values": pixels})[0],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(QuantizationError, match="unknown optimisation level 'all'"):
        optimize.optimize_graph(src, tmp_path / "all.onnx", "all")


def test_non_portable_ops_are_named():
    assert optimize.non_portable_ops({"MatMul", "com.microsoft:SkipLayerNormalization"}) == set()
    assert optimize.non_portable_ops({"com.microsoft:FusedGemm", "QLinearConv", "com.microsoft.nchwc:Conv"}) == {
        "com.microsoft:FusedGemm", "QLinearConv", "com.microsoft.nchwc:Conv"}


def test_fuse_attention_replaces_each_layer(tiny, tmp_path):
    paths, config = tiny
    src = paths["decoder_model_merged"]
    basic = optimize.optimize_graph(src, tmp_path / "basic.onnx")
    fused = fusion.fuse_attention(basic, tmp_path / "fused.onnx")
    ops = _ops(fused)
    assert ops.count("MultiHeadAttention") == config.language.layers
    assert "Softmax" not in ops and len(ops) < len(_ops(basic)) * 0.6
    reference, candidate = _decode(src), _decode(fused)
    _same_interface(reference, candidate)
    for want, got in zip(reference, candidate):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
    # the raw export (unoptimised) fuses too, and optimize_component chains both steps
    assert _ops(fusion.fuse_attention(src, tmp_path / "raw.onnx")).count("MultiHeadAttention") == config.language.layers
    both = optimize.optimize_component("decoder_model_merged", src, tmp_path / "both.onnx")
    assert _ops(both) == _ops(layer_fusion.fuse_layers(fused, tmp_path / "layers.onnx"))
    # a fusion that does not reproduce the source (wrong head count) is refused and nothing is written
    with pytest.raises(QuantizationError, match="differs from"):
        fusion.fuse_attention(basic, tmp_path / "wrong.onnx", num_heads=1)
    assert not (tmp_path / "wrong.onnx").exists()


def test_fuse_layers_drops_the_mask_subgraph_and_fuses_layer_norms(tiny, tmp_path):
    """Residual + LayerNorm -> SkipLayerNormalization; the mask goes into each attention; outputs unchanged
    wherever the mask is 1 (keys/values at padded positions are never read)."""
    paths, config = tiny
    src = paths["decoder_model_merged"]
    fused = fusion.fuse_attention(optimize.optimize_graph(src, tmp_path / "basic.onnx"), tmp_path / "fused.onnx")
    out = layer_fusion.fuse_layers(fused, tmp_path / "layers.onnx")
    ops = _ops(out)
    assert ops.count("SkipLayerNormalization") >= config.language.layers
    for gone in ("Where", "Range", "LessOrEqual", "Softmax"):
        assert gone not in ops, gone
    model = onnx.load(str(out))
    attentions = [node for node in model.graph.node if node.op_type == "MultiHeadAttention"]
    assert len(attentions) == config.language.layers
    for node in attentions:
        assert node.input[4] == layer_fusion.MASK_NAME and (len(node.input) < 6 or not node.input[5])
        assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "unidirectional")) == 1
    assert [i.name for i in model.graph.input] == [i.name for i in onnx.load(str(src)).graph.input]
    reference, candidate = _decode(src), _decode(out)
    _same_interface(reference, candidate)
    for want, got in zip(reference, candidate):
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-4, atol=1e-5)
        for name in want:
            if name != "logits":  # row 0's first two positions are padding in _decode
                np.testing.assert_allclose(got[name][1], want[name][1], rtol=1e-4, atol=1e-5, err_msg=name)
                np.testing.assert_allclose(got[name][0, :, 2:], want[name][0, :, 2:], rtol=1e-4, atol=1e-5,
                                           err_msg=name)


def test_fuse_layers_that_cannot_be_verified_leaves_the_graph_as_it_was(tiny, tmp_path, caplog):
    paths, _ = tiny
    fused = fusion.fuse_attention(paths["decoder_model_merged"], tmp_path / "fused.onnx")
    out = layer_fusion.fuse_layers(fused, tmp_path / "out.onnx", tolerance=-1.0)  # no rewrite can pass
    assert out.read_bytes() == fused.read_bytes()
    assert "trying without the mask inside attention" in caplog.text and "left as it was" in caplog.text


def test_fuse_attention_copies_lstm(tiny_lstm, tmp_path):
    paths, _ = tiny_lstm
    out = fusion.fuse_attention(paths["decoder_model_merged"], tmp_path / "d.onnx")
    assert out.read_bytes() == paths["decoder_model_merged"].read_bytes()


# --------------------------------------------------------------------------- decoder variants


@pytest.mark.parametrize("precision, min_cosine, max_drift", [("int8", 0.995, 0.05), ("q4", 0.99, 0.08),
                                                               ("fp16", 0.9999, 0.005)])
def test_decoder_variants_track_fp32(exported, tmp_path, precision, min_cosine, max_drift):
    paths, config = exported
    if precision == "q4" and config.language.kind == "lstm":
        pytest.skip("q4 is refused for LSTM decoders (test_q4_refuses_lstm)")
    src = optimize.optimize_component("decoder_model_merged", paths["decoder_model_merged"], tmp_path / "opt.onnx")
    out = q.quantize_component("decoder_model_merged", precision, src, tmp_path / f"decoder_{precision}.onnx")
    reference, candidate = _decode(paths["decoder_model_merged"]), _decode(out)
    _same_interface(reference, candidate)
    cosine, drift = _drift(_logits(reference), _logits(candidate))
    assert cosine > min_cosine and drift < max_drift, (cosine, drift)
    ops = _ops(out)
    if precision == "int8":
        if config.language.kind == "lstm":
            assert ops.count("DynamicQuantizeLSTM") == config.language.layers and "LSTM" not in ops
        else:
            assert "MatMulInteger" in ops
        model = onnx.load(str(out))
        head = next(node for node in model.graph.node if "logits" in node.output)
        assert head.op_type == "MatMul", "the LM head stays float in int8 decoders"


def test_q4_keeps_lm_head_float(tiny, tmp_path):
    paths, config = tiny
    out = q.quantize_decoder_q4(paths["decoder_model_merged"], tmp_path / "q4.onnx", block_size=16)
    model = onnx.load(str(out))
    nbits = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * config.language.layers
    head = next(node for node in model.graph.node if "logits" in node.output)
    assert head.op_type == "MatMul"
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    assert weights[head.input[1]].data_type == onnx.TensorProto.FLOAT
    assert all(attribute.i == 4 for node in nbits for attribute in node.attribute if attribute.name == "bits")

    int8_head = q.quantize_decoder_q4(paths["decoder_model_merged"], tmp_path / "q4_8.onnx", keep_bits=8)
    head = next(node for node in onnx.load(str(int8_head)).graph.node if "logits" in node.output)
    assert head.op_type == "MatMulNBits" and {a.name: a.i for a in head.attribute}["bits"] == 8
    cosine, drift = _drift(_logits(_decode(paths["decoder_model_merged"])), _logits(_decode(int8_head)))
    assert cosine > 0.99 and drift < 0.08

    for bad in ({"block_size": 24}, {"block_size": 8}, {"accuracy_level": 5}, {"keep_bits": 4}):
        with pytest.raises(QuantizationError):
            q.quantize_decoder_q4(paths["decoder_model_merged"], tmp_path / "bad.onnx", **bad)
    assert not (tmp_path / "bad.onnx").exists()


def test_q4_refuses_lstm(tiny_lstm, tmp_path):
    paths, _ = tiny_lstm
    with pytest.raises(QuantizationError, match="not applicable to an LSTM decoder"):
        q.quantize_component("decoder_model_merged", "q4", paths["decoder_model_merged"], tmp_path / "q4.onnx")
    with pytest.raises(QuantizationError, match="not applicable to an LSTM decoder"):
        q.quantize_component("decoder_model_merged", "q4", paths["decoder_model_merged"], tmp_path / "q4.onnx",
                             language_kind="lstm")
    assert not (tmp_path / "q4.onnx").exists()


# --------------------------------------------------------------------------- vision encoder


def _pixels(count: int, seed: int, size: int = 32) -> np.ndarray:
    """Blocky images with noise: smoother than white noise, like downscaled photos."""
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(-1, 1, (count, 3, size // 8, size // 8))
    images = np.kron(blocks, np.ones((1, 1, 8, 8))) + 0.1 * rng.standard_normal((count, 3, size, size))
    return np.clip(images, -1, 1).astype(np.float32)


@pytest.mark.parametrize("kind, method", [("tiny", m) for m in q.CALIBRATION_METHODS] + [("tiny_lstm", "minmax")])
def test_vision_int8_static_qdq(request, tmp_path, kind, method):
    paths, _ = request.getfixturevalue(kind)
    options = QuantizeOptions(calibration_method=method)
    out = q.quantize_component("vision_encoder", "int8", paths["vision_encoder"], tmp_path / "vision_int8.onnx",
                               calibration=_pixels(8, 1), options=options)
    ops = _ops(out)
    assert ops.count("QuantizeLinear") > 4 and ops.count("DequantizeLinear") > 4
    pixels = _pixels(4, 2)
    reference = _session(paths["vision_encoder"]).run(None, {"pixel_values": pixels})[0]
    candidate = _session(out).run(None, {"pixel_values": pixels})[0]
    assert candidate.shape == reference.shape and candidate.dtype == np.float32
    cosine, drift = _drift(reference, candidate)
    assert cosine > 0.99 and drift < 0.06, (cosine, drift)


@pytest.mark.parametrize("calibration, message", [
    (np.zeros((0, 3, 32, 32), np.float32), "empty"),
    (np.zeros((4, 32, 32, 3), np.float32), r"\[N, 3, H, W\]"),
    (np.zeros((3, 32, 32), np.float32), r"\[N, 3, H, W\]"),
    (np.zeros((2, 3, 48, 48), np.float32), "expects 32x32"),
    (np.zeros((2, 3, 32, 32), np.uint8), "float"),
    (np.full((2, 3, 32, 32), np.nan, np.float32), "NaN"),
    ([[0.0]], "numpy array"),
])
def test_vision_int8_rejects_bad_calibration(tiny, tmp_path, calibration, message):
    paths, _ = tiny
    with pytest.raises(QuantizationError, match=message):
        q.quantize_vision_int8(paths["vision_encoder"], tmp_path / "v.onnx", calibration)
    assert not any(tmp_path.iterdir())


def test_vision_int8_rejects_unknown_method(tiny, tmp_path):
    paths, _ = tiny
    with pytest.raises(QuantizationError, match="calibration method"):
        q.quantize_vision_int8(paths["vision_encoder"], tmp_path / "v.onnx", _pixels(2, 0), method="kl")


# --------------------------------------------------------------------------- fp16


def test_fp16_runs_on_cpu_with_float32_io_and_safe_mask(exported, tmp_path):
    paths, _ = exported
    for component in ("vision_encoder", "embed_tokens"):
        out = q.quantize_component(component, "fp16", paths[component], tmp_path / f"{component}_fp16.onnx")
        session, reference = _session(out), _session(paths[component])
        assert [i.type for i in session.get_inputs()] == [i.type for i in reference.get_inputs()]
        feed = ({"pixel_values": _pixels(2, 3)} if component == "vision_encoder"
                else {"input_ids": np.array([[1, 5, 300], [2, 7, 9]], np.int64)})
        got, want = session.run(None, feed)[0], reference.run(None, feed)[0]
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    out = q.convert_fp16(paths["decoder_model_merged"], tmp_path / "decoder_fp16.onnx")
    model = onnx.load(str(out))
    assert any(tensor.data_type == onnx.TensorProto.FLOAT16 for tensor in model.graph.initializer)
    constants = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
    constants += [onnx.numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.name == "value"]
    for array in constants:
        if array.dtype == np.float16 and array.size:
            assert np.isfinite(array).all() and np.abs(array).max() <= q.FP16_SAFE_LIMIT
    with pytest.raises(QuantizationError, match="optimise the fp32 graph"):
        optimize.optimize_graph(out, tmp_path / "again.onnx")


def test_fp16_clamps_the_attention_mask_fill(tiny, tmp_path):
    """finfo(float32).min would become -65504 in fp16, and score + mask overflows to -inf on GPUs."""
    paths, _ = tiny
    model = onnx.load(str(paths["decoder_model_merged"]))
    assert q._clamp_for_fp16(model) >= 1
    assert q._clamp_for_fp16(model) == 0  # idempotent


def test_quantize_options_are_frozen_and_validated_when_made():
    import dataclasses

    options = QuantizeOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.block_size = 32
    cases = [
        ({"calibration_method": "median"}, "unknown calibration method 'median'"),
        ({"block_size": 24}, "block_size must be a power of two of at least 16, got 24"),
        ({"block_size": 8}, "block_size must be a power of two"),
        ({"accuracy_level": 5}, "accuracy_level must be 0-4, got 5"),
        ({"keep_bits": 4}, "keep_bits must be None"),
        ({"keep_float": "lm_head"}, "keep_float must be a tuple"),
        ({"per_channel": "yes"}, "per_channel must be True, False or None"),
        ({"calibration_batch_size": 0}, "batch_size must be at least 1, got 0"),
    ]
    for fields, message in cases:
        with pytest.raises(QuantizationError, match=message):
            QuantizeOptions(**fields)
    assert QuantizeOptions(block_size=64, keep_bits=8, accuracy_level=0).block_size == 64


def test_quantization_errors_are_export_errors():
    from vledge.errors import ExportError, VledgeError

    assert issubclass(QuantizationError, ExportError) and issubclass(QuantizationError, VledgeError)
    assert q.QuantizationError is QuantizationError


def test_calibration_is_sized_to_the_memory_available(tmp_path, monkeypatch):
    """The calibrator records every activation of every image it is fed: a real-size vision tower is calibrated on
    as many images as fit a share of the memory, instead of exhausting it."""
    import vledge.families.size as size
    from vledge.export import calibration

    pixels = np.zeros((64, 3, 8, 8), np.float32)
    monkeypatch.setattr(calibration, "activation_bytes_per_image", lambda path: 900_000_000)
    monkeypatch.setattr(size, "available_memory", lambda: 16 * 10**9)  # a quarter: 4 GB, 4 images
    kept, batch = calibration.calibration_within_memory(tmp_path / "m.onnx", pixels, 8, "minmax")
    assert batch == 4 and len(kept) == 4
    monkeypatch.setattr(calibration, "activation_bytes_per_image", lambda path: 1000)
    kept, batch = calibration.calibration_within_memory(tmp_path / "m.onnx", pixels, 8, "entropy")
    assert batch == 8 and len(kept) == 64


def test_activation_bytes_are_counted_from_the_inferred_shapes(tmp_path):
    from onnx import TensorProto, helper

    from vledge.export.calibration import activation_bytes_per_image

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tiles", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tiles", 3, 8, 8])],
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, ["tiles", 3, 8, 8])])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert activation_bytes_per_image(path) == 3 * 8 * 8 * 4  # one intermediate tensor, the tile axis as 1
