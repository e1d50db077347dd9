"""Soak test: one loaded model captions thousands of images; does resident memory stay flat?

    python benchmarks/soak_runtime.py --model MODEL_DIR --images FOLDER [--captions 3000] [--every 250]

Loads the model directory with the torch-free runtime, warms up, then captions images cycling
over the folder (files are read and decoded every time, as an app would), alternating the
caption prompt with a few questions. Every ``--every`` captions it samples the process's
resident memory (``VmRSS`` from /proc/self/status, or psutil where /proc is missing) and the
window's throughput and latency. Prints a table, writes JSON, and says whether memory stayed
flat after warm-up: growth from the first sample after warm-up to the last within
``--tolerance-mb`` (default 8 MB), and the least-squares slope over the second half of the run.
Torch is never imported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

QUESTIONS = ("How many shapes are there?", "What is in this image?", "What color is the object in the center?")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil  # only where /proc is missing

    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="exported model directory")
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--captions", type=int, default=3000, help="captions after warm-up")
    parser.add_argument("--warmup", type=int, default=100, help="captions before the first memory sample")
    parser.add_argument("--every", type=int, default=250, help="sample memory every N captions")
    parser.add_argument("--max-images", type=int, default=2000, help="cycle over at most this many files")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--tolerance-mb", type=float, default=8.0, help="allowed RSS growth after warm-up")
    parser.add_argument("--out", type=Path, default=Path("soak_runtime.json"))
    args = parser.parse_args()

    from vledge.decoding import GenerationOptions
    from vledge.runtime import load

    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[: args.max_images]
    if not files:
        sys.exit(f"no images in {args.images}")
    before_load = rss_mb()
    started = time.perf_counter()
    model = load(args.model, precision=args.precision, providers=args.provider, threads=args.threads)
    load_s = time.perf_counter() - started
    after_load = rss_mb()
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    prompts = (None, *QUESTIONS)

    def caption(index: int):
        path = files[index % len(files)]
        prompt = prompts[index % len(prompts)]
        return model.ask(path, prompt, options) if prompt else model.caption(path, options)

    for index in range(args.warmup):
        caption(index)
    samples = []
    latencies: list[float] = []
    tokens = 0
    window_start = time.perf_counter()
    total_start = window_start
    baseline = rss_mb()
    samples.append({"captions": 0, "rss_mb": baseline, "captions_per_s": None, "median_ms": None, "p99_ms": None})
    for done in range(1, args.captions + 1):
        tick = time.perf_counter()
        result = caption(args.warmup + done)
        latencies.append((time.perf_counter() - tick) * 1e3)
        tokens += len(result.token_ids)
        if done % args.every == 0 or done == args.captions:
            now = time.perf_counter()
            samples.append({"captions": done, "rss_mb": rss_mb(),
                            "captions_per_s": len(latencies) / (now - window_start),
                            "median_ms": float(np.median(latencies)), "p99_ms": float(np.percentile(latencies, 99))})
            latencies, window_start = [], now
    total_s = time.perf_counter() - total_start

    rss = np.array([s["rss_mb"] for s in samples])
    counts = np.array([s["captions"] for s in samples], dtype=np.float64)
    half = len(samples) // 2
    slope = float(np.polyfit(counts[half:], rss[half:], 1)[0] * 1000) if len(samples) - half >= 2 else 0.0
    growth = float(rss[-1] - rss[0])
    flat = growth <= args.tolerance_mb
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model_dir": str(args.model),
        "architecture": model.manifest.architecture(),
        "precisions": model.precisions,
        "provider": model.info()["provider"],
        "threads": args.threads,
        "images": len(files),
        "warmup": args.warmup,
        "captions": args.captions,
        "generated_tokens": tokens,
        "seconds": total_s,
        "load_s": load_s,
        "rss_mb": {"before_load": before_load, "after_load": after_load, "after_warmup": float(rss[0]),
                   "last": float(rss[-1]), "max": float(rss.max())},
        "growth_after_warmup_mb": growth,
        "slope_second_half_mb_per_1000": slope,
        "flat": flat,
        "tolerance_mb": args.tolerance_mb,
        "samples": samples,
        "python": platform.python_version(),
        "pid": os.getpid(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"{args.model}: {model.precisions} on {report['provider']}, {args.threads} thread(s); "
          f"{len(files)} images cycled; load {load_s:.2f} s, RSS {before_load:.1f} -> {after_load:.1f} MB")
    print(f"{'captions':>9} {'RSS MB':>9} {'delta MB':>9} {'capt/s':>8} {'median ms':>10} {'p99 ms':>8}")
    for sample in samples:
        rate = f"{sample['captions_per_s']:.1f}" if sample["captions_per_s"] else "-"
        median = f"{sample['median_ms']:.2f}" if sample["median_ms"] else "-"
        p99 = f"{sample['p99_ms']:.2f}" if sample["p99_ms"] else "-"
        print(f"{sample['captions']:>9} {sample['rss_mb']:>9.1f} {sample['rss_mb'] - rss[0]:>+9.1f} {rate:>8} "
              f"{median:>10} {p99:>8}")
    print(f"{args.captions} captions ({tokens} tokens) in {total_s:.1f} s; RSS growth after warm-up {growth:+.1f} MB, "
          f"second-half slope {slope:+.2f} MB per 1000 captions: {'FLAT' if flat else 'GROWING'} "
          f"(tolerance {args.tolerance_mb} MB)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
