"""The parity gate judges LMs teacher-forced: top-1 next-token agreement and KL divergence against PyTorch."""

from __future__ import annotations

import math
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from vledge.export.forced import TeacherForced
from vledge.manifest import MANIFEST_NAME, read_manifest

VARIANTS = {"vision_encoder": {"fp32": "v.onnx"}, "embed_tokens": {"fp32": "e.onnx"},
            "decoder_model_merged": {"fp32": "d.onnx", "int8": "d8.onnx", "q4": "d4.onnx"}}


def _measured(free_running: float, decode_ms: float, top1: float | None = None, kl: float = 0.0):
    from vledge.export.parity import Agreement, Drift, VariantParity

    drift = Drift(0.0, 0.0, 1.0, True)
    forced = {} if top1 is None else {"answers": TeacherForced("held-out answers", 200, top1, kl, kl)}
    return VariantParity(precisions={}, image_embeds=drift, prefill_logits=drift,
                         generation=Agreement(free_running, free_running, None, None, None), accuracy={"overall": 0.0},
                         accuracy_delta=0.0, questions=10,
                         latency_ms={"vision_ms": 1.0, "embed_ms": 1.0, "decode_step_ms": decode_ms},
                         teacher_forced=forced)


def test_teacher_forced_figures_by_hand():
    # two positions over a 2-token vocabulary: p = (0.5, 0.5) then (0.9, 0.1); the variant says (0.25, 0.75)
    # then (0.9, 0.1): KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) at the first position, 0 at the second
    reference = [np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))]
    ours = [np.log(np.array([[0.25, 0.75], [0.9, 0.1]]))]
    figures = TeacherForced.between("x", ours, reference)
    first = 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)
    assert figures.positions == 2
    assert figures.top1_agreement == 0.5  # argmax of (0.5, 0.5) is token 0, the variant's is token 1
    assert figures.mean_kl == pytest.approx(first / 2)
    assert figures.max_kl == pytest.approx(first)


def test_low_free_running_but_high_teacher_forced_agreement_is_accepted():
    """One early divergence ruins free-running agreement; teacher-forced figures see the variant is faithful."""
    from vledge.export import ExportOptions
    from vledge.export.export import _select
    from vledge.export.gate import judge

    parity = {"fp32": _measured(1.0, 1.0, 1.0),
              "decoder_model_merged:int8": _measured(0.99, 0.8, 0.995, 0.002),
              "decoder_model_merged:q4": _measured(0.17, 0.5, 0.985, 0.02)}
    assert _select(parity, VARIANTS, ExportOptions())["cpu"]["decoder_model_merged"] == "q4"
    verdict = judge(parity["decoder_model_merged:q4"], ExportOptions())
    assert verdict.passed and verdict.decided_by == "teacher-forced"
    # the free-running budget still decides when asked to
    free = ExportOptions(gate="free-running")
    assert _select(parity, VARIANTS, free)["cpu"]["decoder_model_merged"] == "int8"
    assert judge(parity["decoder_model_merged:q4"], free).decided_by == "free-running"


@pytest.mark.parametrize("top1, kl, reason", [(0.85, 0.01, "top-1 agreement 85.0%"),
                                              (0.99, 0.2, "mean KL divergence 0.2 nats")])
def test_teacher_forced_budgets_block_a_variant(top1, kl, reason):
    from vledge.export import ExportOptions
    from vledge.export.export import _select
    from vledge.export.gate import judge

    parity = {"fp32": _measured(1.0, 1.0, 1.0),
              "decoder_model_merged:int8": _measured(0.5, 0.8, 0.995, 0.002),
              "decoder_model_merged:q4": _measured(1.0, 0.5, top1, kl)}  # perfect free-running agreement
    assert _select(parity, VARIANTS, ExportOptions())["cpu"]["decoder_model_merged"] == "int8"
    verdict = judge(parity["decoder_model_merged:q4"], ExportOptions())
    assert not verdict.passed and reason in verdict.reasons[0]
    lenient = ExportOptions(min_top1_agreement=0.8, max_mean_kl=0.5)
    assert _select(parity, VARIANTS, lenient)["cpu"]["decoder_model_merged"] == "q4"


@pytest.mark.parametrize("field, value", [("gate", "greedy"), ("min_top1_agreement", 1.5),
                                          ("max_mean_kl", -0.1), ("max_mean_kl", float("nan")),
                                          ("parity_text_tokens", 0)])
def test_gate_options_are_validated(field, value):
    from vledge.errors import ConfigError
    from vledge.export import ExportOptions

    with pytest.raises(ConfigError, match=field):
        ExportOptions(**{field: value})


def test_manifest_and_report_carry_teacher_forced_figures(tiny_model_dir):
    manifest = read_manifest(tiny_model_dir)
    variants = manifest.parity["variants"]
    fp32 = variants["fp32"]["teacher_forced"]["answers"]
    assert fp32["positions"] >= 24  # every answer token of the 24 held-out questions, end token included
    assert fp32["top1_agreement"] == 1.0 and fp32["mean_kl"] < 1e-6
    q4 = variants["decoder_model_merged:q4"]["teacher_forced"]["answers"]
    assert q4["positions"] == fp32["positions"] and 0 < q4["mean_kl"]
    gate = manifest.parity["gate"]
    assert gate["metric"] == "teacher-forced" and gate["min_top1_agreement"] == 0.9
    assert gate["verdicts"]["decoder_model_merged:q4"]["decided_by"] == "teacher-forced"
    report = (tiny_model_dir / "parity.md").read_text()
    assert "## Gate" in report and "decided by teacher-forced agreement" in report
    assert "teacher-forced top-1 (held-out answers" in report and report.count("| fp32 |") == 1


