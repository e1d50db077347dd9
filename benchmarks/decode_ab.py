"""Decode steps of several model directories (or settings), interleaved in one process, step by step.

    python benchmarks/decode_ab.py --model DIR_A --model DIR_B [--precision fp32] [--repeats 60] [--steps 16]

Each repetition prefills the caption prompt for one image and runs ``--steps`` decode steps
(``OrtTransformerSteps.step``) on every model in turn, in a rotating order, one thread. Prints,
per model, the median of each step index (cold first steps show), the steady step (median of
steps 8..) and the mean over the first 12 steps (what a 13-token caption averages), plus the
load average, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, action="append", required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()

    from vledge.decoding import GenerationOptions
    from vledge.prompt import CAPTION_PROMPT, question_ids
    from vledge.runtime import load

    runtimes = [load(path, precision=args.precision, providers="cpu", threads=args.threads) for path in args.model]
    first = runtimes[0]
    prompt = question_ids(first.tokenizer, first.manifest.model_config.prompt, CAPTION_PROMPT)
    size = first.manifest.preprocess.image_size
    pixels = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    embeds = [runtime.encode_images(pixels) for runtime in runtimes]
    options = GenerationOptions(max_new_tokens=args.steps + 1)
    times = [[[] for _ in range(args.steps)] for _ in runtimes]
    load_before = os.getloadavg()
    for rep in range(args.repeats + 3):
        for k in range(len(runtimes)):
            index = (rep + k) % len(runtimes)
            steps, _ = runtimes[index].prefill(embeds[index], [prompt], options)
            token = np.argmax(steps.first_logits, axis=-1)
            for i in range(args.steps):
                tick = time.perf_counter()
                logits = steps.step(token)
                if rep >= 3:
                    times[index][i].append((time.perf_counter() - tick) * 1e3)
                token = np.argmax(logits, axis=-1)
    result = {"loadavg_before": load_before, "loadavg_after": os.getloadavg(), "precision": args.precision,
              "threads": args.threads, "models": {}}
    for path, per_index in zip(args.model, times):
        medians = [float(np.median(t)) for t in per_index]
        result["models"][str(path)] = {
            "step_ms_by_index": [round(m, 4) for m in medians],
            "steady_step_ms": round(float(np.median([t for ts in per_index[8:] for t in ts])), 4),
            "first_12_mean_ms": round(float(np.mean(medians[:12])), 4),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
