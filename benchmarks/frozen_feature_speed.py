"""Language-side training speed with and without the frozen-encoder feature cache.

Two short `small` runs on the same data with a pretrained, frozen vision encoder and
projector: one reads the cached visual tokens (the trainer's default), one encodes the
images at every step (the cache disabled). Prints samples/s and steps/s of each.

    python benchmarks/frozen_feature_speed.py --data DATA --vision vision.pt --out /tmp/speed [--steps 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import vledge.training.stage as stage_module
from vledge.config import preset
from vledge.training.trainer import RunOptions, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--vision", type=Path, required=True, help="vledge pretrain-vision output")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model_config, train_config = preset("small")
    train_config = dataclasses.replace(train_config, lr=1.5e-3, max_steps=args.steps, eval_every=10**9,
                                       eval_samples=0, log_every=50, threads=args.threads)
    for name, cap in (("cached", stage_module.FEATURE_CACHE_LIMIT_BYTES), ("encoded every step", 0)):
        stage_module.FEATURE_CACHE_LIMIT_BYTES = cap
        run_dir = args.out / name.split()[0]
        started = time.perf_counter()
        train(args.data, run_dir, model_config, train_config,
              RunOptions(vision_weights=args.vision, freeze=("vision", "projector")))
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rates = [r["samples_per_s"] for r in rows if r["kind"] == "train" and r["step"] > 50]
        mean = sum(rates) / len(rates)
        print(f"{name:20s} {mean:6.0f} samples/s  {mean / train_config.batch_size:5.2f} steps/s  "
              f"(run incl. setup {time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
