"""``vledge caption`` and ``vledge ask``: answer images with an exported model or a checkpoint."""

from __future__ import annotations

import logging
import sys

import click

from vledge.cli.base import fail_cleanly, inference_options, main, parse_providers

log = logging.getLogger("vledge")


def _answer_images(ctx: click.Context, images, question: str | None, model_dir, ckpt, precision, provider, strict,
                   threads, batch_size, max_new_tokens, temperature, top_k, top_p, num_beams, repetition_penalty,
                   seed, stop_strings, jsonl, together: bool = False) -> None:
    """Answer each image (``together``: one answer about all of them, one prompt holding every image)."""
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
    files, problems = ([str(image) for image in images], []) if together else captioning.expand_inputs(images)
    if together and ckpt is not None:
        raise click.UsageError("several --image in one prompt need --model (an exported model directory)")
    if model_dir is not None:
        providers = parse_providers(provider)
        engine = captioning.RuntimeEngine(model_dir, precision=precision, providers=providers, threads=threads,
                                          strict=strict)
    else:
        engine = captioning.CheckpointEngine(ckpt, threads=threads)
    if engine.max_positions is not None and max_new_tokens > engine.max_positions:
        from vledge.errors import ConfigError

        raise ConfigError(f"--max-new-tokens {max_new_tokens} is more than the model can ever write: it has "
                          f"{engine.max_positions} positions in all, the image and prompt included")
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

    if together:
        record = captioning.ask_images(engine, files, prompt, options, stops)
        click.echo(json.dumps(record.to_dict(), ensure_ascii=False) if jsonl else f"{record.image}: {record.text}")
        return
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
@inference_options
@click.pass_context
@fail_cleanly
def caption(ctx, images, question, **kwargs) -> None:
    """Caption images: files, folders (their image files) or glob patterns.

    With --model the exported model runs on ONNX Runtime (no torch); with --ckpt the PyTorch
    checkpoint does. A bad image prints an error line and the others go on; the exit status is 1
    if any image failed.
    """
    _answer_images(ctx, images, question, **kwargs)


@main.command()
@click.argument("arguments", nargs=-1, required=True, metavar="[IMAGE] QUESTION")
@click.option("--image", "more_images", multiple=True,
              help="An image of the question (repeatable): every IMAGE and --image go into one prompt, in order, "
                   "for models that take several images (tiled models such as SmolVLM).")
@inference_options
@click.pass_context
@fail_cleanly
def ask(ctx, arguments, more_images, **kwargs) -> None:
    """Answer QUESTION about IMAGE (a file, or a folder or glob to ask about each image).

    With --image (repeatable) the question is about all the images at once: IMAGE may then be left out.
    """
    if len(arguments) > 2 or (len(arguments) == 1 and not more_images):
        raise click.UsageError("give IMAGE QUESTION, or QUESTION with one or more --image")
    question = arguments[-1]
    images = (*arguments[:-1], *more_images)
    if not question.strip():
        raise click.UsageError("QUESTION is empty")
    _answer_images(ctx, images, question, together=len(images) > 1, **kwargs)

