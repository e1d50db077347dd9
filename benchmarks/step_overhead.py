"""Python around ONNX Runtime's run in one decode step: ``OrtTransformerSteps.step`` minus its ``run_with_iobinding``.

    python benchmarks/step_overhead.py --model MODEL_DIR [--precision fp32] [--repeats 80]

One thread, batch 1, the caption prompt, 16 steps per repetition (steps 4.. and repetitions 5..
counted). Prints the median step, the median run and the median of their differences in
microseconds, for the loop as it is ("bind once": the fixed per-step buffers are bound before the
first step only) and with those buffers rebound at every step, plus the load average.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeats", type=int, default=80)
    args = parser.parse_args()

    from vledge.decoding import GenerationOptions
    from vledge.prompt import CAPTION_PROMPT, question_ids
    from vledge.runtime import decoder, load

    runtime = load(args.model, precision=args.precision, providers="cpu", threads=1)
    prompt = question_ids(runtime.tokenizer, runtime.manifest.model_config.prompt, CAPTION_PROMPT)
    size = runtime.manifest.preprocess.image_size
    embeds = runtime.encode_images(np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32))
    run_times: list[float] = []
    plain_run = decoder._Binder.run

    def timed_run(self):
        tick = time.perf_counter()
        outputs = plain_run(self)
        run_times.append(time.perf_counter() - tick)
        return outputs

    plain_step = decoder.OrtTransformerSteps.step

    def rebinding_step(self, tokens):
        self._step_bound = False
        return plain_step(self, tokens)

    decoder._Binder.run = timed_run
    print(f"load average {os.getloadavg()}")
    for label, step in (("bind once", plain_step), ("rebind every step", rebinding_step)):
        decoder.OrtTransformerSteps.step = step
        steps_us, runs_us = [], []
        for rep in range(args.repeats + 5):
            steps, _ = runtime.prefill(embeds, [prompt], GenerationOptions(max_new_tokens=20))
            token = np.argmax(steps.first_logits, axis=-1)
            for i in range(16):
                run_times.clear()
                tick = time.perf_counter()
                logits = steps.step(token)
                elapsed = time.perf_counter() - tick
                if rep >= 5 and i >= 4:
                    steps_us.append(elapsed * 1e6)
                    runs_us.append(run_times[0] * 1e6)
                token = np.argmax(logits, axis=-1)
        difference = np.asarray(steps_us) - np.asarray(runs_us)
        print(f"{label}: step {np.median(steps_us):.1f} us, run {np.median(runs_us):.1f} us, "
              f"python around run {np.median(difference):.1f} us")
    decoder._Binder.run, decoder.OrtTransformerSteps.step = plain_run, plain_step


if __name__ == "__main__":
    main()
