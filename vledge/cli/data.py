"""``vledge data``: generate the built-in synthetic dataset and inspect datasets."""

from __future__ import annotations

from pathlib import Path

import click

from vledge.cli.base import fail_cleanly, main


@main.group()
def data() -> None:
    """Datasets: generate the built-in synthetic data, inspect loaders."""


@data.command("synth")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--size", type=click.IntRange(min=1), default=20000, show_default=True, help="Number of images.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="The same seed and options give the same data.")
@click.option("--image-size", type=click.IntRange(min=48), default=64, show_default=True, help="Square side in pixels.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes (default: all cores).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@fail_cleanly
def data_synth(out_dir: Path, size: int, seed: int, image_size: int, workers: int | None, force: bool) -> None:
    """Draw synthetic scenes with exact visual-instruction conversations (LLaVA JSON, train/val/test)."""
    from tqdm import tqdm

    from vledge.data.synth import SynthOptions, generate_dataset

    options = SynthOptions(size=size, seed=seed, image_size=image_size)
    with tqdm(total=size, desc="synth", unit="img") as bar:
        summary = generate_dataset(out_dir, options, workers=workers, overwrite=force, progress=bar.update)
    click.echo(summary.describe())


@data.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--split", default="train", show_default=True, help="Split to load: train, val or test.")
@click.option("--allow-outside-paths", is_flag=True,
              help="Let image names in the dataset file point outside its folder (absolute, ../).")
@fail_cleanly
def data_inspect(path: Path, split: str, allow_outside_paths: bool) -> None:
    """Load a dataset (LLaVA JSON, COCO captions, ImageFolder, synthetic) and report what was kept."""
    from vledge.data.loaders import load_records

    records, report = load_records(path, split=split, allow_outside_paths=allow_outside_paths)
    click.echo(report.summary())
    tasks: dict[str, int] = {}
    for record in records:
        for turn in record.turns:
            tasks[turn.task] = tasks.get(turn.task, 0) + 1
    for task, count in sorted(tasks.items()):
        click.echo(f"  {task:<10} {count} turns")

