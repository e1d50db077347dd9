"""The ``vledge`` command line. Heavy modules are imported inside each command."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from vledge import __version__
from vledge.errors import VledgeError

log = logging.getLogger("vledge")


def _fail_cleanly(command):
    """Turn vledge's typed errors into one clear line and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except VledgeError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vledge")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Train small vision-language models and run them at the edge."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# --------------------------------------------------------------------------- data


@main.group()
def data() -> None:
    """Datasets: generate the built-in synthetic data, inspect loaders."""


@data.command("synth")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--size", type=click.IntRange(min=1), default=20000, show_default=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--image-size", type=click.IntRange(min=48), default=64, show_default=True, help="Square side in pixels.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes (default: all cores).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@_fail_cleanly
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
@click.option("--split", default="train", show_default=True)
@_fail_cleanly
def data_inspect(path: Path, split: str) -> None:
    """Load a dataset (LLaVA JSON, COCO captions, ImageFolder, synthetic) and report what was kept."""
    from vledge.data.loaders import load_records

    records, report = load_records(path, split=split)
    click.echo(report.summary())
    tasks: dict[str, int] = {}
    for record in records:
        for turn in record.turns:
            tasks[turn.task] = tasks.get(turn.task, 0) + 1
    for task, count in sorted(tasks.items()):
        click.echo(f"  {task:<10} {count} turns")


# --------------------------------------------------------------------------- training


@main.command()
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="Dataset: a folder with train/val JSON (synthetic or LLaVA), a COCO captions file, or an ImageFolder.")
@click.option("--preset", default="small", show_default=True, help="tiny | small | base | seed-lstm | tiny-lstm")
@click.option("--out", "run_dir", type=click.Path(path_type=Path), required=True, help="Run folder.")
@click.option("--stage", type=click.Choice(["align", "instruct"]), default=None,
              help="Run one stage only (default: the preset's stages in order).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (default: preset).")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Wall-time budget; the schedule follows whichever of steps and time runs out first.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--grad-accum", type=click.IntRange(min=1), default=None)
