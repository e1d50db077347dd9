"""Reproduce the foundation's accuracy claim: synthetic data -> `small` preset -> held-out accuracy.

    python benchmarks/train_small.py --out runs/small-bench [--size 20000] [--minutes 12]

Runs the same CLI commands a user would, times each: `vledge data synth`, `vledge
pretrain-vision` (per-cell labels; skipped with ``--vision-steps 0``, which trains end to
end from scratch instead), `vledge train` on the language side with the vision encoder and
projector frozen, then `vledge eval` on the full test split. Writes OUT/result.json and
OUT/result.md; the run's loss and accuracy curves are OUT/run/curves.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

STRUCTURED = ("count", "color", "shape", "position")


def run(command: list[str]) -> float:
    print("$", " ".join(command), flush=True)
    start = time.monotonic()
    subprocess.run(command, check=True)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/small-bench"))
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--minutes", type=float, default=12.0, help="training wall-time budget")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vision-steps", type=int, default=300,
                        help="vledge pretrain-vision steps; 0 trains everything end to end from scratch")
    parser.add_argument("--lr", type=float, default=1.5e-3, help="language-side learning rate after pretrain-vision")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    vledge = [sys.executable, "-m", "vledge"]
    data, run_dir = args.out / "data", args.out / "run"
    args.out.mkdir(parents=True, exist_ok=True)

    total_start = time.monotonic()
    synth_s = run(vledge + ["data", "synth", "--out", str(data), "--size", str(args.size), "--seed", str(args.seed),
                            "--force"])
    vision_s, train_args = 0.0, []
    if args.vision_steps:
        weights = args.out / "vision.pt"
        vision_s = run(vledge + ["pretrain-vision", "--data", str(data), "--out", str(weights), "--preset", args.preset,
                                 "--steps", str(args.vision_steps), "--seed", str(args.seed)])
        train_args = ["--vision-weights", str(weights), "--freeze", "vision", "--freeze", "projector",
                      "--lr", str(args.lr)]
    train_s = run(vledge + ["train", "--data", str(data), "--preset", args.preset, "--out", str(run_dir),
                            "--minutes", str(args.minutes), "--seed", str(args.seed), *train_args])
    wall_s = time.monotonic() - total_start
    eval_start = time.monotonic()
    report = json.loads(subprocess.run(
        vledge + ["eval", "--ckpt", str(run_dir / "ckpt.pt"), "--data", str(data), "--split", "test", "--json",
                  "--examples", "12"],
        check=True, capture_output=True, text=True).stdout)
    eval_s = time.monotonic() - eval_start

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last_step = max((row["step"] for row in rows if row.get("kind") == "train"), default=0)
    structured = {t: report["accuracy"][t] for t in STRUCTURED if t in report["accuracy"]}
    counts = {t: report["counts"][t] for t in structured}
    pooled = sum(structured[t] * counts[t] for t in structured) / max(sum(counts.values()), 1)
    result = {
        "preset": args.preset, "size": args.size, "minutes_budget": args.minutes,
        "vision_steps": args.vision_steps,
        "seconds": {"synth": synth_s, "pretrain_vision": vision_s, "train": train_s, "synth_plus_train": wall_s,
                    "eval": eval_s},
        "steps": last_step,
        "structured_accuracy": pooled, "accuracy": report["accuracy"], "counts": report["counts"],
        "bleu4": report["bleu4"], "cider": report["cider"], "examples": report.get("examples", []),
        "machine": {"cpu_count": __import__("os").cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    lines = [f"# `{args.preset}` on {args.size} synthetic images", "",
             f"synth {synth_s:.0f} s + pretrain-vision {vision_s:.0f} s + train {train_s:.0f} s ({last_step} steps) = "
             f"**{wall_s / 60:.1f} min** wall time; eval {eval_s:.0f} s; curves: {run_dir / 'curves.png'}", "",
             "| task | accuracy | questions |", "| --- | ---: | ---: |"]
    for task in sorted(report["accuracy"]):
        lines.append(f"| {task} | {report['accuracy'][task] * 100:.1f}% | {report['counts'][task]} |")
    lines += ["", f"count + color + shape + position pooled: **{pooled * 100:.1f}%**",
              f"captions: BLEU-4 {report['bleu4']:.3f}, CIDEr {report['cider']:.3f}", "", "Examples:", ""]
    for example in result["examples"]:
        lines.append(f"- {example['task']}: Q `{example['question']}` ref `{example['reference']}` "
                     f"pred `{example['prediction']}`")
    (args.out / "result.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
