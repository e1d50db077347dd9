"""One bulk run from start to end: list the inputs, open (or resume) the output, caption what is left."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vledge.bulk.inputs import list_inputs, listing_sha256
from vledge.bulk.options import BatchOptions
from vledge.bulk.parts import OutputFolder
from vledge.bulk.rows import WorkerSettings
from vledge.bulk.schema import require_pyarrow
from vledge.errors import ModelDirError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSummary:
    output: Path
    inputs: int
    already_done: int
    captioned: int
    errors: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        resumed = f", {self.already_done} done before" if self.already_done else ""
        return (f"{self.output}: {self.inputs} inputs{resumed}; {self.captioned} rows written now "
                f"({self.errors} with errors) in {self.seconds:.1f} s, {self.images_per_second:.1f} images/s")


def model_manifest_sha256(model_dir: Path) -> str:
    """The sha256 of the model's ``vledge.json``; it pins every graph file's hash, so it names the model."""
    from vledge.hashing import file_sha256
    from vledge.manifest import MANIFEST_NAME

    manifest = Path(model_dir) / MANIFEST_NAME
    if not manifest.is_file():
        raise ModelDirError(f"{model_dir} is not an exported model directory (no {MANIFEST_NAME})")
    return file_sha256(manifest)


def run_batch(options: BatchOptions, on_progress: Callable[[int], None] | None = None,
              on_start: Callable[[int], None] | None = None) -> BatchSummary:
    """Caption every input not yet in ``options.output``; ``on_start`` gets the count left to do."""
    if options.output_format == "parquet":
        require_pyarrow("Parquet output")
    if options.engine == "ray":
        from vledge.bulk.ray_engine import import_ray

        import_ray()  # before any work: a missing extra is reported at once
        require_pyarrow("--engine ray")
    model_sha256 = model_manifest_sha256(options.model_dir)
    items = list_inputs(options.input, options.image_column, options.prompt_column, options.follow_links)
    run: dict[str, Any] = {
        "model_dir": str(options.model_dir), "model_sha256": model_sha256, "input": options.input,
        "inputs": len(items), "inputs_sha256": listing_sha256(items), "prompt": options.prompt,
        "prompt_column": options.prompt_column, "image_column": options.image_column,
        "precision": options.precision, "max_new_tokens": options.max_new_tokens,
        "output_format": options.output_format,
    }
    folder = OutputFolder(options.output, options.output_format)
    done = folder.open(run, options.resume)
    todo = [item for item in items if item.index not in done]
    chunks = [todo[start:start + options.part_size] for start in range(0, len(todo), options.part_size)]
    settings = WorkerSettings.from_options(options, model_sha256)
    if on_start is not None:
        on_start(len(todo))
    written = {"rows": 0, "errors": 0}

    def commit(rows: list[dict[str, Any]]) -> None:
        folder.commit(rows)
        written["rows"] += len(rows)
        written["errors"] += sum(row.get("error") is not None for row in rows)
        if on_progress is not None:
            on_progress(len(rows))

    log.info("%d inputs, %d done before, %d parts to write with %s engine (%d workers x %d threads)",
             len(items), len(done), len(chunks), options.engine, options.workers, options.threads_per_worker)
    started = time.perf_counter()
    if options.engine == "ray":
        from vledge.bulk.ray_engine import caption_on_ray

        caption_on_ray(settings, chunks, options.workers, options.gpus_per_worker, options.ray_address, commit)
    else:
        from vledge.bulk.local import caption_locally

        caption_locally(settings, chunks, options.workers, commit)
    seconds = time.perf_counter() - started
    finished = folder.done_indices()
    folder.write_manifest({**folder.read_manifest(), "complete": len(finished) == len(items)})
    return BatchSummary(output=options.output, inputs=len(items), already_done=len(done),
                        captioned=written["rows"], errors=written["errors"], seconds=seconds)