def _corrupt_matmul_nbits(path):
    """Scramble the packed 4-bit weights of every MatMulNBits node: a genuinely broken variant."""
    model = onnx.load(str(path))
    packed = {node.input[1] for node in model.graph.node if node.op_type == "MatMulNBits"}
    assert packed
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        if tensor.name in packed:
            array = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(rng.integers(0, 256, array.shape, dtype=np.uint8), tensor.name))
    onnx.save(model, str(path))


def test_the_gate_blocks_a_quantized_decoder_broken_on_purpose(tiny_run, tiny_model_dir, synth_data, tmp_path):
    from vledge.checkpoint import load_checkpoint
    from vledge.data.loaders import load_records
    from vledge.export import ExportOptions
    from vledge.export.forced import answer_set
    from vledge.export.gate import judge
    from vledge.export.parity import build_samples, measure_runtime, torch_reference
    from vledge.runtime import load

    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    _corrupt_matmul_nbits(broken / "onnx" / "decoder_model_merged_q4.onnx")
    checkpoint = load_checkpoint(tiny_run.best_checkpoint)
    model, tokenizer = checkpoint.build_model(), checkpoint.tokenizer()
    records, _ = load_records(synth_data, split="test")
    samples = build_samples(records, model, tokenizer, 12)
    forced = {"answers": answer_set(tokenizer, model.config.prompt, samples.image_index, samples.prompts,
                                    samples.answers)}
    reference = torch_reference(model, tokenizer, samples, forced=forced)
    verdicts = {}
    for precision in ("q4", "fp32"):
        runtime = load(broken, precision={"decoder_model_merged": precision}, providers="cpu", threads=1,
                       verify=False)
        measured = measure_runtime(runtime, samples, reference)
        verdicts[precision] = (judge(measured, ExportOptions()), measured.teacher_forced["answers"])
    verdict, figures = verdicts["q4"]
    assert not verdict.passed and verdict.decided_by == "teacher-forced", verdict
    assert figures.mean_kl > 0.05 and figures.top1_agreement < 0.9
    assert verdicts["fp32"][0].passed and verdicts["fp32"][1].top1_agreement == 1.0


def test_parity_text_that_cannot_be_read_fails_before_any_work(tiny_run, tmp_path):
    from vledge.cli import main

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    for text, message in [(tmp_path / "missing.txt", "no such file"), (bad, "not UTF-8 text")]:
        result = CliRunner().invoke(main, ["export", str(tiny_run.best_checkpoint), "-o", str(tmp_path / "m"),
                                           "--parity-text", str(text)])
        assert result.exit_code != 0
        assert "Error: ExportError: --parity-text" in result.output and message in result.output, result.output
        assert not (tmp_path / "m").exists()


def test_parity_text_is_teacher_forced(tiny_run, synth_data, tmp_path):
    from vledge.export import ExportOptions, export

    text = tmp_path / "text.txt"
    text.write_text("There is a red circle. There are two blue squares and a green triangle. " * 8, encoding="utf-8")
    options = ExportOptions(quantize=("q4",), data=synth_data, parity_samples=8, calibration_samples=4,
                            parity_text=text, parity_text_tokens=100)
    result = export(tiny_run.best_checkpoint, tmp_path / "model", options)
    manifest = read_manifest(result.model_dir)
    assert manifest.parity["teacher_forced"]["text"] == {"source": "text text.txt", "positions": 100}
    fp32 = result.parity["fp32"].teacher_forced["text"]
    assert fp32.positions == 100 and fp32.top1_agreement == 1.0
    q4 = result.parity["decoder_model_merged:q4"].teacher_forced["text"]
    assert q4.positions == 100 and q4.mean_kl > 0
    assert "text text.txt" in (result.model_dir / "parity.md").read_text()
    assert (result.model_dir / MANIFEST_NAME).exists()


def test_auto_takes_the_smaller_of_two_variants_as_fast_as_each_other():
    """Timer noise must not keep a float token table when an 8-bit one passes the gate and runs as fast."""
    from vledge.export import ExportOptions
    from vledge.export.export import _select

    variants = {**VARIANTS, "embed_tokens": {"fp32": "e.onnx", "int8": "e8.onnx"}}
    parity = {"fp32": _measured(1.0, 1.0, 1.0),
              "embed_tokens:int8": _measured(1.0, 1.0, 1.0),
              "decoder_model_merged:int8": _measured(0.99, 0.8, 0.995, 0.002),
              "decoder_model_merged:q4": _measured(0.99, 0.8, 0.995, 0.002)}
    parity["fp32"].latency_ms.update(embed_ms=0.01, decode_step_ms=40.0)
    parity["embed_tokens:int8"].latency_ms.update(embed_ms=0.03)
    parity["decoder_model_merged:int8"].latency_ms.update(decode_step_ms=19.0)
    parity["decoder_model_merged:q4"].latency_ms.update(decode_step_ms=19.5)
    sizes = {"embed_tokens": {"fp32": 113_000_000, "int8": 32_000_000},
             "decoder_model_merged": {"fp32": 539_000_000, "int8": 152_000_000, "q4": 104_000_000},
             "vision_encoder": {"fp32": 1_000_000}}
    chosen = _select(parity, variants, ExportOptions(), sizes)["cpu"]
    assert chosen["embed_tokens"] == "int8" and chosen["decoder_model_merged"] == "q4"
    without_sizes = _select(parity, variants, ExportOptions())["cpu"]  # the fastest alone
    assert without_sizes["embed_tokens"] == "fp32" and without_sizes["decoder_model_merged"] == "int8"
    parity["decoder_model_merged:q4"].latency_ms.update(decode_step_ms=25.0)  # clearly slower: speed decides
    assert _select(parity, variants, ExportOptions(), sizes)["cpu"]["decoder_model_merged"] == "int8"
