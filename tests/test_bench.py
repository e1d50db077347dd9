"""The benchmark harness on the tiny model: it runs, writes complete outputs, and its parity is real."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from vledge.benchmark.engines import EngineSpec
from vledge.benchmark.run import STAGES, BenchConfig, run_benchmark
from vledge.errors import ConfigError

ENGINES = ("pytorch", "pytorch-int8", "ort-cpu-fp32", "ort-cpu-int8")


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
    for key in ("machine", "config", "reference", "latency", "parity", "cold_start", "seconds"):
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
    with pytest.raises(ConfigError, match="unknown engine"):
        EngineSpec.parse("tensorflow")
    with pytest.raises(ConfigError, match="repeats"):
        BenchConfig(ckpt=None, model_dir=None, repeats=1)
