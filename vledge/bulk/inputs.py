"""The inputs of a run, in a fixed order: a folder, a glob, a text file of paths, or a Parquet/CSV table.

Every input gets an ``index`` (its position in this listing); output rows carry it, and resuming a
run skips the indices already written. The listing must therefore come out the same on a rerun:
folders and globs are sorted, files and tables keep their own order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from vledge.captioning import expand_inputs
from vledge.errors import ConfigError
from vledge.reads import MAX_TEXT_BYTES, check_regular, read_text

TABLE_SUFFIXES = frozenset({".parquet", ".pq", ".csv"})
LIST_SUFFIXES = frozenset({".txt", ".lst"})
# Tried in this order when --image-column is not given.
IMAGE_COLUMNS = ("path", "image", "image_path", "file", "filename")
MAX_TABLE_BYTES = 4 << 30  # a Parquet table (its images may be inside it); CSV tables and lists: MAX_TEXT_BYTES


@dataclass(frozen=True)
class InputItem:
    """One image to caption: where it came from, its bytes when a table holds them, its own prompt if any."""

    index: int
    path: str
    prompt: str | None = None
    data: bytes | None = None

    @property
    def source(self) -> str | bytes:
        return self.data if self.data is not None else self.path


def list_inputs(spec: str, image_column: str | None = None, prompt_column: str | None = None,
                follow_links: bool = False) -> list[InputItem]:
    """The inputs ``spec`` names, indexed in order; ConfigError if it names none.

    A folder's files that are links resolving outside the folder are refused (ConfigError naming the first)
    unless ``follow_links``: a folder handed over for captioning does not reach into the rest of the disk.
    """
    path = Path(spec)
    is_file = path.is_file()
    if is_file and path.suffix.lower() in TABLE_SUFFIXES:
        items = _table_items(path, image_column, prompt_column)
    else:
        for name, value in (("--image-column", image_column), ("--prompt-column", prompt_column)):
            if value is not None:
                raise ConfigError(f"{name} applies to a Parquet or CSV table, not {spec}")
        if is_file and path.suffix.lower() in LIST_SUFFIXES:
            items = _list_file_items(path)
        else:
            files, problems = expand_inputs([spec])
            if problems:
                raise ConfigError(problems[0].error)
            if not path.exists() and files == [spec]:
                raise ConfigError(f"--input {spec} is not a file, a folder or a pattern that matches files")
            if path.is_dir() and not follow_links:
                _refuse_links_out(path, files)
            items = [InputItem(index, file) for index, file in enumerate(files)]
    if not items:
        raise ConfigError(f"--input {spec} lists no images")
    return items


def listing_sha256(items: list[InputItem]) -> str:
    """A fingerprint of the listing (paths, prompts, byte counts) so a resume can tell it changed."""
    digest = hashlib.sha256()
    for item in items:
        size = "" if item.data is None else str(len(item.data))
        digest.update(f"{item.index}\t{item.path}\t{item.prompt or ''}\t{size}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _refuse_links_out(folder: Path, files: list[str]) -> None:
    inside = folder.resolve()
    for file in files:
        real = Path(file).resolve()
        if inside not in real.parents:
            raise ConfigError(f"--input folder {folder} holds {file}, a link to {real} outside it; "
                              "pass --follow-links to read such files")


def _relative_to(base: Path, entry: str) -> str:
    return entry if os.path.isabs(entry) else os.path.join(base, entry)


def _list_file_items(path: Path) -> list[InputItem]:
    base = path.parent
    entries = []
    for line in read_text(path, MAX_TEXT_BYTES, ConfigError, "input list").splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            entries.append(_relative_to(base, entry))
    return [InputItem(index, entry) for index, entry in enumerate(entries)]


def _table_items(path: Path, image_column: str | None, prompt_column: str | None) -> list[InputItem]:
    columns = _read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else _read_csv(path)
    if image_column is None:
        image_column = next((name for name in IMAGE_COLUMNS if name in columns), None)
        if image_column is None:
            raise ConfigError(f"{path} has no image column (looked for {', '.join(IMAGE_COLUMNS)}; "
                              f"it has {', '.join(columns) or 'none'}): name one with --image-column")
    for name in (image_column, prompt_column):
        if name is not None and name not in columns:
            raise ConfigError(f"{path} has no column {name!r} (it has {', '.join(columns)})")
    prompts = columns[prompt_column] if prompt_column else [None] * len(columns[image_column])
    for row, prompt in enumerate(prompts):
        if prompt is not None and not isinstance(prompt, str):
            raise ConfigError(f"{path}: the prompt column {prompt_column!r} holds {type(prompt).__name__} values "
                              f"(row {row}: {prompt!r}); prompts must be text")
    base = path.parent
    items = []
    for row, (value, prompt) in enumerate(zip(columns[image_column], prompts)):
        prompt = prompt if isinstance(prompt, str) and prompt.strip() else None
        if isinstance(value, (bytes, bytearray, memoryview)):
            items.append(InputItem(row, f"{path}#{row}", prompt, bytes(value)))
        elif isinstance(value, str) and value.strip():
            items.append(InputItem(row, _relative_to(base, value.strip()), prompt))
        else:  # an empty cell is still an input: its row says what was wrong
            items.append(InputItem(row, f"{path}#{row}", prompt, b""))
    return items


def _read_parquet(path: Path) -> dict[str, list]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("reading a Parquet table needs pyarrow: pip install 'vledge[batch]'") from None
    check_regular(path, MAX_TABLE_BYTES, ConfigError, "Parquet table")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid/OSError kinds
        raise ConfigError(f"cannot read Parquet table {path}: {exc}") from None
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _read_csv(path: Path) -> dict[str, list]:
    try:
        reader = csv.DictReader(io.StringIO(read_text(path, MAX_TEXT_BYTES, ConfigError, "CSV table"), newline=""))
        rows = list(reader)
        names = list(reader.fieldnames or [])
    except csv.Error as exc:
        raise ConfigError(f"cannot read CSV table {path}: {exc}") from None
    return {name: [row.get(name) for row in rows] for name in names}
