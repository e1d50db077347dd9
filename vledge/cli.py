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
    if verbose < 2:
        _quiet_onnxruntime()


def _quiet_onnxruntime() -> None:
    """ONNX Runtime prints provider-loading noise to stderr; vledge reports what matters itself."""
    try:
        import onnxruntime
    except ImportError:
        return
    onnxruntime.set_default_logger_severity(3)


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


@main.command("pretrain-vision")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="vledge synthetic data (vledge data synth): its scene labels are the targets.")
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True,
              help="Weights file to write, for train --vision-weights.")
@click.option("--preset", default="small", show_default=True, help="The preset whose vision encoder and projector to train.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps  [default: 300].")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Wall-time budget; whichever of steps and time runs out first ends the run.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--lr", type=float, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads.")
@_fail_cleanly
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


def _inference_options(command):
    """Options shared by ``caption`` and ``ask``: the engine, decoding, and output."""
    options = [
        click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
                     help="An exported model directory (ONNX Runtime, no torch needed)."),
        click.option("--ckpt", type=click.Path(path_type=Path), default=None,
                     help="A vledge checkpoint (PyTorch); give exactly one of --model and --ckpt."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8", "q4"]), default="auto",
                     show_default=True, help="Graph variants to run (--model only)."),
        click.option("--provider", default="auto", show_default=True,
                     help="auto | cpu | cuda | tensorrt, or a comma-separated list in priority order (--model only)."),
        click.option("--strict", is_flag=True, help="Fail if heavy nodes would run on the CPU under a GPU provider."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads."),
        click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Images answered together (left-padded batch)."),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True),
        click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="0 is greedy; above 0 samples."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, help="Sample from the k likeliest (0: off)."),
        click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0,
                     help="Nucleus sampling (1: off)."),
        click.option("--num-beams", type=click.IntRange(min=1), default=1, help="Beam search when above 1."),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0,
                     help="Above 1 discourages repeated tokens."),
        click.option("--seed", type=int, default=None, help="Seed for sampling."),
        click.option("--stop", "stop_strings", multiple=True,
                     help="Stop at this text, cut before it (repeatable; \\n means a newline)."),
        click.option("--jsonl", is_flag=True, help="One JSON object per image on stdout."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _answer_images(ctx: click.Context, images, question: str | None, model_dir, ckpt, precision, provider, strict,
                   threads, batch_size, max_new_tokens, temperature, top_k, top_p, num_beams, repetition_penalty,
                   seed, stop_strings, jsonl) -> None:
    import json

    from tqdm import tqdm

    from vledge import captioning
    from vledge.decoding import GenerationOptions

    if (model_dir is None) == (ckpt is None):
        raise click.UsageError("give exactly one of --model (an exported model directory) and --ckpt (a checkpoint)")
    if ckpt is not None:
        for name in ("precision", "provider", "strict"):
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"--{name} applies to --model only")
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                num_beams=num_beams, repetition_penalty=repetition_penalty, seed=seed)
    stops = tuple(stop.replace("\\n", "\n") for stop in stop_strings)
    files, problems = captioning.expand_inputs(images)
    if model_dir is not None:
        providers = tuple(p.strip() for p in provider.split(",") if p.strip()) if "," in provider else provider
        engine = captioning.RuntimeEngine(model_dir, precision=precision, providers=providers, threads=threads,
                                          strict=strict)
    else:
        engine = captioning.CheckpointEngine(ckpt, threads=threads)
    log.info("answering with %s", engine.description)
    prompt = question or engine.caption_prompt
    total = len(files) + len(problems)
    bar = tqdm(total=len(files), desc="ask" if question else "caption", unit="img", file=sys.stderr,
               dynamic_ncols=True, disable=None if len(files) > 1 else True)

    def report(record) -> None:
        if record.ok:
            click.echo(json.dumps(record.to_dict(), ensure_ascii=False) if jsonl else f"{record.image}: {record.text}")
            return
        bar.clear()
        click.echo(f"{record.image}: error: {record.error}", err=True)
        if jsonl:
            click.echo(json.dumps(record.to_dict(), ensure_ascii=False))

    for problem in problems:
        problem.prompt = prompt
        report(problem)
    try:
        records = captioning.run(engine, files, prompt, options, stops, batch_size=batch_size, on_record=report,
                                 on_progress=bar.update)
    finally:
        bar.close()
    failures = len(problems) + sum(not r.ok for r in records)
    if failures:
        raise click.ClickException(f"{failures} of {total} images could not be read or answered")


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--question", default=None, help="Ask this instead of the caption prompt.")
@_inference_options
@click.pass_context
@_fail_cleanly
def caption(ctx, images, question, **kwargs) -> None:
    """Caption images: files, folders (their image files) or glob patterns.

    With --model the exported model runs on ONNX Runtime (no torch); with --ckpt the PyTorch
    checkpoint does. A bad image prints an error line and the others go on; the exit status is 1
    if any image failed.
    """
    _answer_images(ctx, images, question, **kwargs)


