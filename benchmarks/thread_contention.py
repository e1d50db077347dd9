"""Training step time at 1 and 2 torch threads, with and without one competing busy process.

    python benchmarks/thread_contention.py [--preset small] [--steps 25] [--data DIR] [--work /tmp/contention]

For each configuration a fresh process trains ``--steps`` steps of the preset on built-in synthetic
data (600 scenes, generated once into ``--work`` unless ``--data`` is given) and reports the median
wall time between consecutive steps after the first five. "busy" starts ``python -c "while True:
pass"`` beside it for the duration of that run and kills it afterwards. Prints one line per
configuration and a JSON summary; the machine's load average is printed too, because other work
on the machine counts as contention as well.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ONE_RUN = r"""
import dataclasses, json, sys, time
from pathlib import Path
from vledge.config import preset
from vledge.training.trainer import RunOptions, train
data, run_dir, name, threads, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
model_config, train_config = preset(name)
train_config = dataclasses.replace(train_config, threads=threads, max_steps=steps, eval_every=10**6,
                                   eval_samples=0, log_every=1)
stamps = []
train(data, run_dir, model_config, train_config, RunOptions(device="cpu"),
      on_event=lambda e: stamps.append(time.monotonic()) if e.kind == "step" else None)
print(json.dumps([b - a for a, b in zip(stamps[5:], stamps[6:])]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/contention"))
    args = parser.parse_args()
    data = args.data
    if data is None:
        from vledge.data.synth import SynthOptions, generate_dataset

        data = args.work / "data"
        if not (data / "train.json").is_file():
            generate_dataset(data, SynthOptions(size=600, seed=0), workers=1, overwrite=True)
    results = {}
    for busy in (False, True):
        for threads in (1, 2):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                run_dir = args.work / f"run-{threads}-{'busy' if busy else 'alone'}"
                done = subprocess.run([sys.executable, "-c", ONE_RUN, str(data), str(run_dir), args.preset,
                                       str(threads), str(args.steps)], capture_output=True, text=True, check=True,
                                      env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
            gaps = json.loads(done.stdout.strip().splitlines()[-1])
            key = f"threads={threads} {'with one busy process' if busy else 'alone'}"
            results[key] = {"median_s_per_step": round(statistics.median(gaps), 3), "steps_timed": len(gaps),
                            "load_average": os.getloadavg()[0]}
            print(f"{key}: median {statistics.median(gaps):.3f} s/step over {len(gaps)} steps "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
