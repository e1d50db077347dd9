"""docs/cli.md, generated from the click commands themselves so the reference cannot drift from them.

``render()`` walks ``vledge.cli.main`` (groups recursively, commands sorted by name) and writes each
command's usage line, help text and a table of its arguments and options (type, default, help). The
text comes from click's objects, never from click's help formatter, so the output does not depend on
the terminal width or on how a click release wraps and decorates ``--help``. Importing this module
imports only the CLI's command modules, which import nothing heavy (torch, onnxruntime and cv2 are
imported inside the commands).

    python -m vledge.cli.reference > docs/cli.md        # or: --write [PATH], --check [PATH]
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import click

DEFAULT_PATH = Path("docs/cli.md")
REGENERATE = "python -m vledge.cli.reference --write"

_PREAMBLE = f"""\
# Command-line reference

<!-- Generated from the click commands by `{REGENERATE}`; do not edit by hand. -->

Every command takes `-h` / `--help`. `vledge -v COMMAND` logs at info level, `-vv` at debug
level. Options are checked before any work starts.

- An error a user can cause (bad data, a bad checkpoint or model directory, an unreadable image, an
  unknown preset, a value out of range, an output folder that cannot be written) prints one line,
  `Error: <ErrorType>: <message>`, and exits with status 1; nothing is left half-written. A refusal
  of the file system (a full disk, a read-only mount) is named the same way (`Error: OSError: ...`).
- A malformed command line (an unknown option, a missing argument, a value of the wrong type)
  prints `Error: UsageError: <message> (see 'vledge COMMAND --help')` and exits with status 2.
- Every file a command writes goes to a temporary name beside its target and is renamed into place
  when complete, with the modes a new file or folder gets under your umask (0644 and 0755 under
  umask 022).

