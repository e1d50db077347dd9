"""``vledge batch``: caption a folder, a glob, a list of paths or a table into Parquet or JSONL parts."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vledge.cli.base import THREADS, FiniteFloat, fail_cleanly, main, parse_providers


@main.command("batch")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="An exported model directory (ONNX Runtime, no torch needed).")
@click.option("--input", "input_spec", required=True,
              help="A folder (recursive), a glob, a .txt file of paths, or a .parquet/.csv table.")
@click.option("--output", type=click.Path(path_type=Path), required=True,
              help="Output folder of parts; a name ending in .jsonl writes JSON lines, anything else Parquet.")
@click.option("--format", "output_format", type=click.Choice(["parquet", "jsonl"]), default=None,
              help="Output format [default: from --output's suffix: .jsonl -> jsonl, else parquet].")
@click.option("--prompt", default=None, help="Ask this about every image [default: the model's caption prompt].")
@click.option("--prompt-column", default=None, help="A table column holding each row's prompt (empty: --prompt).")
@click.option("--image-column", default=None,
              help="The table column with image paths or bytes [default: the first of path, image, image_path, "
                   "file, filename].")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: worker processes on this machine; ray: Ray Data (pip install 'vledge[ray]').")
@click.option("--ray-address", default=None,
              help="Join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting Ray here.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes or Ray actors, each with its own model [default: one per core].")
@click.option("--threads-per-worker", type=THREADS, default=None,
              help="ONNX Runtime threads of each worker (Ray: CPUs per actor) [default: cores / workers].")
@click.option("--gpus-per-worker", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="GPUs Ray reserves for each actor (--engine ray).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images answered together in one generate call (left-padded batch).")
@click.option("--part-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Inputs per unit of work and per committed output part.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8", "q4"]), default="auto",
              show_default=True, help="Graph variants to run.")
@click.option("--provider", default="auto", show_default=True,
              help="auto | cpu | cuda | tensorrt, or a comma-separated list in priority order.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --output: only inputs not yet written.")
@click.option("--follow-links", is_flag=True,
              help="Read files that a folder --input links to outside itself (refused by default).")
@fail_cleanly
def batch(model_dir, input_spec, output, output_format, prompt, prompt_column, image_column, engine, ray_address,
          workers, threads_per_worker, gpus_per_worker, batch_size, part_size, precision, provider, max_new_tokens,
          resume, follow_links) -> None:
    """Caption many images into a folder of Parquet (or JSONL) parts, one row per input.

    A broken image is a row with its error; the run goes on and exits 0. Interrupted runs continue
    with --resume, redoing nothing and writing no input twice. The row schema is in docs/batch.md.
    """
    from tqdm import tqdm

    from vledge.bulk import BatchOptions, run_batch

    options = BatchOptions(model_dir=model_dir, input=input_spec, output=output, output_format=output_format,
                           prompt=prompt, prompt_column=prompt_column, image_column=image_column, engine=engine,
                           ray_address=ray_address, workers=workers, threads_per_worker=threads_per_worker,
                           gpus_per_worker=gpus_per_worker, batch_size=batch_size, part_size=part_size,
                           precision=precision, providers=parse_providers(provider), max_new_tokens=max_new_tokens,
                           resume=resume, follow_links=follow_links)
    bar = tqdm(desc="batch", unit="img", file=sys.stderr, dynamic_ncols=True, disable=None)
    try:
        summary = run_batch(options, on_progress=bar.update, on_start=bar.reset)
    finally:
        bar.close()
    click.echo(summary.describe())
