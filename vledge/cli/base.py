"""What every command shares: the ``main`` group, the typed-error wrapper and shared options.

Command modules import ``main`` from here and register on it; this module imports nothing heavy.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from pathlib import Path

import click

from vledge import __version__
from vledge.bounds import MAX_BEAMS, MAX_SEED, MAX_THREADS
from vledge.errors import VledgeError

THREADS = click.IntRange(1, MAX_THREADS)  # every --threads option: at most MAX_THREADS


def fail_cleanly(command):
    """Turn vledge's typed errors into one clear line and exit status 1.

    An OSError that reaches here is the file system refusing (a full disk, a read-only mount, a
    name too long); it is named the same way instead of ending in a traceback.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except VledgeError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


class _OneLineUsageError(click.UsageError):
    """A bad option or argument as ``Error: UsageError: <message>`` on one line (exit status 2)."""

    def show(self, file=None) -> None:
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"Error: UsageError: {self.format_message()}{hint}", err=True)


class VledgeGroup(click.Group):
    """click's group whose usage errors read like every other vledge error: one typed line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            if isinstance(exc, _OneLineUsageError):
                raise
            raise _OneLineUsageError(exc.format_message(), exc.ctx) from None

    def group(self, *args, **kwargs):
        kwargs.setdefault("cls", VledgeGroup)
        return super().group(*args, **kwargs)


@click.group(cls=VledgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
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


class FiniteFloat(click.FloatRange):
    """click's FloatRange that also refuses nan and ±inf (every comparison with nan is false, so a
    plain range lets it through)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number

    def _describe_range(self) -> str:
        """No bounds: nothing to show (click's own text would read ``x<=None`` in ``--help``)."""
        if self.min is None and self.max is None:
            return ""
        return super()._describe_range()


def parse_providers(text: str) -> str | tuple[str, ...]:
    """``--provider``: one name (``auto``, ``cpu``, ...) or a comma-separated list in priority order."""
    return tuple(p.strip() for p in text.split(",") if p.strip()) if "," in text else text


def inference_options(command):
    """Options of the commands that answer images (``caption``, ``ask``): the engine, decoding, output."""
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
        click.option("--threads", type=THREADS, default=None, help=f"Intra-op threads (at most {MAX_THREADS})."),
        click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Images answered together (left-padded batch)."),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True),
        click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True,
                     help="0 is greedy; above 0 samples."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, help="Sample from the k likeliest (0: off)."),
        click.option("--top-p", type=FiniteFloat(min=0, max=1, min_open=True), default=1.0,
                     help="Nucleus sampling (1: off)."),
        click.option("--num-beams", type=click.IntRange(1, MAX_BEAMS), default=1,
                     help=f"Beam search when above 1 (at most {MAX_BEAMS})."),
        click.option("--repetition-penalty", type=FiniteFloat(min=0, min_open=True), default=1.0,
                     help="Above 1 discourages repeated tokens."),
        click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None, help="Seed for sampling (0 or more)."),
        click.option("--stop", "stop_strings", multiple=True,
                     help="Stop at this text, cut before it (repeatable; \\n means a newline)."),
        click.option("--jsonl", is_flag=True, help="One JSON object per image on stdout."),
    ]
    for option in reversed(options):
        command = option(command)
    return command

