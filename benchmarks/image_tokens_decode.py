"""Does a long image-token run slow the runtime's decode step? 576 image tokens (CLIP 336/14) against 64.

Two tiny random LLaVA folders (CLIP tower + Llama LM, made by transformers; tests/hf_llava_folders.py)
that differ only in the tower's image size, exported with `vledge export HF_DIR --quantize none`,
then the runtime answers the same photo N times; the decode step's median (per token, after the
prefill) and the prefill are reported for each. The decode step attends over the whole past, so it
grows with the past only as much as attention over ~600 instead of ~80 positions costs.

    python benchmarks/image_tokens_decode.py [--runs 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from hf_llava_folders import make_llava_folder
    from skimage import data

    import cv2
    from vledge.decoding import GenerationOptions
    from vledge.export import ExportOptions, export_llava
    from vledge.runtime import load

    report = {}
    with tempfile.TemporaryDirectory() as work:
        photo = str(Path(work) / "chelsea.png")
        cv2.imwrite(photo, cv2.cvtColor(data.chelsea(), cv2.COLOR_RGB2BGR))
        runtimes = {}
        for image_size in (112, 336):  # 8x8 = 64 and 24x24 = 576 patches of 14 px (the class token dropped)
            folder = make_llava_folder(Path(work) / f"hf{image_size}", image_size=image_size, patch_size=14,
                                       max_positions=2048)
            model_dir = Path(work) / f"model{image_size}"
            export_llava(folder, model_dir, ExportOptions(quantize=("none",), parity_samples=4))
            runtime = load(model_dir, precision="fp32", providers="cpu", threads=args.threads)
            runtimes[runtime.manifest.architecture()["image_tokens"]] = runtime
        options = GenerationOptions(max_new_tokens=args.new_tokens)
        per_token = {tokens: [] for tokens in runtimes}
        prefill = {tokens: [] for tokens in runtimes}
        for run in range(args.runs + 1):  # interleaved, so both see the same machine load; run 0 warms up
            for tokens, runtime in runtimes.items():
                timings = runtime.ask(photo, "what colour is the shape", options).timings
                if run and timings.per_token_ms is not None:
                    per_token[tokens].append(timings.per_token_ms)
                    prefill[tokens].append(timings.prefill_ms)
        for tokens in runtimes:
            steps = sorted(per_token[tokens])
            report[f"{tokens} image tokens"] = {
                "decode_step_ms_median": statistics.median(steps), "decode_step_ms_min": steps[0],
                "decode_step_ms_p90": steps[int(0.9 * (len(steps) - 1))],
                "prefill_ms_median": statistics.median(prefill[tokens]), "runs": len(steps),
                "new_tokens_per_run": args.new_tokens,
            }
    report["threads"] = args.threads
    report["loadavg"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