@main.command()
@click.argument("image")
@click.argument("question")
@_inference_options
@click.pass_context
@_fail_cleanly
def ask(ctx, image, question, **kwargs) -> None:
    """Answer QUESTION about IMAGE (a file, or a folder or glob to ask about each image)."""
    if not question.strip():
        raise click.UsageError("QUESTION is empty")
    _answer_images(ctx, (image,), question, **kwargs)


# --------------------------------------------------------------------------- export


@main.command("export")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Model directory to write (default: a 'model' folder next to the checkpoint).")
@click.option("--quantize", default="auto", show_default=True,
              help="Comma-separated variants: int8, q4, fp16; 'auto' makes all and picks the fastest per graph "
                   "within --max-accuracy-drop; 'none' writes fp32 only.")
@click.option("--calibration-data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Dataset for int8 calibration (train/val split) and the parity check (test/val split); "
                   "default: freshly generated built-in synthetic scenes.")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True)
@click.option("--parity-samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Held-out questions compared against PyTorch.")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Points of exact-match accuracy a variant may lose to be chosen by auto.")
@click.option("--opset", type=click.IntRange(min=17), default=17, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Threads for the latency measurements that rank variants.")
@click.option("--force", is_flag=True, help="Replace an existing model directory.")
@_fail_cleanly
def export_command(ckpt, out_dir, quantize, data_dir, calibration_method, parity_samples, max_accuracy_drop, opset,
                   threads, force) -> None:
    """Export a checkpoint to an ONNX model directory, gated by parity with PyTorch."""
    from vledge.export import ExportOptions, export

    options = ExportOptions(
        quantize=tuple(part.strip() for part in quantize.split(",") if part.strip()), data=data_dir,
        calibration_method=calibration_method, parity_samples=parity_samples,
        max_accuracy_drop=max_accuracy_drop, opset=opset, threads=threads, force=force,
    )
    step = 0

    def progress(message: str) -> None:
        nonlocal step
        step += 1
        click.echo(f"[{step:2d}] {message}", err=True)

    result = export(ckpt, out_dir, options, progress=progress)
    click.echo(f"model directory: {result.model_dir}")
    for label, parity in result.parity.items():
        click.echo(f"  {label:<28} token agreement {parity.generation.token_agreement:6.1%}  "
                   f"accuracy {parity.accuracy['overall']:6.1%} ({parity.accuracy_delta:+.1f} pts)  "
                   f"decode step {parity.latency_ms.get('decode_step_ms', float('nan')):.3f} ms")
    for device, choice in result.selected.items():
        click.echo(f"  selected for {device}: " + ", ".join(f"{c}={p}" for c, p in choice.items()))
    for label, why in result.skipped.items():
        click.echo(f"  {label}: {why}")
    click.echo(f"details: {result.model_dir / 'parity.md'}")


# --------------------------------------------------------------------------- bench


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return values


@main.command("bench")
@click.option("--ckpt", type=click.Path(path_type=Path), required=True, help="The PyTorch original (ckpt.pt).")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="Its exported model directory.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Held-out data (test split); default: fresh built-in synthetic scenes.")
@click.option("--threads", default="1,2", show_default=True, help="Thread counts, each given to every engine.")
@click.option("--batch", "batches", default="1,8", show_default=True, help="Batch sizes for throughput.")
@click.option("--engines", default=None,
              help="Comma-separated: pytorch, pytorch-int8, ort-cpu-fp32, ort-cpu-int8, ort-cpu-q4, ort-cpu-auto, "
                   "ort-cuda-fp32, ort-cuda-fp16 (default: all available).")
