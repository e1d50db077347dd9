"""``vledge quickstart``: the whole path from data to a demo video in one command."""

from __future__ import annotations

from pathlib import Path

import click

from vledge.cli.base import THREADS, FiniteFloat, fail_cleanly, main


@main.command("quickstart")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("quickstart"), show_default=True,
              help="Folder for everything it makes.")
@click.option("--preset", default="small", show_default=True, help="tiny | small | base | seed-lstm | tiny-lstm")
@click.option("--size", type=click.IntRange(min=50), default=20000, show_default=True, help="Synthetic images.")
@click.option("--minutes", type=FiniteFloat(min=0, min_open=True), default=12.0, show_default=True,
              help="Training wall-time budget.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Cap training steps instead.")
@click.option("--vision-pretrain-steps", type=click.IntRange(min=0), default=300, show_default=True,
              help="Per-cell pretraining of the vision encoder on the scenes' labels (0: skip).")
@click.option("--threads", type=THREADS, default=None,
              help="Default: the cores other processes leave free at the start (1-minute load average), at least 1.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed of the data and the training.")
@click.option("--force", is_flag=True, help="Reuse a non-empty output folder.")
@fail_cleanly
def quickstart_command(out_dir, preset, size, minutes, max_steps, vision_pretrain_steps, threads, seed, force) -> None:
    """Data -> training -> evaluation -> export -> benchmark -> captions -> demo video, in one go."""
    import time

    from vledge.cli.progress import training_bar
    from vledge.quickstart import QuickstartConfig, budget_eta, run_quickstart

    config = QuickstartConfig(out=out_dir, preset=preset, size=size, minutes=minutes, max_steps=max_steps,
                              vision_pretrain_steps=vision_pretrain_steps, threads=threads, seed=seed, force=force)
    bar = None

    def on_train_event(event) -> None:
        nonlocal bar
        if bar is None:
            bar = training_bar(event, desc="    train")
        bar.total, bar.n = event.total_steps, event.step
        if event.kind == "step" and minutes and event.data.get("elapsed_s"):
            bar.set_postfix_str(budget_eta(event.step, event.total_steps, event.data["elapsed_s"], minutes * 60))
        elif event.kind == "eval":
            accuracy = event.data.get("accuracy", {}).get("overall")
            if accuracy is not None:
                bar.set_postfix(val_accuracy=f"{accuracy * 100:.1f}%")
        bar.refresh()
        if event.kind == "end":
            bar.close()

    started = time.perf_counter()
    summary = run_quickstart(config, progress=lambda message: click.echo(message, err=True),
                             on_train_event=on_train_event)
    click.echo(summary.describe())
    click.echo(f"done in {(time.perf_counter() - started) / 60:.1f} min; summary: "
               f"{summary.artifacts['summary']}")

