"""``vledge convert``: a Hugging Face vision-language folder (LLaVA, Idefics3 / SmolVLM) to a vledge checkpoint
(for ``vledge train --init``)."""

from __future__ import annotations

from pathlib import Path

import click

from vledge.cli.base import fail_cleanly, main

BACKEND_HELP = ("Which transformers image-processor backend the preprocessing reproduces exactly: pil (Pillow "
                "resize, as transformers 4.x and the *Pil classes) or torchvision (transformers 5's default classes; "
                "LLaVA folders only, Idefics3 / SmolVLM folders reproduce pil).")


@main.command("convert")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_path", type=click.Path(path_type=Path), required=True, help="ckpt.pt to write.")
@click.option("--context", type=click.IntRange(min=16), default=4096, show_default=True,
              help="Longest sequence (prompt + image tokens + answer) the model will be given.")
@click.option("--image-processor-backend", "backend", type=click.Choice(["pil", "torchvision"]), default="pil",
              show_default=True, help=BACKEND_HELP)
@click.option("--force", is_flag=True, help="Replace an existing checkpoint file.")
@fail_cleanly
def convert_command(hf_dir, out_path, context, backend, force) -> None:
    """Convert a LLaVA, Idefics3 or SmolVLM folder to a vledge ckpt.pt."""
    from vledge.errors import OutputError
    from vledge.hf.fusion_folders import convert_folder

    if out_path.exists() and not force:
        raise OutputError(f"{out_path} already exists; pass --force to replace it")
    written = convert_folder(hf_dir, out_path, context=context, backend=backend)
    click.echo(f"checkpoint: {written}")
