"""Caption latency by thread setting, each setting in a fresh process, rotating rounds.

    python benchmarks/thread_defaults.py --model MODEL_DIR [--precision fp32] [--rounds 3] [--captions 20]
        [--settings default,1,2,2-nospin] [--competitor]

A setting is ``default`` (``load()`` without ``threads``), ``N`` (``threads=N``) or ``N-nospin``
(``spin=False``). Each round runs every setting once, in a rotating order, in its own process:
load, two warm-up captions, then ``--captions`` timed ``caption()`` calls (``max_new_tokens`` 24) on
one synthetic image. ``--competitor`` keeps one busy-looping process running during the timing
(the "one competing process" case). Prints JSON: the median caption ms per setting over all rounds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHILD = """
import json, sys, time
import numpy as np
from vledge.runtime import load
from vledge.decoding import GenerationOptions
model, precision, setting, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
kwargs = {}
if setting != "default":
    threads, _, nospin = setting.partition("-")
    kwargs = {"threads": int(threads), "spin": nospin != "nospin"}
runtime = load(model, precision=precision, providers="cpu", **kwargs)
size = runtime.manifest.preprocess.image_size
image = (np.random.default_rng(0).random((size * 4, size * 4, 3)) * 255).astype(np.uint8)
options = GenerationOptions(max_new_tokens=24)
for _ in range(2):
    runtime.caption(image, options)
times = []
for _ in range(count):
    tick = time.perf_counter()
    runtime.caption(image, options)
    times.append((time.perf_counter() - tick) * 1e3)
print(json.dumps(times))
"""


def _spin() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--captions", type=int, default=20)
    parser.add_argument("--settings", default="default,1,2,2-nospin")
    parser.add_argument("--competitor", action="store_true")
    args = parser.parse_args()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    competitor = None
    if args.competitor:
        competitor = multiprocessing.get_context("spawn").Process(target=_spin, daemon=True)
        competitor.start()
    times: dict[str, list[float]] = {s: [] for s in settings}
    load_before = os.getloadavg()
    try:
        for round_index in range(args.rounds):
            for k in range(len(settings)):
                setting = settings[(round_index + k) % len(settings)]
                env = dict(os.environ)
                env.pop("OMP_NUM_THREADS", None)
                out = subprocess.run([sys.executable, "-c", CHILD, str(args.model), args.precision, setting,
                                      str(args.captions)], capture_output=True, text=True, check=True, env=env)
                times[setting] += json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if competitor is not None:
            competitor.terminate()
    print(json.dumps({"model": str(args.model), "precision": args.precision, "competitor": args.competitor,
                      "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                      "caption_ms_median": {s: round(float(np.median(t)), 3) for s, t in times.items()},
                      "runs": {s: len(t) for s, t in times.items()}}, indent=1))


if __name__ == "__main__":
    main()
