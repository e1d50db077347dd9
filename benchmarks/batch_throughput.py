"""Throughput of ``vledge batch``: images/s at 1 and 2 workers, local processes against Ray Data in local mode.

    python benchmarks/batch_throughput.py --model MODEL_DIR [--images FOLDER] [--count 2000] [--workers 1 2]

Without ``--images`` it draws ``--count`` synthetic images first (what ``vledge data synth`` writes).
Each configuration captions the same images into a fresh output folder through the public API
(``vledge.bulk.run_batch``), one ONNX Runtime thread per worker. Reported per configuration:

* wall images/s: all inputs over the whole run (worker start-up and model loading included);
* steady images/s: the rows committed after each worker's first part, over the time from then to
  the last part (start-up and model loading excluded);
* the per-image cost split, medians over the rows: image decode (file read + JPEG decode),
  preprocess (resize, crop, normalise), vision encoder, prefill, decode loop (milliseconds);
* Ray's overhead over local at the same worker count: 1 - ray steady / local steady.

Ray is started once (``ray.init(num_cpus=max(workers), include_dashboard=False)``, timed separately).
Prints a Markdown table and the machine's load (``uptime``); writes JSON with ``--out``. Torch is not needed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("image_decode_ms", "preprocess_ms", "vision_ms", "prefill_ms", "decode_ms")


def synth_images(folder: Path, count: int) -> Path:
    from vledge.data.synth import SynthOptions, generate_dataset

    generate_dataset(folder, SynthOptions(size=count, seed=0, image_size=64), workers=2, overwrite=True)
    return folder / "images"


def read_rows(output: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(output).to_pylist()


def measure(engine: str, workers: int, args, images: Path, scratch: Path) -> dict:
    from vledge.bulk import BatchOptions, run_batch

    output = scratch / f"{engine}-{workers}.parquet"
    shutil.rmtree(output, ignore_errors=True)
    commits: list[tuple[float, int]] = []
    options = BatchOptions(model_dir=args.model, input=str(images), output=output, engine=engine, workers=workers,
                           threads_per_worker=1, part_size=args.part_size, precision=args.precision,
                           providers="cpu", max_new_tokens=args.max_new_tokens)
    started = time.perf_counter()
    summary = run_batch(options, on_progress=lambda n: commits.append((time.perf_counter(), n)))
    wall = time.perf_counter() - started
    rows = read_rows(output)
    good = [row for row in rows if row["error"] is None]
    warm = min(workers, len(commits) - 1)  # every worker has delivered its first part from here on
    steady_rows = sum(n for _, n in commits[warm:]) - commits[warm][1] if warm >= 0 else 0
    steady_s = commits[-1][0] - commits[warm][0] if warm >= 0 else 0.0
    return {
        "engine": engine, "workers": workers, "rows": len(rows), "errors": summary.errors, "wall_s": wall,
        "first_part_s": commits[0][0] - started if commits else float("nan"),
        "wall_images_per_s": len(rows) / wall, "steady_images_per_s": steady_rows / steady_s if steady_s else 0.0,
        "tokens_per_image": statistics.mean(len(row["tokens"]) for row in good) if good else 0.0,
        "median_ms": {stage: statistics.median(row[stage] for row in good) for stage in STAGES} if good else {},
        "texts": {row["path"]: row["text"] for row in rows},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="exported model directory")
    parser.add_argument("--images", type=Path, default=None, help="image folder (default: draw synthetic ones)")
    parser.add_argument("--count", type=int, default=2000, help="synthetic images to draw without --images")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    parser.add_argument("--part-size", type=int, default=100)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="vledge-batch-bench-"))
    try:
        tick = time.perf_counter()
        images = args.images or synth_images(scratch / "synth", args.count)
        synth_s = time.perf_counter() - tick
        ray_init_s = None
        if "ray" in args.engines:
            import ray

            tick = time.perf_counter()
            ray.init(num_cpus=max(args.workers), include_dashboard=False, logging_level="WARNING")
            ray_init_s = time.perf_counter() - tick
        results = []
        for workers in args.workers:  # engines interleaved at each worker count
            for engine in args.engines:
                results.append(measure(engine, workers, args, images, scratch))
                print(f"{engine} x{workers}: {results[-1]['wall_images_per_s']:.1f} images/s", file=sys.stderr)
        if "ray" in args.engines:
            ray.shutdown()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    reference = results[0]["texts"]
    same = all(result["texts"] == reference for result in results)
    local = {r["workers"]: r for r in results if r["engine"] == "local"}
    print(f"\nmodel {args.model} ({args.precision}), {results[0]['rows']} images, part size {args.part_size}, "
          f"1 thread per worker, max {args.max_new_tokens} new tokens; "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print(f"rows identical across all runs: {same}; ray.init: "
          f"{'-' if ray_init_s is None else f'{ray_init_s:.1f} s'}; synthetic images drawn in {synth_s:.1f} s\n")
    print("| engine | workers | wall s | first part s | wall img/s | steady img/s | Ray overhead (steady) | "
          "tokens/img | decode ms | preprocess ms | vision ms | prefill ms | decode loop ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        base = local.get(r["workers"])
        overhead = (f"{100 * (1 - r['steady_images_per_s'] / base['steady_images_per_s']):+.0f}%"
                    if r["engine"] == "ray" and base else "-")
        ms = r["median_ms"]
        print(f"| {r['engine']} | {r['workers']} | {r['wall_s']:.1f} | {r['first_part_s']:.1f} | "
              f"{r['wall_images_per_s']:.1f} | {r['steady_images_per_s']:.1f} | {overhead} | "
              f"{r['tokens_per_image']:.1f} | " + " | ".join(f"{ms.get(s, float('nan')):.2f}" for s in STAGES) + " |")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"\nuptime: {load}")
    if args.out:
        for r in results:
            r.pop("texts")
        args.out.write_text(json.dumps({"model": str(args.model), "results": results, "ray_init_s": ray_init_s,
                                        "rows_identical": same, "uptime": load}, indent=2))


if __name__ == "__main__":
    main()