@click.option("--lr", type=float, default=None)
@click.option("--eval-every", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads per process.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--resume", is_flag=True, help="Continue RUN/last.pt exactly.")
@click.option("--init", "init_ckpt", type=click.Path(path_type=Path), default=None,
              help="Start from this checkpoint's weights and tokenizer (e.g. the align stage's ckpt.pt).")
@click.option("--vision-weights", type=click.Path(path_type=Path), default=None,
              help="Pretrained vision backbone weights (a local state-dict file).")
@click.option("--freeze", multiple=True, type=click.Choice(["vision", "projector", "language"]),
              help="Keep this part fixed in every stage (repeatable), e.g. a pretrained vision encoder.")
@_fail_cleanly
def train(data_dir, preset, run_dir, stage, max_steps, minutes, batch_size, grad_accum, lr, eval_every, seed, threads,
          precision, device, resume, init_ckpt, vision_weights, freeze) -> None:
    """Train a fusion model: align the projector on captions, then instruction-tune."""
    import dataclasses

    from tqdm import tqdm

    from vledge.config import preset as load_preset
    from vledge.training.trainer import train as run_training

    model_config, train_config = load_preset(preset)
    overrides = {k: v for k, v in dict(max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                                      eval_every=eval_every, seed=seed, threads=threads, precision=precision).items()
                 if v is not None}
    train_config = dataclasses.replace(train_config, **overrides)
    if resume and (overrides or minutes or stage or freeze or init_ckpt or vision_weights):
        click.echo("note: --resume continues with the run's saved configuration; the other options are ignored",
                   err=True)
    bar = tqdm(total=train_config.max_steps, desc="train", unit="step", dynamic_ncols=True)

    def on_event(event) -> None:
        bar.total = event.total_steps
        bar.n = event.step
        if event.kind == "step":
            bar.set_postfix(stage=event.data["stage"], loss=f"{event.data['loss']:.3f}",
                            sps=f"{event.data['samples_per_s']:.0f}")
        elif event.kind == "eval":
            accuracy = event.data.get("accuracy", {}).get("overall")
            bar.write(f"step {event.step}: val loss {event.data.get('val_loss', float('nan')):.4f}"
                      + (f", val accuracy {accuracy * 100:.1f}%" if accuracy is not None else ""))
        bar.refresh()

    try:
        result = run_training(data_dir, run_dir, model_config, train_config, stage=stage, minutes=minutes,
                              resume=resume, init=init_ckpt, vision_weights=vision_weights, freeze=tuple(freeze),
                              device=device,
                              on_event=on_event)
    except KeyboardInterrupt:
        bar.close()
        click.echo(f"interrupted; {run_dir / 'last.pt'} saved, continue with --resume", err=True)
        sys.exit(130)
    bar.close()
    click.echo(f"trained {result.steps} steps in {result.seconds / 60:.1f} min")
    click.echo(f"best checkpoint: {result.best_checkpoint}\nlast checkpoint: {result.last_checkpoint}")
    click.echo(f"metrics: {run_dir / 'metrics.jsonl'}  curves: {run_dir / 'curves.png'}")


@main.command("eval")
@click.option("--ckpt", type=click.Path(path_type=Path), required=True)
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True)
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many questions.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--examples", type=click.IntRange(min=0), default=0, help="Include this many predictions in --json.")
@_fail_cleanly
def eval_command(ckpt, data_dir, split, limit, batch_size, as_json, examples) -> None:
    """Exact-match accuracy per task and BLEU-4 / CIDEr on captions, with the PyTorch model."""
    import json

    from tqdm import tqdm

    from vledge.checkpoint import load_checkpoint
    from vledge.data.loaders import load_records
    from vledge.evaluation import evaluate, questions_of

    checkpoint = load_checkpoint(ckpt)
    model, tokenizer = checkpoint.build_model(), checkpoint.tokenizer()
    records, report = load_records(data_dir, split=split)
    with tqdm(total=len(questions_of(records, limit)), desc="eval", unit="q", disable=as_json) as bar:
        result = evaluate(model, tokenizer, checkpoint.model_config, records, limit=limit, batch_size=batch_size,
                          progress=bar.update)
    if as_json:
        click.echo(json.dumps({"checkpoint": str(ckpt), "split": split, "data": report.summary(),
                               **result.to_dict(examples)}, indent=2))
    else:
        click.echo(report.summary())
        click.echo(result.describe())


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--ckpt", type=click.Path(path_type=Path), required=True, help="A vledge checkpoint (PyTorch).")
@click.option("--question", default=None, help="Ask this instead of the caption prompt.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0)
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0)
@click.option("--num-beams", type=click.IntRange(min=1), default=1)
@click.option("--seed", type=int, default=None)
@_fail_cleanly
def caption(images, ckpt, question, max_new_tokens, temperature, top_k, top_p, num_beams, seed) -> None:
    """Caption images (or answer --question) with a PyTorch checkpoint."""

    from vledge.checkpoint import load_checkpoint
    from vledge.data.images import preprocess
    from vledge.decoding import GenerationOptions
    from vledge.errors import ImageError
    from vledge.models.generate import generate
    from vledge.prompt import question_ids

    checkpoint = load_checkpoint(ckpt)
    model, tokenizer = checkpoint.build_model(), checkpoint.tokenizer()
    config = checkpoint.model_config
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                num_beams=num_beams, seed=seed)
    prompt = question_ids(tokenizer, config.prompt, question or "Describe the image briefly.")
    failures = 0
    for path in images:
        try:
            pixels = preprocess(path, config.preprocess)[None]
        except ImageError as exc:
            click.echo(f"{path}: error: {exc}", err=True)
            failures += 1
            continue
        tokens = generate(model, pixels, [prompt], options, tokenizer.eos_id, tokenizer.pad_id)[0]
        click.echo(f"{path}: {tokenizer.decode(tokens).strip()}")
    if failures:
        raise click.ClickException(f"{failures} of {len(images)} images could not be read")


if __name__ == "__main__":
    main()