In the tables, *default* is the value used when the option is not given (empty: none, or worked out
at run time as the help says).
"""


def render(group: click.Group | None = None, prog: str = "vledge") -> str:
    """The Markdown reference of ``group`` (default: vledge's ``main``) and every command below it."""
    if group is None:
        from vledge.cli import main as group
    root = click.Context(group, info_name=prog)
    entries = list(_walk(group, root))
    lines = [_PREAMBLE, "## Commands", ""]
    for ctx in entries[1:]:
        lines.append(f"- [`{ctx.command_path}`](#{_anchor(ctx.command_path)}): {_summary(ctx.command)}")
    lines.append("")
    for ctx in entries:
        lines.extend(_command_section(ctx))
    return "\n".join(lines).rstrip("\n") + "\n"


def _walk(command: click.Command, ctx: click.Context):
    """``ctx`` and the contexts of every visible command below it, depth first, sorted by name."""
    yield ctx
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            sub = command.commands[name]
            if getattr(sub, "hidden", False):
                continue
            yield from _walk(sub, click.Context(sub, info_name=name, parent=ctx))


def _anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation but ``-`` dropped, spaces as ``-``."""
    kept = "".join(ch for ch in heading.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def _paragraphs(command: click.Command) -> list[str]:
    """The command's help as paragraphs; click's ``\\f`` ends it and ``\\b`` keeps a paragraph's lines."""
    text = inspect.cleandoc(command.help or "").split("\f", 1)[0]
    paragraphs = []
    for block in text.split("\n\n"):
        block = block.strip("\n")
        if not block.strip():
            continue
        if block.startswith("\b"):
            rows = [row.rstrip() for row in block[1:].strip("\n").splitlines()]
            paragraphs.append("  \n".join(_escape(row) for row in rows))
        else:
            paragraphs.append(_escape(" ".join(part.strip() for part in block.splitlines())))
    return paragraphs


def _summary(command: click.Command) -> str:
    if command.short_help:
        return _escape(command.short_help)
    paragraphs = _paragraphs(command)
    return paragraphs[0] if paragraphs else ""


def _command_section(ctx: click.Context) -> list[str]:
    command = ctx.command
    title = f"## `{ctx.command_path}`"
    if getattr(command, "deprecated", False):
        title += " (deprecated)"
    lines = [title, "", "```", _usage(ctx), "```", ""]
    for paragraph in _paragraphs(command):
        lines.extend([paragraph, ""])
    if isinstance(command, click.Group):
        names = [name for name in sorted(command.commands) if not getattr(command.commands[name], "hidden", False)]
        lines.append("Commands: " + ", ".join(f"[`{name}`](#{_anchor(f'{ctx.command_path} {name}')})"
                                              for name in names) + ".")
        lines.append("")
    rows = [_row(param, ctx) for param in command.params if not getattr(param, "hidden", False)]
    if rows:
        lines.extend(["| name | type | default | meaning |", "| --- | --- | --- | --- |", *rows, ""])
    return lines


def _usage(ctx: click.Context) -> str:
    pieces = [ctx.command_path]
    params = [p for p in ctx.command.params if not getattr(p, "hidden", False)]
    if any(isinstance(p, click.Option) for p in params):
        pieces.append("[OPTIONS]")
    for param in params:
        if isinstance(param, click.Argument):
            pieces.append(_argument_name(param))
    if isinstance(ctx.command, click.Group):
        pieces.append("COMMAND [ARGS]...")
    return " ".join(pieces)


def _argument_name(param: click.Argument) -> str:
    name = param.metavar or (param.name or "").upper()
    if param.nargs == -1:
        name += "..."
    elif param.nargs > 1:
        name = " ".join([name] * param.nargs)
    return name if param.required else f"[{name}]"


def _row(param: click.Parameter, ctx: click.Context) -> str:
    if isinstance(param, click.Argument):
        names = f"`{_argument_name(param)}`"
        return f"| {names} | {_type(param)} | required | argument |" if param.required else \
            f"| {names} | {_type(param)} |  | argument (optional) |"
    names = ", ".join(f"`{opt}`" for opt in param.opts)
    if param.secondary_opts:
        names += " / " + ", ".join(f"`{opt}`" for opt in param.secondary_opts)
    meaning = _escape(" ".join((param.help or "").split()))
    return f"| {names} | {_type(param)} | {_default(param, ctx)} | {meaning} |"


def _type(param: click.Parameter) -> str:
    kind = param.type
    if getattr(param, "count", False):
        text = "count"
    elif getattr(param, "is_flag", False):
        text = "flag"
    elif isinstance(kind, click.Choice):
        text = "one of " + ", ".join(f"`{choice}`" for choice in kind.choices)
    elif isinstance(kind, click.Tuple):
        text = "tuple of " + ", ".join(_escape(_base_type_name(item)) for item in kind.types)
    else:
        text = _escape(_base_type_name(kind))
        bounds = _range(kind)
        if bounds:
            text += f", `{bounds}`"
        if isinstance(param, click.Option) and param.nargs > 1:
            text = f"{param.nargs} × {text}"
    if getattr(param, "multiple", False) and not getattr(param, "count", False):
        text += ", repeatable"
    return text


def _base_type_name(kind: click.ParamType) -> str:
    """``integer`` for ``IntRange`` (``integer range`` in click), ``float`` for ``FloatRange``."""
    if type(kind) is click.IntRange:
        return "integer"
    if type(kind) is click.FloatRange:
        return "float"
    return kind.name


def _range(kind: click.ParamType) -> str:
    """``x>=1``, ``0<x<=1``: the bounds of a numeric range type, as click writes them."""
    low, high = getattr(kind, "min", None), getattr(kind, "max", None)
    if low is None and high is None:
        return ""
    low_op = "<" if getattr(kind, "min_open", False) else "<="
    high_op = "<" if getattr(kind, "max_open", False) else "<="
    if low is None:
        return f"x{high_op}{high}"
    if high is None:
        return f"x{'>' if low_op == '<' else '>='}{low}"
    return f"{low}{low_op}x{high_op}{high}"


def _default(param: click.Option, ctx: click.Context) -> str:
    parts = []
    if param.required:
        parts.append("required")
    else:
        shown = _default_text(param, ctx)
        if shown:
            parts.append(shown)
    envvar = param.envvar
    if envvar:
        names = [envvar] if isinstance(envvar, str) else list(envvar)
        parts.append("env " + ", ".join(f"`{name}`" for name in names))
    return "; ".join(parts)


def _default_text(param: click.Option, ctx: click.Context) -> str:
    if isinstance(param.show_default, str):
        return _escape(param.show_default)
    value = param.get_default(ctx, call=False)
    if value is None or value is getattr(click.core, "UNSET", object()):
        return ""
    if callable(value):
        return "(dynamic)"
    if getattr(param, "is_flag", False) and getattr(param, "is_bool_flag", False):
        if param.secondary_opts:
            return f"`{param.opts[-1] if value else param.secondary_opts[-1]}`"
        return "on" if value else ""
    if getattr(param, "count", False):
        return "" if not value else f"`{value}`"
    if isinstance(value, (list, tuple)):
        if not value:
            return ""
        return ", ".join(f"`{item}`" for item in value)
    return f"`{value}`"


def _escape(text: str) -> str:
    """Text safe in a Markdown table cell: pipes, emphasis markers and tag openers escaped."""
    for char in ("|", "*", "<"):
        text = text.replace(char, "\\" + char)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vledge.cli.reference", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", nargs="?", const=DEFAULT_PATH, type=Path, metavar="PATH",
                        help=f"write the reference to PATH (default {DEFAULT_PATH}) instead of stdout")
    action.add_argument("--check", nargs="?", const=DEFAULT_PATH, type=Path, metavar="PATH",
                        help=f"exit 1 if PATH (default {DEFAULT_PATH}) differs from the commands")
    args = parser.parse_args(argv)
    text = render()
    if args.check is not None:
        current = args.check.read_text(encoding="utf-8") if args.check.is_file() else None
        if current != text:
            sys.stderr.write(f"{args.check} is not current: run {REGENERATE}\n")
            return 1
        return 0
    if args.write is not None:
        from vledge.files import write_text

        write_text(args.write, text)
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
