"""The output folder: parts committed atomically, and the run manifest that makes ``--resume`` safe.

``OUT/part-<first index>.parquet`` (or ``.jsonl``) each hold the rows of some inputs; a part is
written under a dot-prefixed temporary name and renamed into place only when complete, so a killed
run leaves only whole parts. The inputs already done are the ``index`` values of the committed parts:
nothing else has to be kept in step with them. ``OUT/_vledge_batch.json`` records what the run was
asked (model, listing, prompt, ...); a resume that would mix in different rows is refused. Readers
such as pyarrow, pandas and Ray skip names starting with ``_`` or ``.``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vledge.bulk.schema import COLUMNS, SCHEMA_VERSION, rows_to_arrow
from vledge.errors import ConfigError
from vledge.files import atomic_path, write_json
from vledge.reads import MAX_TEXT_BYTES, parse_json, read_json, read_text

log = logging.getLogger(__name__)

RUN_MANIFEST = "_vledge_batch.json"
MAX_PART_BYTES = 1 << 30  # one committed JSON Lines part, read back on --resume
MANIFEST_FORMAT = "vledge-batch"
# A resume must agree with the interrupted run on these, or its rows would not belong together.
RESUME_KEYS = ("schema_version", "model_sha256", "inputs", "inputs_sha256", "prompt", "prompt_column",
               "image_column", "precision", "max_new_tokens", "output_format")


class OutputFolder:
    """Where a run's parts go; ``open`` returns the inputs already done."""

    def __init__(self, root: Path, output_format: str) -> None:
        self.root = Path(root)
        self.output_format = output_format
        self.suffix = ".parquet" if output_format == "parquet" else ".jsonl"

    @property
    def manifest_path(self) -> Path:
        return self.root / RUN_MANIFEST

    def open(self, run: dict[str, Any], resume: bool) -> set[int]:
        """Start the folder for ``run`` (or check it continues the recorded run); the indices done so far."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--output {self.root} is a file; batch output is a folder of parts")
        # A folder holding only the manifest of a run that wrote nothing has nothing to keep.
        existing = self.root.is_dir() and any(p.name != RUN_MANIFEST for p in self.root.iterdir())
        if existing and not resume:
            raise ConfigError(f"--output {self.root} already exists and is not empty: pass --resume to continue "
                              "that run, or choose another folder")
        if existing:
            self._check_same_run(run)
            self._remove_temporaries()
            done = self.done_indices(int(run["inputs"]))
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            done = set()
        self.write_manifest({"format": MANIFEST_FORMAT, **run, "schema_version": SCHEMA_VERSION, "complete": False})
        return done

    def parts(self) -> list[Path]:
        return sorted(p for p in self.root.glob(f"part-*{self.suffix}") if p.is_file())

    def done_indices(self, total: int | None = None) -> set[int]:
        """The inputs the committed parts hold; every index must be an integer below ``total`` (the listing's
        length) and every part must have the columns of one table, or the folder was edited and is refused."""
        done: set[int] = set()
        for part in self.parts():
            indices = self._read_indices(part)
            for index in indices:
                if isinstance(index, bool) or not isinstance(index, int) or not (
                        0 <= index < (total if total is not None else index + 1)):
                    raise ConfigError(f"cannot resume: {part} holds index {index!r}, not an input of this run "
                                      f"(0..{total - 1 if total is not None else 'n'}); the output folder was "
                                      "changed by hand")
            repeated = done.intersection(indices)
            if repeated:
                raise ConfigError(f"{part} repeats inputs already in other parts (index {min(repeated)}); "
                                  "the output folder was changed by hand")
            done.update(indices)
        return done

    def commit(self, rows: list[dict[str, Any]]) -> Path:
        """Write one part atomically (vledge.files: a temporary file, flushed to disk, renamed into place)."""
        first = min(row["index"] for row in rows)
        final = self.root / f"part-{first:010d}{self.suffix}"
        if final.exists():
            raise ConfigError(f"{final} exists already: input {first} would be written twice")
        with atomic_path(final) as temporary:
            if self.output_format == "parquet":
                import pyarrow.parquet as pq

                pq.write_table(rows_to_arrow(rows), temporary)
            else:
                with open(temporary, "w", encoding="utf-8") as handle:
                    for row in rows:
                        handle.write(json.dumps({name: row.get(name) for name in COLUMNS}, ensure_ascii=False))
                        handle.write("\n")
        return final

    def write_manifest(self, run: dict[str, Any]) -> None:
        write_json(self.manifest_path, run, ensure_ascii=False)

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            raise ConfigError(f"{self.root} is not a vledge batch output (no {RUN_MANIFEST}); "
                              "cannot resume into it")
        recorded = read_json(self.manifest_path, MAX_TEXT_BYTES, ConfigError, "batch manifest")
        if not isinstance(recorded, dict) or recorded.get("format") != MANIFEST_FORMAT:
            raise ConfigError(f"{self.manifest_path} is not a vledge batch manifest")
        return recorded

    def _check_same_run(self, run: dict[str, Any]) -> None:
        recorded = self.read_manifest()
        wanted = {**run, "schema_version": SCHEMA_VERSION}
        for key in RESUME_KEYS:
            if recorded.get(key) != wanted.get(key):
                raise ConfigError(f"cannot resume {self.root}: its {key} was {recorded.get(key)!r}, this run's is "
                                  f"{wanted.get(key)!r}; use a new --output for a different run")

    def _remove_temporaries(self) -> None:
        for leftover in self.root.glob(".*.tmp"):
            log.info("removing %s, left by an interrupted run", leftover)
            leftover.unlink(missing_ok=True)

    def _read_indices(self, part: Path) -> list:
        """The ``index`` values of one part, as stored (checked by the caller); its columns must be the table's."""
        try:
            if self.output_format == "parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(part)
                if list(table.column_names) != list(COLUMNS):
                    raise ValueError(f"its columns are {table.column_names}, not {list(COLUMNS)}")
                return table.column("index").to_pylist()
            indices = []
            text = read_text(part, MAX_PART_BYTES, ConfigError, "committed part")
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                row = parse_json(line, f"line {number}", ConfigError)
                if not isinstance(row, dict) or sorted(row) != sorted(COLUMNS):
                    raise ValueError(f"line {number} is not a row with the columns {list(COLUMNS)}")
                indices.append(row["index"])
            return indices
        except Exception as exc:  # noqa: BLE001 - any unreadable part stops the resume with its name
            raise ConfigError(f"cannot resume: cannot read the committed part {part}: {exc}") from None

