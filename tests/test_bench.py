"""The benchmark harness on the tiny model: it runs, writes complete outputs, and its parity is real."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from vledge.benchmark.engines import EngineSpec
from vledge.benchmark.run import STAGES, BenchConfig, run_benchmark
from vledge.errors import ConfigError

from vledge.benchmark.openvino_engine import openvino_available

# OpenVINO joins when its optional package is installed; the bench must work either way.
ENGINES = ("pytorch", "pytorch-int8", "ort-cpu-fp32", "ort-cpu-int8") + (
    ("openvino-cpu-fp32",) if openvino_available() else ())


@pytest.fixture(scope="module")
def bench(tiny_run, tiny_model_dir, synth_data, tmp_path_factory):
    from vledge.benchmark.report import write_outputs

    config = BenchConfig(ckpt=tiny_run.best_checkpoint, model_dir=tiny_model_dir, data=synth_data, engines=ENGINES,
                         threads=(1,), batches=(1, 2), repeats=3, decode_tokens=4, caption_tokens=8,
                         parity_samples=12, cold_start=True)
    result = run_benchmark(config)
    out = tmp_path_factory.mktemp("bench")
    return result, write_outputs(result, out), out


def test_bench_writes_json_markdown_and_charts(bench):
    result, written, out = bench
    data = json.loads(written["json"].read_text())
    assert data["engines"] == list(ENGINES)
    for key in ("machine", "load", "config", "reference", "latency", "parity", "cold_start", "seconds"):
        assert key in data, key
    for key in ("cpu", "logical_cores", "cpu_flags", "versions", "providers_available"):
        assert key in data["machine"], key
    assert {row["engine"] for row in data["latency"]} == set(ENGINES)
    for row in data["latency"]:
        assert row["threads"] == 1
        for stage in STAGES:
            stats = row["stages"][stage]
            assert stats["runs"] >= 3 and 0 < stats["median"] <= stats["p90"] <= stats["p99"] + 1e-9
            assert row["ratio_to_pytorch"][stage] > 0
        assert set(row["throughput"]) == {"1", "2"} and all(v > 0 for v in row["throughput"].values())
    pytorch = next(r for r in data["latency"] if r["engine"] == "pytorch")
    assert all(abs(v - 1.0) < 1e-9 for v in pytorch["ratio_to_pytorch"].values())
    for name in ENGINES:
        cold = data["cold_start"][name]
        assert cold["peak_rss_mb"] > 10 and cold["import_and_load_ms"] > 0, (name, cold)
        assert data["parity"][name]["size_bytes"] > 0
    table = written["markdown"].read_text()
    for name in ENGINES:
        assert f"| {name} |" in table
    for name in ("latency_by_stage", "accuracy_vs_speed"):
        image = cv2.imread(str(written[name]))
        assert image is not None and image.shape[0] > 100


def test_bench_parity_comes_from_real_outputs(bench, tiny_run, tiny_model_dir, synth_data):
    """The original agrees with itself exactly; the int8 engine's agreement is what the runtime really produces."""
    from vledge.checkpoint import load_checkpoint
    from vledge.export.export import ExportOptions, _held_out_data
    from vledge.export.parity import Agreement, torch_reference
    from vledge.runtime import load

    result, _, _ = bench
    parity = result["parity"]
    assert parity["pytorch"]["image_embeds"]["max_abs"] == 0.0
    assert parity["pytorch"]["generation"]["token_agreement"] == 1.0
    assert 0 < parity["ort-cpu-fp32"]["prefill_logits"]["max_abs"] < 1e-3
    assert parity["pytorch-int8"]["prefill_logits"]["max_abs"] > parity["ort-cpu-fp32"]["prefill_logits"]["max_abs"]

    checkpoint = load_checkpoint(tiny_run.best_checkpoint)
    model, tokenizer = checkpoint.build_model(), checkpoint.tokenizer()
    _, samples = _held_out_data(ExportOptions(data=synth_data, parity_samples=12, calibration_samples=1), model,
                                tokenizer, None)
    reference = torch_reference(model, tokenizer, samples)
    runtime = load(tiny_model_dir, precision="int8", providers="cpu", threads=1)
    embeds = runtime.graphs.encode_images(samples.pixel_values)
    from vledge.decoding import GenerationOptions
    from vledge.export.parity import max_new_tokens_for, task_batches

    # Dynamic int8 scales activations per batch, so answer the questions in the bench's own batches.
    tokens: list = [None] * len(samples)
    for batch in task_batches(samples, 32):
        rows = [samples.image_index[i] for i in batch]
        options = GenerationOptions(max_new_tokens=max_new_tokens_for(samples.tasks[batch[0]]))
        outputs = runtime.generate_from_embeds(embeds[rows], [samples.prompts[i] for i in batch], options)
        for index, out in zip(batch, outputs):
            tokens[index] = out.token_ids
    texts = [tokenizer.decode(t).strip() for t in tokens]
    expected = Agreement.between(tokens, reference.tokens, texts, reference.texts, samples.tasks)
    assert parity["ort-cpu-int8"]["generation"]["token_agreement"] == pytest.approx(expected.token_agreement)
    assert np.isfinite(parity["ort-cpu-int8"]["accuracy_delta"])


