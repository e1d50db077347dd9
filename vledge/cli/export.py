"""``vledge export``: a checkpoint to an ONNX model directory behind the parity gate."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vledge.cli.base import THREADS, FiniteFloat, fail_cleanly, main
from vledge.cli.convert import BACKEND_HELP


@main.command("export")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Model directory to write (default: a 'model' folder next to the checkpoint; required for a "
                   "Hugging Face folder).")
@click.option("--quantize", default="auto", show_default=True,
              help="Comma-separated variants: int8, q4, fp16; 'auto' makes all and picks the fastest per graph "
                   "that the parity gate passes (--gate and its budgets); 'none' writes fp32 only.")
@click.option("--calibration-data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Dataset for int8 calibration (train/val split) and the parity check (test/val split); "
                   "default: freshly generated built-in synthetic scenes.")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="How int8 activation ranges are set from the calibration images.")
@click.option("--parity-samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Held-out questions compared against PyTorch.")
@click.option("--max-accuracy-drop", type=FiniteFloat(min=0), default=1.0, show_default=True,
              help="Points of exact-match accuracy a variant may lose to be chosen by auto.")
@click.option("--min-token-agreement", type=FiniteFloat(min=0, max=1), default=0.9, show_default=True,
              help="Free-running budget: share of PyTorch's greedy tokens a variant must reproduce to be chosen by "
                   "auto; decides only with --gate free-running.")
@click.option("--gate", type=click.Choice(["teacher-forced", "free-running"]), default="teacher-forced",
              show_default=True, help="Which agreement with PyTorch decides auto.")
@click.option("--min-top1-agreement", type=FiniteFloat(min=0, max=1), default=0.9, show_default=True,
              help="Teacher-forced budget: share of positions where a variant must pick PyTorch's next token.")
@click.option("--max-mean-kl", type=FiniteFloat(min=0), default=0.05, show_default=True,
              help="Teacher-forced budget: mean KL divergence from PyTorch's next-token distribution, in nats.")
@click.option("--parity-text", type=click.Path(path_type=Path), default=None,
              help="A UTF-8 text file whose tokens are also teacher-forced by the gate (its first 1024 tokens).")
@click.option("--opset", type=click.IntRange(min=17), default=17, show_default=True, help="ONNX opset of the graphs.")
@click.option("--threads", type=THREADS, default=1, show_default=True,
              help="Threads for the latency measurements that rank variants.")
@click.option("--force", is_flag=True, help="Replace an existing model directory.")
@click.option("--image-processor-backend", "backend", type=click.Choice(["pil", "torchvision"]), default="pil",
              show_default=True, help="Hugging Face folders only: " + BACKEND_HELP)
@fail_cleanly
def export_command(ckpt, out_dir, quantize, data_dir, calibration_method, parity_samples, max_accuracy_drop,
                   min_token_agreement, gate, min_top1_agreement, max_mean_kl, parity_text, opset, threads, force,
                   backend) -> None:
    """Export a checkpoint (or a Hugging Face LLaVA, Idefics3 or SmolVLM folder) to an ONNX model directory, gated by
    parity with PyTorch."""
    from vledge.errors import ConfigError
    from vledge.export import ExportOptions, export, export_folder

    options = ExportOptions(
        quantize=tuple(part.strip() for part in quantize.split(",") if part.strip()), data=data_dir,
        calibration_method=calibration_method, parity_samples=parity_samples,
        max_accuracy_drop=max_accuracy_drop, min_token_agreement=min_token_agreement, gate=gate,
        min_top1_agreement=min_top1_agreement, max_mean_kl=max_mean_kl, parity_text=parity_text, opset=opset,
        threads=threads, force=force,
    )
    step = 0

    def progress(message: str) -> None:
        nonlocal step
        step += 1
        click.echo(f"[{step:2d}] {message}", err=True)

    bars: dict = {}

    def on_questions(label: str, done: int, total: int) -> None:
        """A bar with an ETA per measured label, on stderr when it is a terminal (quiet otherwise)."""
        from tqdm import tqdm

        bar = bars.get(label)
        if bar is None:
            bar = bars[label] = tqdm(total=total, desc=f"     {label}", unit="q", file=sys.stderr, disable=None,
                                     leave=False, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    if ckpt.is_dir():
        if out_dir is None:
            raise ConfigError(f"exporting the folder {ckpt} needs -o MODEL_DIR")
        result = export_folder(ckpt, out_dir, options, progress=progress, backend=backend, on_questions=on_questions)
    else:
        result = export(ckpt, out_dir, options, progress=progress, on_questions=on_questions)
    click.echo(f"model directory: {result.model_dir}")
    for label, parity in result.parity.items():
        forced = parity.teacher_forced.get("answers")
        tf = f"top-1 {forced.top1_agreement:6.1%} KL {forced.mean_kl:.3g}  " if forced else ""
        click.echo(f"  {label:<28} {tf}token agreement {parity.generation.token_agreement:6.1%}  "
                   f"accuracy {parity.accuracy['overall']:6.1%} ({parity.accuracy_delta:+.1f} pts)  "
                   f"decode step {parity.latency_ms.get('decode_step_ms', float('nan')):.3f} ms")
    for device, choice in result.selected.items():
        click.echo(f"  selected for {device}: " + ", ".join(f"{c}={p}" for c, p in choice.items()))
    for label, why in result.skipped.items():
        click.echo(f"  {label}: {why}")
    click.echo(f"details: {result.model_dir / 'parity.md'}")