@click.option("--providers", default=None, help="Shortcut: cpu or cpu,cuda to limit ONNX Runtime engines.")
@click.option("--repeats", type=click.IntRange(min=3), default=20, show_default=True)
@click.option("--parity-samples", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--no-cold-start", is_flag=True, help="Skip the fresh-process load and memory measurements.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench"), show_default=True)
@_fail_cleanly
def bench_command(ckpt, model_dir, data_dir, threads, batches, engines, providers, repeats, parity_samples,
                  no_cold_start, out_dir) -> None:
    """Latency and accuracy of PyTorch vs the exported variants, side by side."""
    from vledge.benchmark.engines import EngineSpec
    from vledge.benchmark.report import write_outputs
    from vledge.benchmark.run import BenchConfig, default_engines, run_benchmark

    names = tuple(e.strip() for e in engines.split(",") if e.strip()) if engines else None
    if providers and names is None:
        allowed = {p.strip() for p in providers.split(",")}
        names = tuple(s.name for s in default_engines(model_dir) if s.kind == "pytorch" or s.provider in allowed)
    for name in names or ():
        EngineSpec.parse(name)
    config = BenchConfig(ckpt=ckpt, model_dir=model_dir, data=data_dir, engines=names, threads=_int_list(threads),
                         batches=_int_list(batches), repeats=repeats, parity_samples=parity_samples,
                         cold_start=not no_cold_start)
    result = run_benchmark(config, progress=lambda message: click.echo(f"· {message}", err=True))
    written = write_outputs(result, out_dir)
    click.echo((out_dir / "bench.md").read_text())
    click.echo("wrote " + ", ".join(str(p) for p in written.values()))


# --------------------------------------------------------------------------- webcam


@main.command("webcam")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="An exported model directory (ONNX Runtime, no torch needed).")
@click.option("--source", default="0", show_default=True,
              help="Camera index, video file, stream URL (rtsp://, http://), image folder, or 'synthetic'.")
@click.option("--question", default=None, help="Ask this about every frame instead of the caption prompt.")
@click.option("--every-ms", type=click.FloatRange(min=0), default=500, show_default=True,
              help="At most one caption per this many milliseconds of the stream.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Write the annotated video here (.mp4, .avi, .mkv, .mov).")
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None,
              help="Write one JSON line per caption (timestamp, frame, caption, latency, stage timings, reused).")
@click.option("--headless", is_flag=True, help="No window (also chosen automatically when there is no GUI).")
@click.option("--pace", type=click.Choice(["auto", "realtime", "lockstep"]), default="auto", show_default=True,
              help="realtime drops stale frames; lockstep writes every frame and waits for each caption "
                   "(auto: lockstep for files, folders and synthetic without a window).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8", "q4"]), default="auto",
              show_default=True, help="Graph variants to run.")
@click.option("--provider", default="auto", show_default=True,
              help="auto | cpu | cuda | tensorrt, or a comma-separated list in priority order.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads.")
@click.option("--max-frames", type=click.IntRange(min=1), default=None, help="Stop after this many frames.")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many seconds (wall clock).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Caption length limit.")
@click.option("--scene-threshold", type=click.FloatRange(min=0), default=None,
              help="Re-caption only when the mean thumbnail difference (0-255) from the last captioned frame "
                   "exceeds this [default: 8; 0 re-captions every due frame].")
