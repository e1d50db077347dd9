"""The documentation stays true to the code: docs/cli.md is the click commands' own reference, every
relative link in README.md and docs/ leads somewhere, and the README stays a short front door."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner
import pytest

from vledge.cli import reference

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]


def test_docs_cli_md_is_current():
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    if reference.render() != committed:
        pytest.fail(f"docs/cli.md differs from the click commands: run `{reference.REGENERATE}` "
                    "in the repository root and commit the result")


def test_every_command_and_option_of_the_cli_is_in_docs_cli_md():
    from vledge.cli import main

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    root = click.Context(main, info_name="vledge")
    for ctx in reference._walk(main, root):
        assert f"## `{ctx.command_path}`" in text
        for param in ctx.command.params:
            if isinstance(param, click.Option):
                assert f"`{param.opts[-1]}`" in text, (ctx.command_path, param.opts)


@click.group()
def _tool():
    """A test tool.

    Second paragraph, with a | pipe and *stars*.
    \f
    Never shown: click ends help at a form feed.
    """


@_tool.command("run")
@click.argument("images", nargs=-1, required=True)
@click.argument("extra", required=False)
@click.option("--mode", type=click.Choice(["fast", "exact"]), default="exact", help="How to run.")
@click.option("--count", type=click.IntRange(min=1), default=3)
@click.option("--ratio", type=click.FloatRange(min=0, max=1, min_open=True), default=None, help="A share.")
@click.option("--colour/--no-colour", default=True, help="Colour output.")
@click.option("--tag", multiple=True, help="Repeatable.")
@click.option("--key", envvar="TOOL_KEY", help="Secret.")
@click.option("--shown", default=None, show_default="from the config", help="Shown default.")
@click.option("--hidden-one", hidden=True, help="Not documented.")
@click.option("-o", "--out", type=click.Path(file_okay=False), required=True, help="Folder.")
@click.option("--size", type=click.Tuple([int, float]), default=None, help="Width and scale.")
@click.option("--point", type=int, nargs=2, default=(0, 1), help="Two numbers.")
@click.option("--when", default=lambda: "now", help="Worked out at run time.")
@click.option("--log", type=click.File("w"), default="-", help="A stream.")
def _run(**kwargs):
    """Run it."""


@_tool.group("sub")
def _sub():
    """Nested group."""


@_sub.command("zeta")
def _zeta():
    """Last by name."""


@_sub.command("alpha")
def _alpha():
    """First by name."""


@_tool.command("secret", hidden=True)
def _secret():
    """Hidden command."""


def test_reference_renders_usage_help_and_an_options_table_from_click():
    text = reference.render(_tool, prog="tool")
    assert "```\ntool run [OPTIONS] IMAGES... [EXTRA]\n```" in text
    assert "```\ntool sub COMMAND [ARGS]...\n```" in text
    assert "A test tool.\n\nSecond paragraph, with a \\| pipe and \\*stars\\*.\n" in text
    assert "Never shown" not in text
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| `")}
    assert rows["`IMAGES...`"] == "| `IMAGES...` | text | required | argument |"
    assert rows["`[EXTRA]`"] == "| `[EXTRA]` | text |  | argument (optional) |"
    assert rows["`--mode`"] == "| `--mode` | one of `fast`, `exact` | `exact` | How to run. |"
    assert rows["`--count`"] == "| `--count` | integer, `x>=1` | `3` |  |"
    assert rows["`--ratio`"] == "| `--ratio` | float, `0<x<=1` |  | A share. |"
    assert rows["`--colour` / `--no-colour`"] == "| `--colour` / `--no-colour` | flag | `--colour` | Colour output. |"
    assert rows["`--tag`"] == "| `--tag` | text, repeatable |  | Repeatable. |"
    assert rows["`--key`"] == "| `--key` | text | env `TOOL_KEY` | Secret. |"
    assert rows["`--shown`"] == "| `--shown` | text | from the config | Shown default. |"
    assert rows["`-o`, `--out`"] == "| `-o`, `--out` | directory | required | Folder. |"
    assert rows["`--size`"] == "| `--size` | tuple of integer, float |  | Width and scale. |"
    assert rows["`--point`"] == "| `--point` | 2 × integer | `0`, `1` | Two numbers. |"
    assert rows["`--when`"] == "| `--when` | text | (dynamic) | Worked out at run time. |"
    assert rows["`--log`"] == "| `--log` | filename | `-` | A stream. |"
    assert "--hidden-one" not in text and "secret" not in text
    headings = [line for line in text.splitlines() if line.startswith("## `")]
    assert headings == ["## `tool`", "## `tool run`", "## `tool sub`", "## `tool sub alpha`", "## `tool sub zeta`"]
    assert "- [`tool sub alpha`](#tool-sub-alpha): First by name." in text


def test_reference_ignores_the_terminal_width_and_imports_no_heavy_module():
    code = ("import sys\n"
            "for name in ('torch', 'torchvision', 'onnxruntime', 'cv2', 'onnx'):\n"
            "    sys.modules[name] = None\n"
            "from vledge.cli import reference\n"
            "sys.stdout.write(reference.render())\n")
    outputs = []
    for columns in ("20", "300"):
        env = {**os.environ, "COLUMNS": columns}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1] == reference.render()


def test_reference_check_and_write(tmp_path):
    target = tmp_path / "cli.md"
    target.write_text("# stale\n", encoding="utf-8")
    assert reference.main(["--check", str(target)]) == 1
    assert reference.main(["--write", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == reference.render()
    assert reference.main(["--check", str(target)]) == 0


def test_no_help_text_shows_an_unbounded_range_as_none():
    from vledge.cli import main

    for command in ("train", "pretrain-vision"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "None]" not in result.output, result.output


_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _links(page: Path) -> list[str]:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)
    return _LINK.findall(text)


def _anchors(page: Path) -> set[str]:
    """Heading ids as GitHub makes them (lower case, punctuation but - and _ dropped, spaces as -)."""
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.MULTILINE):
        slug = "".join(ch for ch in heading.lower() if ch.isalnum() or ch in " -_").replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    dead = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        file = (page.parent / path_part).resolve() if path_part else page
        if not file.exists():
            dead.append(f"{target} (no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file})")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            dead.append(f"{target} (no heading #{anchor} in {file.relative_to(ROOT)})")
    assert not dead, f"{page.relative_to(ROOT)}: dead links: {dead}"


def test_the_link_checker_finds_a_dead_link_and_a_dead_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Second `part`\n\n[a](other.md) [b](#second-part) [c](#nowhere)\n"
                    "```\n[not a link](missing.md)\n```\n", encoding="utf-8")
    assert _links(page) == ["other.md", "#second-part", "#nowhere"]
    assert _anchors(page) == {"title", "second-part"}


def test_readme_is_a_short_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move reference text to docs/"
