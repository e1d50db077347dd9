"""The export spares variants ``--quantize auto`` could never choose a full measurement, and reports progress."""

from __future__ import annotations

import json

import pytest

from vledge.export.screening import reason_not_to_measure, teacher_forced_agreement
from vledge.runtime import load


@pytest.fixture(scope="module")
def reference_and_samples(tiny_run, synth_data):
    from vledge.checkpoint import load_checkpoint
    from vledge.data.loaders import load_records
    from vledge.export.parity import build_samples, torch_reference

    checkpoint = load_checkpoint(tiny_run.best_checkpoint)
    model, tokenizer = checkpoint.build_model(), checkpoint.tokenizer()
    records, _ = load_records(synth_data, split="test")
    samples = build_samples(records, model, tokenizer, 16)
    return torch_reference(model, tokenizer, samples), samples


def test_a_cpu_only_export_builds_fp16_for_cuda_without_measuring_it(tiny_model_dir):
    from vledge.export.screening import cuda_works

    manifest = json.loads((tiny_model_dir / "vledge.json").read_text())
    assert "fp16" in manifest["variants"]["decoder_model_merged"]
    assert manifest["selected"]["cuda"]["decoder_model_merged"] == "fp16"
    measured = [label for label in manifest["parity"]["variants"] if label.endswith(":fp16")]
    if cuda_works():  # a machine with a working CUDA provider measures what it could choose
        assert "decoder_model_merged:fp16" in measured
    else:
        assert not measured
        assert "built for CUDA" in manifest["parity"]["not_measured"]["decoder_model_merged:fp16"]


def test_fp32_fed_pytorchs_answers_picks_every_token_of_them(tiny_model_dir, reference_and_samples):
    reference, samples = reference_and_samples
    runtime = load(tiny_model_dir, precision="fp32", providers="cpu", threads=1)
    assert sum(map(len, reference.tokens[:16])) > 16
    assert teacher_forced_agreement(runtime, samples, reference) == 1.0


def test_a_variant_outside_the_token_budget_teacher_forced_is_not_generated_in_full(tiny_model_dir,
                                                                                    reference_and_samples):
    reference, samples = reference_and_samples
    runtime = load(tiny_model_dir, precision={"decoder_model_merged": "q4"}, providers="cpu", threads=1)
    agreement = teacher_forced_agreement(runtime, samples, reference)
    assert reason_not_to_measure(tiny_model_dir, "decoder_model_merged", "q4", samples, reference,
                                 agreement, threads=1) is None
    why = reason_not_to_measure(tiny_model_dir, "decoder_model_merged", "q4", samples, reference,
                                agreement + 1e-6, threads=1)
    assert why is not None and f"{agreement:.1%}" in why and "not generated in full" in why


def test_fp16_is_measured_only_where_cuda_works(tiny_model_dir, reference_and_samples):
    reference, samples = reference_and_samples
    args = (tiny_model_dir, "decoder_model_merged", "fp16", samples, reference, 0.9)
    assert reason_not_to_measure(*args, threads=1, cuda=True) is None
    assert "no CUDA provider" in reason_not_to_measure(*args, threads=1, cuda=False)


def test_the_export_reports_progress_per_question(tiny_run, synth_data, tmp_path):
    from vledge.export import ExportOptions, export

    seen: dict[str, list[tuple[int, int]]] = {}
    options = ExportOptions(quantize=("none",), data=synth_data, parity_samples=8, calibration_samples=8)
    export(tiny_run.best_checkpoint, tmp_path / "model", options,
           on_questions=lambda label, done, total: seen.setdefault(label, []).append((done, total)))
    assert set(seen) == {"pytorch", "fp32"}
    for counts in seen.values():
        assert counts[0] == (0, 8) and counts[-1] == (8, 8)
        assert [done for done, _ in counts] == sorted(done for done, _ in counts)
