"""Export a trained checkpoint with every variant and report parity against PyTorch on held-out data.

    python benchmarks/export_parity.py --ckpt runs/small/ckpt.pt --data data/synth --out runs/small-model \\
        [--parity-samples 400] [--min-agreement 0.95]

Runs ``vledge export`` (quantize auto) and prints, per variant, greedy-token agreement,
identical answers, logit drift and the accuracy delta, then whether every int8 and q4
decoder keeps the agreement bound. Exit status 1 when one does not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parity-samples", type=int, default=400)
    parser.add_argument("--min-agreement", type=float, default=0.95)
    args = parser.parse_args()
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "vledge", "export", str(args.ckpt), "-o", str(args.out),
                    "--calibration-data", str(args.data), "--parity-samples", str(args.parity_samples), "--force"],
                   check=True)
    manifest = json.loads((args.out / "vledge.json").read_text())
    variants = manifest["parity"]["variants"]
    reference = manifest["parity"]["reference"]
    print(f"\nexport took {time.monotonic() - started:.0f} s; {reference['questions']} held-out questions; "
          f"PyTorch exact match {100 * reference['accuracy']['overall']:.1f}%")
    print(f"{'variant':<28} {'agreement':>9} {'identical':>9} {'logits max':>10} {'Δ points':>8}")
    failures = []
    for label, p in variants.items():
        agreement = p["generation"]["token_agreement"]
        print(f"{label:<28} {agreement:9.1%} {p['generation']['sequence_match']:9.1%} "
              f"{p['prefill_logits']['max_abs']:10.3g} {p['accuracy_delta']:+8.1f}")
        if label in ("decoder_model_merged:int8", "decoder_model_merged:q4") and agreement < args.min_agreement:
            failures.append(f"{label} agreement {agreement:.1%} < {args.min_agreement:.0%}")
    print("selected:", json.dumps(manifest["selected"]))
    if failures:
        print("FAILED: " + "; ".join(failures))
        sys.exit(1)
    print(f"every int8/q4 decoder keeps >= {args.min_agreement:.0%} greedy-token agreement")


if __name__ == "__main__":
    main()
