"""``vledge bench``: PyTorch against the exported variants, latency and accuracy side by side."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vledge.bounds import MAX_THREADS
from vledge.cli.base import fail_cleanly, main


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    if max(values) > MAX_THREADS:
        raise click.BadParameter(f"at most {MAX_THREADS} (threads or batch size), got {max(values)}")
    return values


@main.command("bench")
@click.option("--ckpt", type=click.Path(path_type=Path), default=None,
              help="The PyTorch original (ckpt.pt); without it only the exported model is timed (no PyTorch "
                   "engines, ratios or accuracy parity), as for tiled models (SmolVLM), whose PyTorch side is "
                   "always skipped.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="Its exported model directory.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Held-out data (test split); default: fresh built-in synthetic scenes.")
@click.option("--threads", default="1,2", show_default=True, help="Thread counts, each given to every engine.")
@click.option("--batch", "batches", default="1,8", show_default=True, help="Batch sizes for throughput.")
@click.option("--engines", default=None,
              help="Comma-separated: pytorch, pytorch-int8, pytorch-compile, ort-cpu-fp32, ort-cpu-int8, ort-cpu-q4, "
                   "ort-cpu-auto, ort-cuda-fp32, ort-cuda-fp16, openvino-cpu-fp32, openvino-cpu-int8, "
                   "openvino-cpu-q4 (default: all available).")
@click.option("--providers", default=None,
              help="Shortcut: cpu, cuda or cpu,cuda to limit ONNX Runtime engines (OpenVINO counts as cpu).")
@click.option("--peers/--no-peers", default=True, show_default=True,
              help="With the default engines: include pytorch-compile and openvino-cpu-* (skipped with a note "
                   "when not installed).")
@click.option("--repeats", type=click.IntRange(min=3), default=20, show_default=True,
              help="Timed repetitions of every stage per engine.")
@click.option("--parity-samples", type=click.IntRange(min=1), default=200, show_default=True,
              help="Held-out questions for each engine's accuracy parity.")
@click.option("--no-cold-start", is_flag=True, help="Skip the fresh-process load and memory measurements.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench"), show_default=True,
              help="Output folder; its bench.json is rewritten as each measurement ends.")
@click.option("--resume", is_flag=True,
              help="Continue the benchmark whose bench.json is in --out: keep what it measured, measure the rest "
                   "(the settings must be the same).")
@click.option("--quiet", is_flag=True, help="No progress (it is also off when stderr is not a terminal).")
@fail_cleanly
def bench_command(ckpt, model_dir, data_dir, threads, batches, engines, providers, peers, repeats, parity_samples,
                  no_cold_start, out_dir, resume, quiet) -> None:
    """Latency and accuracy of PyTorch vs the exported variants, side by side.

    The vision encoder is timed per image and per tile (tiled models such as SmolVLM run it on every tile of
    an image and its global view)."""
    from vledge.files import check_writable_folder

    check_writable_folder(out_dir, "--out folder")  # before minutes of measuring
    from vledge.benchmark.engines import EngineSpec
    from vledge.benchmark.report import read_previous, write_outputs, write_progress
    from vledge.benchmark.run import BenchConfig, default_engines, run_benchmark
    from vledge.cli.progress import progress_bar
    from vledge.files import check_output_dir

    check_output_dir(out_dir, "bench folder")  # before minutes of measuring
    previous = read_previous(out_dir) if resume else None

    names = tuple(e.strip() for e in engines.split(",") if e.strip()) if engines else None
    if names is None and (providers or not peers):
        allowed = {p.strip() for p in providers.split(",")} if providers else {"cpu", "cuda"}
        specs = default_engines(model_dir, peers=peers and "cpu" in allowed)
        names = tuple(s.name for s in specs if s.kind == "pytorch" or s.provider in allowed)
    for name in names or ():
        EngineSpec.parse(name)
    config = BenchConfig(ckpt=ckpt, model_dir=model_dir, data=data_dir, engines=names, threads=_int_list(threads),
                         batches=_int_list(batches), repeats=repeats, parity_samples=parity_samples,
                         cold_start=not no_cold_start)
    with progress_bar(quiet, desc="bench", unit="step") as bar:
        def say(message: str) -> None:
            if not quiet:
                bar.write(f"· {message}", file=sys.stderr)

        def advance(done: int, total: int) -> None:
            bar.total, bar.n = total, done
            bar.refresh()

        if resume and previous is None:
            say(f"nothing to resume in {out_dir}: measuring everything")
        result = run_benchmark(config, progress=say, save=lambda partial: write_progress(partial, out_dir),
                               previous=previous, advance=advance)
    written = write_outputs(result, out_dir)
    click.echo((out_dir / "bench.md").read_text())
    click.echo("wrote " + ", ".join(str(p) for p in written.values()))

