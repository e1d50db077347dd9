"""The Llama-family decoder pass: RMSNorm fusions and packed projections, equal to transformers' logits."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch

from hf_folders import make_lm_folder

CASES = {"llama": ("llama", False), "qwen2": ("qwen2", True), "mistral": ("mistral", False)}  # qwen2: q/k/v biases


def _model(folder):
    from vledge.config import ModelConfig, preset
    from vledge.hf.language_model import load_pretrained_lm
    from vledge.models.vlm import VisionLanguageModel

    pretrained = load_pretrained_lm(folder)
    tiny, _ = preset("tiny")
    config = ModelConfig(vision=tiny.vision, projector=tiny.projector, preprocess=tiny.preprocess,
                         language=pretrained.config)
    model = VisionLanguageModel(config, image_token_id=0).eval()
    language = {k[len("language."):]: v for k, v in pretrained.state_dict.items() if k.startswith("language.")}
    model.language.load_state_dict(language)
    with torch.no_grad():
        model.embed_tokens.weight.copy_(pretrained.state_dict["embed_tokens.weight"])
    return pretrained, model


@pytest.fixture(scope="module", params=sorted(CASES))
def decoders(request, tmp_path_factory):
    from vledge.export.graphs import export_graphs
    from vledge.export.optimize import optimize_component

    arch, tied = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    folder = make_lm_folder(root / "hf", arch, tied=tied, seed=11)
    pretrained, model = _model(folder)
    assert pretrained.config.kind == arch
    raw = export_graphs(model, root / "raw")["decoder_model_merged"]
    unfused = optimize_component("decoder_model_merged", raw, root / "unfused.onnx", fuse=False, language_kind=arch)
    fused = optimize_component("decoder_model_merged", raw, root / "fused.onnx", language_kind=arch)
    return request.param, folder, pretrained, unfused, fused


def _ops(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_norms_fuse_and_projections_pack(decoders):
    family, _, pretrained, unfused, fused = decoders
    layers = pretrained.config.layers
    before, after = _ops(unfused), _ops(fused)
    # attention is one GroupQueryAttention a layer (no attention products left), in both graphs
    assert before["GroupQueryAttention"] == after["GroupQueryAttention"] == layers
    assert before["Softmax"] == after["Softmax"] == 0
    # rotary embeddings are one RotaryEmbedding for the queries and one for the keys, a layer
    assert before["RotaryEmbedding"] == after["RotaryEmbedding"] == 2 * layers
    assert after["Neg"] == 0  # no rotate_half left
    # per layer: q/k/v -> 1 and gate/up -> 1 MatMul; o/down/head are left
    assert before["MatMul"] == 7 * layers + 1 and after["MatMul"] == 4 * layers + 1, (before, after)
    assert after["Split"] == before["Split"] + 2 * layers
    # every norm after a residual Add (all but the first) becomes SkipSimplifiedLayerNormalization
    assert after["SkipSimplifiedLayerNormalization"] >= 2 * layers - 1
    assert after["ReduceMean"] < before["ReduceMean"]
    assert sum(after.values()) < sum(before.values())
    inputs = [value.name for value in onnx.load(str(fused)).graph.input]
    assert inputs == [value.name for value in onnx.load(str(unfused)).graph.input]


def _session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_fused_decoder_equals_transformers_left_padded_prefill_and_cached_steps(decoders):
    import transformers

    from vledge.models.vlm import position_ids_from_mask

    family, folder, pretrained, _, fused = decoders
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    embed = pretrained.state_dict["embed_tokens.weight"].float()
    vocab = pretrained.original_vocab_size
    kv_heads, head_dim = pretrained.config.key_value_heads, pretrained.config.head_dim
    session = _session(fused)
    names = [value.name for value in session.get_outputs()]
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 31], [0, 0, 0, 12, 77, 3, 140]])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    feeds = {f"past_key_values.{i}.{kind}": np.zeros((2, kv_heads, 0, head_dim), np.float32)
             for i in range(pretrained.config.layers) for kind in ("key", "value")}
    past = None
    rng = np.random.default_rng(0)
    for step in range(3):  # a left-padded prefill, then two KV-cached decode steps
        new = ids if step == 0 else torch.as_tensor(rng.integers(3, vocab, (2, 1)))
        if step:
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        positions = position_ids_from_mask(mask)[:, -new.shape[1]:]
        with torch.no_grad():
            out = reference(inputs_embeds=embed[new], attention_mask=mask, position_ids=positions,
                            past_key_values=past, use_cache=True)
        past = out.past_key_values
        expected = out.logits.numpy()
        result = session.run(None, {"inputs_embeds": embed[new].numpy(), "attention_mask": mask.numpy(),
                                    "position_ids": positions.numpy(), **feeds})
        assert result[0].shape == (2, 1, pretrained.config.vocab_size)  # the graph returns the last position's
        assert np.abs(result[0][:, -1, :vocab] - expected[:, -1]).max() < 1e-3, (family, step)
        feeds = {name.replace("present.", "past_key_values.", 1): value for name, value in zip(names[1:], result[1:])}
        assert feeds["past_key_values.0.key"].shape == (2, kv_heads, mask.shape[1], head_dim)


def test_a_rewrite_that_changes_the_numbers_is_dropped(decoders, tmp_path, monkeypatch, caplog):
    """A packing that puts the weights in the wrong order must fail the check and leave the graph as it was."""
    import vledge.export.llama_fusion as llama_fusion

    _, _, _, unfused, _ = decoders
    original = np.concatenate

    def swapped(arrays, axis=0, **kwargs):
        return original(list(reversed(arrays)), axis=axis, **kwargs)

    monkeypatch.setattr(llama_fusion.np, "concatenate", swapped)
    out = llama_fusion.fuse_llama(unfused, tmp_path / "out.onnx")
    assert "dropped" in caplog.text
    ops = _ops(out)
    assert ops["MatMul"] == _ops(unfused)["MatMul"]  # nothing packed: only the norm fusion survived
    assert ops["SkipSimplifiedLayerNormalization"] >= 1


def test_llama_int8_is_8bit_weight_only_and_tracks_fp32(decoders, tmp_path):
    from vledge.export.fusion import decoder_probe
    from vledge.export.quantize import QuantizeOptions, quantize_component
    from vledge.families import language_family

    family, _, _, _, fused = decoders
    kind = language_family(family).int8_weights
    assert kind == "matmulnbits"
    out = quantize_component("decoder_model_merged", "int8", fused, tmp_path / "int8.onnx",
                             options=QuantizeOptions(int8_weights=kind), language_kind=family)
    model = onnx.load(str(out))
    nbits = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    assert {onnx.helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "bits"} == {8}
    assert {onnx.helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "block_size"} == {32}
    assert any("lm_head" in n.name for n in nbits)  # the head too: 8-bit weights drift like float here
    assert not any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in model.graph.node)
    want, got = decoder_probe(_session(fused)), decoder_probe(_session(out))
    for a, b in zip(want, got):
        x, y = a[0].ravel(), b[0].ravel()
        assert float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) > 0.999


def test_int8_weight_only_options_are_validated():
    from vledge.errors import QuantizationError
    from vledge.export.quantize import QuantizeOptions

    for bad in (dict(int8_weights="static"), dict(int8_block_size=24), dict(int8_symmetric=1)):
        with pytest.raises(QuantizationError, match=next(iter(bad))):
            QuantizeOptions(**bad)


def test_llama_q4_is_minmax_with_block_offsets_and_tracks_fp32(decoders, tmp_path):
    from vledge.export.fusion import decoder_probe
    from vledge.export.quantize import QuantizeOptions, quantize_component
    from vledge.families import language_family

    family, _, pretrained, _, fused = decoders
    assert language_family(family).q4_scheme == "minmax"
    options = QuantizeOptions(keep_bits=language_family(family).q4_head_bits)
    out = quantize_component("decoder_model_merged", "q4", fused, tmp_path / "q4.onnx", options=options,
                             language_kind=family)
    model = onnx.load(str(out))
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in model.graph.node if n.op_type == "MatMulNBits"}
    hidden, inner, layers = pretrained.config.hidden, pretrained.config.intermediate, pretrained.config.layers
    # rows in whole blocks of 32 (q/k/v, o, gate/up) carry their block offsets as K/32 extra rows; the down
    # projection's 112 rows are not whole blocks and fall back to ONNX Runtime's packer; the head is 8-bit
    assert sum(a["K"] == hidden + hidden // 32 and a["bits"] == 4 for a in attrs.values()) == 3 * layers
    assert inner % 32 and sum(a["K"] == inner and a["bits"] == 4 for a in attrs.values()) == layers
    head = next(n for n in model.graph.node if "logits" in n.output)
    assert head.op_type == "MatMulNBits" and attrs[head.name]["bits"] == 8
    assert _ops(out)["Concat"] >= _ops(fused)["Concat"] + 3 * layers
    want, got = decoder_probe(_session(fused)), decoder_probe(_session(out))
    for a, b in zip(want, got):
        x, y = a[0].ravel(), b[0].ravel()
        assert float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) > 0.99
