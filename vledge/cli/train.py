"""``vledge train``, ``vledge pretrain-vision`` and ``vledge eval``: the PyTorch side of a model's life."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vledge.bounds import MAX_GRAD_ACCUM
from vledge.cli.base import THREADS, FiniteFloat, fail_cleanly, main


@main.command()
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="Dataset: a folder with train/val JSON (synthetic or LLaVA), a COCO captions file, or an ImageFolder.")
@click.option("--preset", default="small", show_default=True, help="tiny | small | base | seed-lstm | tiny-lstm")
@click.option("--out", "run_dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Run folder.")
@click.option("--stage", type=click.Choice(["align", "instruct"]), default=None,
              help="Run one stage only (default: the preset's stages in order).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (default: preset).")
@click.option("--minutes", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Wall-time budget; the schedule follows whichever of steps and time runs out first.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Examples per step and process (default: preset).")
@click.option("--grad-accum", type=click.IntRange(1, MAX_GRAD_ACCUM), default=None,
              help=f"Micro-batches per optimizer step, at most {MAX_GRAD_ACCUM} (default: preset).")
@click.option("--lr", type=FiniteFloat(), default=None,
              help="Peak learning rate (default: preset; the language side's only where the preset sets vision_lr).")
@click.option("--eval-every", type=click.IntRange(min=1), default=None,
              help="Steps between evaluations (default: preset).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None, help="Seed of the weights and the batch order (default: preset).")
@click.option("--threads", type=THREADS, default=None, help="torch threads per process.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
              help="auto: bf16 autocast on a CUDA GPU that supports it, else fp32 (default: preset, auto).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--resume", is_flag=True, help="Continue RUN/last.pt exactly.")
@click.option("--init", "init_ckpt", type=click.Path(path_type=Path), default=None,
              help="Start from this checkpoint's weights, tokenizer and model configuration (e.g. the align stage's ckpt.pt, or one from vledge convert).")
@click.option("--vision-weights", type=click.Path(path_type=Path), default=None,
              help="Pretrained vision backbone weights (a local state-dict file).")
@click.option("--freeze", multiple=True, type=click.Choice(["vision", "projector", "language"]),
              help="Keep this part fixed in every stage (repeatable), e.g. a pretrained vision encoder.")
@click.option("--vision-model", type=click.Path(path_type=Path), default=None,
              help="A local Hugging Face CLIPVisionModel / SiglipVisionModel folder as the vision encoder (its "
                   "preprocessor_config.json sets the preprocessing), instead of the preset's.")
@click.option("--vision-feature-layer", type=int, default=-2, show_default=True,
              help="With --vision-model: the hidden layer whose tokens become visual tokens.")
@click.option("--vision-token-reduction", type=click.Choice(["avg_pool_2x2", "pixel_shuffle_2x2"]), default=None,
              help="With --vision-model: 4x fewer visual tokens by 2x2 average pooling or pixel shuffle.")
@click.option("--language-model", type=click.Path(path_type=Path), default=None,
              help="A local Hugging Face folder of a Llama-family LM (Llama, Qwen2, Mistral, SmolLM2) to fine-tune.")
@click.option("--lora", "lora_rank", type=click.IntRange(min=1), default=None,
              help="Tune the pretrained LM through LoRA adapters of this rank (merged into ckpt.pt).")
@click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True), default=16.0, show_default=True,
              help="LoRA scale: adapters add alpha / rank times their output.")
@click.option("--lora-dropout", type=click.FloatRange(min=0, max=1, max_open=True), default=0.05, show_default=True,
              help="Dropout on the adapters' input.")
@click.option("--max-seq-len", type=click.IntRange(min=8), default=None,
              help="Longest training sequence in tokens, visual tokens included (default: preset).")
@click.option("--allow-outside-paths", is_flag=True,
              help="Let image names in the dataset file point outside its folder (absolute, ../).")
@click.option("--gradient-checkpointing", is_flag=True,
              help="Recompute the language model's activations in the backward pass: less memory, slower steps.")
@fail_cleanly
def train(data_dir, preset, run_dir, stage, max_steps, minutes, batch_size, grad_accum, lr, eval_every, seed, threads,
          precision, device, resume, init_ckpt, vision_weights, freeze, vision_model, vision_feature_layer,
          vision_token_reduction, language_model, lora_rank, lora_alpha, lora_dropout, max_seq_len,
          allow_outside_paths, gradient_checkpointing) -> None:
    """Train a fusion model: align the projector on captions, then instruction-tune."""
    import dataclasses

    from vledge.cli.progress import training_bar
    from vledge.config import preset as load_preset
    from vledge.training.budget import cut_short_lines, finish_minutes, resume_command
    from vledge.training.trainer import RunOptions
    from vledge.training.trainer import train as run_training

    model_config, train_config = load_preset(preset)
    overrides = {k: v for k, v in dict(max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                                      eval_every=eval_every, seed=seed, threads=threads, precision=precision,
                                      max_seq_len=max_seq_len).items()
                 if v is not None}
    train_config = dataclasses.replace(train_config, **overrides)
    if vision_model is not None:
        from vledge.errors import ConfigError
        from vledge.hf.vision import tower_model_config

        if vision_weights is not None:
            raise ConfigError("--vision-model brings its own weights; --vision-weights cannot be combined with it")
        vision, spec = tower_model_config(vision_model, vision_feature_layer, reduction=vision_token_reduction)
        model_config = dataclasses.replace(model_config, vision=vision, preprocess=spec)
        vision_weights = vision_model
    if resume and (overrides or stage or freeze or init_ckpt or vision_weights or language_model or lora_rank):
        click.echo("note: --resume continues with the run's saved configuration; options other than --minutes "
                   "and --device are ignored", err=True)
    options = RunOptions(stage=stage, minutes=minutes, freeze=tuple(freeze), init=init_ckpt,
                         vision_weights=vision_weights, device=device, language_model=language_model,
                         lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         allow_outside_paths=allow_outside_paths, gradient_checkpointing=gradient_checkpointing)
    bar = None

    def on_event(event) -> None:
        nonlocal bar
        if bar is None:
            bar = training_bar(event, desc="train")
        bar.total = event.total_steps
        bar.n = event.step
        if event.kind == "step":
            bar.set_postfix(stage=event.data["stage"], loss=f"{event.data['loss']:.3f}",
                            sps=f"{event.data['samples_per_s']:.0f}")
        elif event.kind == "eval":
            accuracy = event.data.get("accuracy", {}).get("overall")
            bar.write(f"step {event.step}: val loss {event.data.get('val_loss', float('nan')):.4f}"
                      + (f", val accuracy {accuracy * 100:.1f}%" if accuracy is not None else "")
                      + (f"; ckpt.pt holds step {event.data['ckpt_step']}" if event.data.get("ckpt_step") else ""))
        bar.refresh()

    try:
        result = run_training(data_dir, run_dir, model_config, train_config, options, resume=resume,
                              on_event=on_event)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        click.echo(f"interrupted; {run_dir / 'last.pt'} saved, continue with --resume", err=True)
        sys.exit(130)
    finally:
        if bar is not None:
            bar.close()  # an error line then starts on a line of its own
    new_steps = result.steps - result.start_step
    click.echo(f"trained {result.steps} steps in {result.seconds / 60:.1f} min"
               + (f" ({new_steps} in this run)" if resume else ""))
    if result.cut_short:
        commands = [resume_command(data_dir, run_dir, finish_minutes(result.seconds, result.steps,
                                                                     result.planned_steps))]
        consequence = (f"{result.best_checkpoint} holds an undertrained model, not what this preset reaches "
                       "(a busy or slow machine trains fewer steps in the same minutes).")
        click.echo("\n".join(cut_short_lines(result.steps, result.planned_steps, result.budget_minutes,
                                             consequence, commands)))
    click.echo(f"best checkpoint: {result.best_checkpoint} (step {result.best_step})\n"
               f"last checkpoint: {result.last_checkpoint}")
    click.echo(f"metrics: {run_dir / 'metrics.jsonl'}  curves: {run_dir / 'curves.png'}")


@main.command("pretrain-vision")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="vledge synthetic data (vledge data synth): its scene labels are the targets.")
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True,
              help="Weights file to write, for train --vision-weights.")
@click.option("--preset", default="small", show_default=True,
              help="The preset whose vision encoder and projector to train.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps  [default: 300].")
@click.option("--minutes", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Wall-time budget; whichever of steps and time runs out first ends the run.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per step [default: 64].")
@click.option("--lr", type=FiniteFloat(), default=None, help="Peak learning rate [default: 3e-3].")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--threads", type=THREADS, default=None, help="torch threads.")
@fail_cleanly
def pretrain_vision_command(data_dir, out_path, preset, steps, minutes, batch_size, lr, seed, threads) -> None:
    """Pretrain the vision encoder and projector on synthetic scene labels (each cell's colour, shape, size, word).

    Then: vledge train --vision-weights OUT --freeze vision --freeze projector ...
    """
    import dataclasses

    from tqdm import tqdm

    from vledge.config import preset as load_preset
    from vledge.training.vision_pretrain import VisionPretrainConfig, pretrain_vision

    model_config, _ = load_preset(preset)
    overrides = {k: v for k, v in dict(steps=steps, batch_size=batch_size, lr=lr, threads=threads).items()
                 if v is not None}
    config = dataclasses.replace(VisionPretrainConfig(seed=seed), **overrides)
    bar = tqdm(total=config.steps, desc="pretrain-vision", unit="step", dynamic_ncols=True)

    def on_progress(step: int, total: int, row: dict) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        bar.refresh()

    result = pretrain_vision(data_dir, out_path, model_config, config, minutes=minutes, on_progress=on_progress)
    bar.close()
    click.echo(f"pretrained {result.steps} steps in {result.seconds / 60:.1f} min: {result.weights}")
    cells = ", ".join(f"{name} {result.accuracy[name] * 100:.1f}%" for name in ("color", "shape", "size", "word")
                      if name in result.accuracy)
    click.echo(f"held-out per-cell accuracy (occupied cells): {cells}")
    click.echo(f"next: vledge train --data {data_dir} --preset {preset} --vision-weights {result.weights} "
               f"--freeze vision --freeze projector --out RUN")


@main.command("eval")
@click.option("--ckpt", type=click.Path(path_type=Path), required=True, help="A vledge checkpoint (ckpt.pt).")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="Dataset, any layout train --data reads.")
@click.option("--split", default="test", show_default=True, help="Split to ask: train, val or test.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many questions.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Questions answered together.")
@click.option("--threads", type=THREADS, default=None,
              help="torch threads. Default: the cores other processes leave free at the start (1-minute load "
                   "average), at least 1, as for train.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--examples", type=click.IntRange(min=0), default=0, help="Include this many predictions in --json.")
@click.option("--quiet", is_flag=True, help="No progress bar (it is also off when stderr is not a terminal).")
@fail_cleanly
def eval_command(ckpt, data_dir, split, limit, batch_size, threads, as_json, examples, quiet) -> None:
    """Exact-match accuracy per task and BLEU-4 / CIDEr on captions, with the PyTorch model."""
    import json

    import torch

    from vledge.checkpoint import load_checkpoint
    from vledge.cli.progress import progress_bar
    from vledge.data.loaders import load_records
    from vledge.evaluation import evaluate, questions_of
    from vledge.threads import default_threads

    torch.set_num_threads(threads or default_threads())
    checkpoint = load_checkpoint(ckpt)
    model, tokenizer = checkpoint.build_model(), checkpoint.tokenizer()
    records, report = load_records(data_dir, split=split)
    with progress_bar(quiet, total=len(questions_of(records, limit)), desc="eval", unit="q") as bar:
        result = evaluate(model, tokenizer, checkpoint.model_config, records, limit=limit, batch_size=batch_size,
                          progress=bar.update)
    if as_json:
        click.echo(json.dumps({"checkpoint": str(ckpt), "split": split, "data": report.summary(),
                               **result.to_dict(examples)}, indent=2))
    else:
        click.echo(report.summary())
        click.echo(result.describe())