def test_engine_names_are_checked():
    assert EngineSpec.parse("ort-cuda-fp16") == EngineSpec("onnxruntime", "fp16", "cuda")
    assert EngineSpec.parse("pytorch-int8").name == "pytorch-int8"
    assert EngineSpec.parse("pytorch-compile") == EngineSpec("pytorch", "compile")
    assert EngineSpec.parse("openvino-cpu-q4") == EngineSpec("openvino", "q4", "cpu")
    assert EngineSpec.parse("openvino-cpu-int8").name == "openvino-cpu-int8"
    for bad in ("openvino-cuda-fp32", "openvino-cpu-fp16", "pytorch-fp16"):
        with pytest.raises(ConfigError, match="unknown engine"):
            EngineSpec.parse(bad)
    with pytest.raises(ConfigError, match="unknown engine"):
        EngineSpec.parse("tensorflow")
    with pytest.raises(ConfigError, match="repeats"):
        BenchConfig(ckpt=None, model_dir=None, repeats=1)


def test_every_engine_is_timed_in_a_process_of_its_own(bench):
    result, written, _ = bench
    pids = [row["pid"] for row in result["latency"]]
    assert len(set(pids)) == len(ENGINES) and os.getpid() not in pids
    for row in result["latency"]:
        assert row["load_ms"] > 0 and row["warmup_ms"] > 0
    load = result["load"]
    assert load["seconds"] > 0 and load["benchmark_cpu_cores"] > 0
    assert load["other_processes_cpu_cores"] is None or load["other_processes_cpu_cores"] >= 0
    assert "Machine load during the run" in written["markdown"].read_text()


@pytest.mark.skipif(not openvino_available(), reason="openvino is not installed (the [bench] extra)")
def test_openvino_runs_the_same_onnx_files(bench):
    parity = bench[0]["parity"]["openvino-cpu-fp32"]
    assert parity["precisions"]["decoder_model_merged"] == "fp32"
    assert 0 <= parity["prefill_logits"]["max_abs"] < 1e-3
    assert parity["generation"]["token_agreement"] > 0.95


def test_worker_reports_failures_and_keeps_serving(tiny_model_dir, tiny_run):
    from vledge.benchmark.worker import EngineWorker, WorkerError

    with EngineWorker("ort-cpu-fp32", 1) as worker:
        with pytest.raises(WorkerError, match="failed load"):
            worker.call("load", engine="ort-cpu-fp32", ckpt=str(tiny_run.best_checkpoint),
                        model_dir=str(tiny_model_dir / "missing"), threads=1)
        loaded = worker.call("load", engine="ort-cpu-fp32", ckpt=str(tiny_run.best_checkpoint),
                             model_dir=str(tiny_model_dir), threads=1)
        assert loaded["pid"] == worker.process.pid != os.getpid()
    assert worker.process.returncode == 0


def test_default_engines_list_the_peers(tiny_model_dir):
    from vledge.benchmark.run import default_engines

    names = [spec.name for spec in default_engines(tiny_model_dir)]
    assert names[:3] == ["pytorch", "pytorch-int8", "pytorch-compile"]
    assert "ort-cpu-fp32" in names and "openvino-cpu-fp32" in names
    for precision in ("int8", "q4"):
        assert (f"ort-cpu-{precision}" in names) == (f"openvino-cpu-{precision}" in names)


def test_missing_openvino_is_a_note_not_a_failure():
    """With the package hidden, the engine says why it cannot run (run_benchmark skips it with that note)."""
    code = ("import sys; sys.modules['openvino'] = None\n"
            "from vledge.benchmark.engines import EngineSpec\n"
            "print(EngineSpec.parse('openvino-cpu-q4').missing)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "openvino package is not installed" in out


@pytest.mark.slow
def test_a_stopped_bench_keeps_what_it_measured_and_resume_continues_it(tiny_run, tiny_model_dir, synth_data,
                                                                         tmp_path):
    from vledge.benchmark.report import read_previous, write_progress

    out = tmp_path / "bench"
    config = BenchConfig(ckpt=tiny_run.best_checkpoint, model_dir=tiny_model_dir, data=synth_data,
                         engines=("pytorch", "ort-cpu-fp32"), threads=(1,), batches=(1,), repeats=3,
                         decode_tokens=2, caption_tokens=4, parity_samples=4, cold_start=False)

    def save_then_stop(partial):
        write_progress(partial, out)
        raise KeyboardInterrupt  # stopped right after the first measurement was kept

    with pytest.raises(KeyboardInterrupt):
        run_benchmark(config, save=save_then_stop)
    kept = json.loads((out / "bench.json").read_text())
    assert kept["complete"] is False and kept["parity"] == {}
    assert {row["engine"] for row in kept["latency"]} == {"pytorch", "ort-cpu-fp32"}

    steps = []
    result = run_benchmark(config, save=lambda partial: write_progress(partial, out), previous=read_previous(out),
                           advance=lambda done, total: steps.append((done, total)))
    assert result["complete"] is True and result["latency"] == kept["latency"]  # kept, not measured again
    assert set(result["parity"]) == {"pytorch", "ort-cpu-fp32"}
    assert steps[0] == (0, 2) and steps[-1] == (2, 2)  # only the two parity runs were left
    assert json.loads((out / "bench.json").read_text())["parity"].keys() == result["parity"].keys()

    again = run_benchmark(config, previous=read_previous(out), advance=lambda done, total: steps.append((done, total)))
    assert steps[-1] == (0, 0) and again["latency"] == result["latency"] and again["parity"] == result["parity"]
    assert again["resumed"] == 2

    other = BenchConfig(**{**config.__dict__, "repeats": 4})
    with pytest.raises(ConfigError, match="other settings.*repeats 3 then, 4 now"):
        run_benchmark(other, previous=read_previous(out))


def test_bench_checks_its_output_folder_before_any_work(tmp_path):
    from click.testing import CliRunner

    from vledge.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(main, ["bench", "--ckpt", str(tmp_path / "missing.pt"), "--model",
                                       str(tmp_path / "missing"), "--out", str(blocker / "bench")])
    assert result.exit_code == 1 and result.output.startswith("Error: OutputError: "), result.output
