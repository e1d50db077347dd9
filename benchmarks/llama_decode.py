"""Decode and prefill speed of a Llama-family LM at SmolLM2-135M's exact size: PyTorch eager vs ONNX Runtime.

    python benchmarks/llama_decode.py [--work DIR] [--steps 20] [--threads 1,2] [--json OUT]

Builds the language model with SmolLM2-135M's config (hidden 576, 30 layers, 9 heads, 3 key/value
heads, MLP 1536, vocab 49152, tied embeddings, rope_theta 100000) and random weights (seed 0),
exports the merged decoder the way ``vledge export`` does (``export_graphs`` + ``optimize_component``
+ ``quantize_component``: int8 with the LM head float, q4 with the LM head 8-bit as the exporter makes
it for a Llama-family LM, and ``q4-float-head`` with the head float32), then measures,
each engine and thread count in its own process (so peak RSS is that engine's alone):

* decode: one new token over a past of 64 and of 512 positions (median / p90 ms over ``--steps``
  calls after 3 warm-up calls, inputs prebuilt), and tokens/s = 1000 / median;
* prefill: 128 tokens with an empty past (logits for the last position only, as the graph does);
* peak RSS of the process and the decoder file's size.

PyTorch runs the same ``LlamaLM`` module (eager, ``inference_mode``, ``torch.set_num_threads``);
ONNX Runtime the decoder graph with ``intra_op_num_threads`` set, ``ORT_ENABLE_ALL``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SMOLLM2_135M = dict(kind="llama", hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab_size=49152,
                    tie_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5, max_positions=8192)
PASTS = (64, 512)
PREFILL = 128


def build_model():
    import torch

    from vledge.config import ModelConfig, language_config, preset
    from vledge.models.vlm import VisionLanguageModel

    tiny, _ = preset("tiny")
    config = ModelConfig(vision=tiny.vision, projector=tiny.projector, preprocess=tiny.preprocess,
                         language=language_config(**SMOLLM2_135M))
    torch.manual_seed(0)
    return VisionLanguageModel(config, image_token_id=0).eval()


def export_decoders(work: Path) -> dict[str, Path]:
    from vledge.export import optimize, quantize
    from vledge.export.graphs import export_graphs

    paths = {name: work / f"decoder_{name}.onnx" for name in ("fp32", "int8", "q4", "q4-float-head")}
    if all(p.exists() for p in paths.values()):
        return paths
    raw = export_graphs(build_model(), work / "raw")["decoder_model_merged"]
    optimize.optimize_component("decoder_model_merged", raw, paths["fp32"], language_kind="llama")
    for name, precision, keep_bits in (("int8", "int8", None), ("q4", "q4", 8), ("q4-float-head", "q4", None)):
        quantize.quantize_component("decoder_model_merged", precision, paths["fp32"], paths[name],
                                    options=quantize.QuantizeOptions(keep_bits=keep_bits), language_kind="llama")
    return paths


def _inputs(past: int, new: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    cfg = SMOLLM2_135M
    head_dim = cfg["hidden"] // cfg["heads"]
    feeds = {"inputs_embeds": rng.standard_normal((1, new, cfg["hidden"]), dtype=np.float32) * 0.05,
             "attention_mask": np.ones((1, past + new), np.int64),
             "position_ids": np.arange(past, past + new, dtype=np.int64)[None]}
    for layer in range(cfg["layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = rng.standard_normal(
                (1, cfg["kv_heads"], past, head_dim), dtype=np.float32)
    return feeds


def _time(call, steps: int) -> dict[str, float]:
    for _ in range(3):
        call()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)), "runs": steps}


def worker(engine: str, threads: int, path: str | None, steps: int) -> dict:
    rng = np.random.default_rng(0)
    cases = {f"decode_past{p}": _inputs(p, 1, rng) for p in PASTS}
    cases[f"prefill_{PREFILL}"] = _inputs(0, PREFILL, rng)
    results: dict[str, dict] = {}
    if engine == "pytorch":
        import torch

        torch.set_num_threads(threads)
        language = build_model().language
        for name, feeds in cases.items():
            embeds = torch.from_numpy(feeds["inputs_embeds"])
            mask, positions = torch.from_numpy(feeds["attention_mask"]), torch.from_numpy(feeds["position_ids"])
            past = [(torch.from_numpy(feeds[f"past_key_values.{i}.key"]),
                     torch.from_numpy(feeds[f"past_key_values.{i}.value"])) for i in range(SMOLLM2_135M["layers"])]

            def call(embeds=embeds, mask=mask, positions=positions, past=past):
                with torch.inference_mode():
                    language(embeds, mask, positions, past, last_only=True)

            results[name] = _time(call, steps)
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for name, feeds in cases.items():
            results[name] = _time(lambda feeds=feeds: session.run(["logits"], feeds), steps)
    results["peak_rss_mb"] = peak_rss_mb()
    return results


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM; ru_maxrss would carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="Folder for the exported decoders (reused).")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", nargs=3, metavar=("ENGINE", "THREADS", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        engine, threads, path = args.worker
        print(json.dumps(worker(engine, int(threads), path if path != "-" else None, args.steps)))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="llama-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = export_decoders(work)
    print(f"exported in {time.perf_counter() - start:.0f} s to {work}", file=sys.stderr)
    engines = [("pytorch", "-")] + [(f"ort-{p}", str(paths[p])) for p in ("fp32", "int8", "q4", "q4-float-head")]
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for engine, path in engines:
            done = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker",
                                   "pytorch" if engine == "pytorch" else "ort", str(threads), path],
                                  capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            if done.returncode != 0:
                raise SystemExit(f"{engine} at {threads} threads failed:\n{done.stderr[-2000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            size = Path(path).stat().st_size if path != "-" else None
            rows.append({"engine": engine, "threads": threads, "file_mb": size / 1e6 if size else None, **result})
            print(f"done {engine} x{threads}", file=sys.stderr)
    report = {"config": SMOLLM2_135M, "machine": platform.platform(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "rows": rows}
    print(f"{'engine':<18} {'thr':>3} {'decode@64 ms':>13} {'tok/s':>7} {'decode@512 ms':>14} {'tok/s':>7} "
          f"{'prefill128 ms':>14} {'RSS MB':>7} {'file MB':>8} {'x torch@512':>11}")
    torch_ms = {r["threads"]: r["decode_past512"]["median_ms"] for r in rows if r["engine"] == "pytorch"}
    for r in rows:
        d64, d512 = r["decode_past64"]["median_ms"], r["decode_past512"]["median_ms"]
        print(f"{r['engine']:<18} {r['threads']:>3} {d64:>13.2f} {1000 / d64:>7.1f} {d512:>14.2f} {1000 / d512:>7.1f} "
              f"{r[f'prefill_{PREFILL}']['median_ms']:>14.1f} {r['peak_rss_mb']:>7.0f} "
              f"{(r['file_mb'] or 0):>8.1f} {torch_ms[r['threads']] / d512:>11.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
