"""Prefill time by prompt length, with and without the cached constant prefix, interleaved in one process.

    python benchmarks/prefill_prefix.py --model MODEL_DIR [--precision fp32] [--lengths 16,64,248] [--repeats 40]

A prompt of L positions is the manifest's constant prefix, the image (``image_tokens`` positions)
and question text filling the rest (the shortest prompt, a one-word question, when L is shorter). Two runtimes of the same directory, ``prefix_cache=True`` and
``False``, prefill it in turn (``runtime.prefill``, batch 1, one thread), rotating; prints JSON with
the median ms per length and setting and the load average.
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
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--lengths", default="16,64,248")
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()

    from vledge.decoding import GenerationOptions
    from vledge.prompt import question_ids
    from vledge.runtime import load

    runtimes = {"prefix_cache": load(args.model, precision=args.precision, providers="cpu", threads=1),
                "no_prefix_cache": load(args.model, precision=args.precision, providers="cpu", threads=1,
                                        prefix_cache=False)}
    first = runtimes["prefix_cache"]
    tokenizer, config = first.tokenizer, first.manifest.model_config
    size, image_tokens = config.preprocess.image_size, int(first.manifest.num_image_tokens)
    embeds = first.encode_images(np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32))
    words = "what colour is the large shape near the top left corner of the picture".split()
    options = GenerationOptions(max_new_tokens=1)
    result = {"loadavg_before": os.getloadavg(), "precision": args.precision,
              "prefix_tokens": len(first.prefix_ids), "prefill_ms": {}}
    for length in (int(v) for v in args.lengths.split(",")):
        ids = question_ids(tokenizer, config.prompt, words[0])  # the shortest prompt, if even it is longer
        for count in range(2, 400):
            candidate = " ".join(words[i % len(words)] for i in range(count))
            candidate_ids = question_ids(tokenizer, config.prompt, candidate)
            if len(candidate_ids) - 1 + image_tokens > length:
                break
            ids = candidate_ids
        positions = len(ids) - 1 + image_tokens
        times = {name: [] for name in runtimes}
        names = list(runtimes)
        for rep in range(args.repeats + 3):
            for k in range(len(names)):
                name = names[(rep + k) % len(names)]
                tick = time.perf_counter()
                runtimes[name].prefill(embeds, [ids], options)
                if rep >= 3:
                    times[name].append((time.perf_counter() - tick) * 1e3)
        result["prefill_ms"][str(positions)] = {name: round(float(np.median(t)), 4) for name, t in times.items()}
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