@click.option("--embedding-threshold", type=click.FloatRange(min=0, max=2), default=None,
              help="Also require this cosine distance between image embeddings before re-captioning.")
@_fail_cleanly
def webcam_command(model_dir, source, question, every_ms, output, log_path, headless, pace, precision, provider,
                   threads, max_frames, seconds, max_new_tokens, scene_threshold, embedding_threshold) -> None:
    """Caption a camera, video, stream or synthetic scenes live, with an overlay; q, Esc or Ctrl-C stop."""
    from vledge.runtime import load
    from vledge.webcam import DEFAULT_SCENE_THRESHOLD, DemoOptions, run_demo

    options = DemoOptions(question=question, every_ms=every_ms, output=output, log=log_path, headless=headless,
                          pace=pace, max_frames=max_frames, seconds=seconds, max_new_tokens=max_new_tokens,
                          scene_threshold=DEFAULT_SCENE_THRESHOLD if scene_threshold is None else scene_threshold,
                          embedding_threshold=embedding_threshold)
    providers = tuple(p.strip() for p in provider.split(",") if p.strip()) if "," in provider else provider
    runtime = load(model_dir, precision=precision, providers=providers, threads=threads)

    def show(event) -> None:
        if not event.reused:
            click.echo(f"[{event.stream_time:7.2f} s] frame {event.frame_index}: {event.caption or '(empty)'} "
                       f"({event.latency_ms:.0f} ms)")

    summary = run_demo(runtime, source, options, on_caption=show)
    click.echo(summary.describe())
    if not summary.ok:
        raise click.ClickException(summary.message)


# --------------------------------------------------------------------------- quickstart


@main.command("quickstart")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("quickstart"), show_default=True)
@click.option("--preset", default="small", show_default=True, help="tiny | small | base | seed-lstm | tiny-lstm")
@click.option("--size", type=click.IntRange(min=50), default=20000, show_default=True, help="Synthetic images.")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=12.0, show_default=True,
              help="Training wall-time budget.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Cap training steps instead.")
@click.option("--vision-pretrain-steps", type=click.IntRange(min=0), default=300, show_default=True,
              help="Per-cell pretraining of the vision encoder on the scenes' labels (0: skip).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Default: all cores.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Reuse a non-empty output folder.")
@_fail_cleanly
def quickstart_command(out_dir, preset, size, minutes, max_steps, vision_pretrain_steps, threads, seed, force) -> None:
    """Data -> training -> evaluation -> export -> benchmark -> captions -> demo video, in one go."""
    import time

    from tqdm import tqdm

    from vledge.quickstart import QuickstartConfig, run_quickstart

    config = QuickstartConfig(out=out_dir, preset=preset, size=size, minutes=minutes, max_steps=max_steps,
                              vision_pretrain_steps=vision_pretrain_steps, threads=threads, seed=seed, force=force)
    bar = None

    def on_train_event(event) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=event.total_steps, desc="    train", unit="step", dynamic_ncols=True)
        bar.total, bar.n = event.total_steps, event.step
        if event.kind == "eval":
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


# --------------------------------------------------------------------------- batch


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
@click.option("--threads-per-worker", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime threads of each worker (Ray: CPUs per actor) [default: cores / workers].")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
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
@_fail_cleanly
def batch(model_dir, input_spec, output, output_format, prompt, prompt_column, image_column, engine, ray_address,
          workers, threads_per_worker, gpus_per_worker, batch_size, part_size, precision, provider, max_new_tokens,
          resume) -> None:
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
                           precision=precision, providers=(tuple(p.strip() for p in provider.split(',') if p.strip()) if ',' in provider else provider), max_new_tokens=max_new_tokens,
                           resume=resume)
    bar = tqdm(desc="batch", unit="img", file=sys.stderr, dynamic_ncols=True, disable=None)
    try:
        summary = run_batch(options, on_progress=bar.update, on_start=bar.reset)
    finally:
        bar.close()
    click.echo(summary.describe())


if __name__ == "__main__":
    main()
