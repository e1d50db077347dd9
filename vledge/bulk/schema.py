"""The output row, the same for every engine and format (documented in docs/batch.md)."""

from __future__ import annotations

from typing import Any

from vledge.errors import ConfigError

SCHEMA_VERSION = 1

# name -> (Arrow type name, nullable); the order is the column order of every part.
COLUMNS: dict[str, tuple[str, bool]] = {
    "index": ("int64", False),
    "path": ("string", False),
    "prompt": ("string", False),
    "text": ("string", True),
    "tokens": ("list<int32>", True),
    "finish_reason": ("string", True),
    "image_decode_ms": ("float64", True),
    "preprocess_ms": ("float64", True),
    "vision_ms": ("float64", True),
    "prefill_ms": ("float64", True),
    "decode_ms": ("float64", True),
    "total_ms": ("float64", True),
    "model_sha256": ("string", False),
    "error": ("string", True),
}
STAGES = ("image_decode_ms", "preprocess_ms", "vision_ms", "prefill_ms", "decode_ms")


def error_row(index: int, path: str, prompt: str, model_sha256: str, error: str,
              stage_ms: dict[str, float] | None = None) -> dict[str, Any]:
    """The row of an input that got no caption; ``error`` is the typed error's one line."""
    row = {name: None for name in COLUMNS}
    row.update(index=index, path=path, prompt=prompt, model_sha256=model_sha256, error=error)
    row.update(stage_ms or {})
    return row


def arrow_schema():
    import pyarrow as pa

    types = {"int64": pa.int64(), "string": pa.string(), "float64": pa.float64(), "list<int32>": pa.list_(pa.int32())}
    return pa.schema([pa.field(name, types[kind], nullable=nullable) for name, (kind, nullable) in COLUMNS.items()])


def rows_to_arrow(rows: list[dict[str, Any]]):
    """Rows -> a pyarrow Table with exactly the schema's columns and types."""
    pa = require_pyarrow("Parquet output")
    return pa.Table.from_pylist([{name: row.get(name) for name in COLUMNS} for row in rows], schema=arrow_schema())


def require_pyarrow(what: str):
    try:
        import pyarrow
    except ImportError:
        raise ConfigError(f"{what} needs pyarrow: pip install 'vledge[batch]' (or write .jsonl)") from None
    return pyarrow
