"""Writing a synthetic dataset: images, LLaVA JSON splits and ``dataset.json``, in parallel and atomically.

Sample ``i`` is drawn from ``np.random.default_rng([seed, i])``, so the output depends on the
options alone, never on the number of worker processes.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from vledge import __version__
from vledge.data.synth.conversations import QUESTION_TASKS, scene_conversation
from vledge.data.synth.options import SPLITS, SynthOptions
from vledge.data.synth.scenes import COLORS, RELATIONS, SHAPES, SIZES, WORDS, position_names, random_scene, render_scene
from vledge.errors import ConfigError, DataError
from vledge.files import atomic_directory

log = logging.getLogger(__name__)

GENERATOR = "vledge.data.synth"
# Bump when the same seed would draw different scenes or conversations.
GENERATOR_VERSION = 4


@dataclass
class SynthSummary:
    out_dir: Path
    counts: dict[str, int]  # samples per split
    tasks: dict[str, int]  # question turns per task
    seconds: float

    def describe(self) -> str:
        total = sum(self.counts.values())
        splits = ", ".join(f"{name} {count}" for name, count in self.counts.items())
        tasks = ", ".join(f"{name} {count}" for name, count in self.tasks.items())
        return (
            f"wrote {total} synthetic images to {self.out_dir} in {self.seconds:.1f} s\n"
            f"  splits: {splits}\n"
            f"  turns:  {tasks}"
        )


@dataclass(frozen=True)
class _Job:
    folder: str
    options: SynthOptions
    start: int
    stop: int
    id_width: int


def _record(i: int, options: SynthOptions, folder: Path, id_width: int) -> dict:
    """Draw, render, write and describe sample ``i``; everything comes from ``default_rng([seed, i])``."""
    rng = np.random.default_rng([options.seed, i])
    scene = random_scene(rng, options)
    image = render_scene(scene, options.image_size, rng)
    turns = scene_conversation(scene, rng)
    sample_id = f"{i:0{id_width}d}"
    name = f"images/{sample_id}.{options.image_format}"
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if options.image_format == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, encoded = cv2.imencode(f".{options.image_format}", image, params)
    if not ok:
        raise DataError(f"OpenCV could not encode {name}")
    (folder / name).write_bytes(encoded.tobytes())
    conversations = []
    for k, turn in enumerate(turns):
        question = ("<image>\n" + turn.question) if k == 0 else turn.question
        conversations.append({"from": "human", "value": question, "task": turn.task})
        conversations.append({"from": "gpt", "value": turn.answer})
    return {"id": sample_id, "image": name, "conversations": conversations, "scene": scene.to_dict()}


def _run_job(job: _Job) -> list[dict]:
    folder = Path(job.folder)
    return [_record(i, job.options, folder, job.id_width) for i in range(job.start, job.stop)]


def _init_worker() -> None:
    # The parent handles Ctrl-C and terminates the pool; one OpenCV thread per process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)


def _write_records(path: Path, records: list[dict]) -> None:
    """A JSON list with one record per line: valid JSON that ``head`` and ``diff`` can still read."""
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    path.write_text("[\n" + body + "\n]\n" if records else "[]\n", encoding="utf-8")


def _is_synth_dataset(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == GENERATOR


def _check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse to touch anything but our own earlier output (or an empty folder), even with overwrite."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not overwrite:
        raise DataError(f"{out_dir} already exists; pass overwrite=True (--force) to replace it")
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise DataError(f"{out_dir} exists and is not a folder; refusing to replace it")
    if any(out_dir.iterdir()) and not _is_synth_dataset(out_dir):
        raise DataError(f"{out_dir} is not a vledge synthetic dataset (no dataset.json from {GENERATOR}); refusing to replace it")


def _vocabulary(options: SynthOptions) -> dict[str, list[str]]:
    return {
        "colors": list(COLORS),
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "positions": position_names(options.grid),
        "relations": list(RELATIONS),
        "words": list(WORDS),
    }


def generate_dataset(
    out_dir: Path,
    options: SynthOptions,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SynthSummary:
    """Write images, ``train/val/test.json`` (LLaVA format) and ``dataset.json`` into ``out_dir``.

    Everything is written into a hidden sibling folder that is renamed into
    place only when complete, so ``out_dir`` is never half-written; an existing
    ``out_dir`` is replaced only with ``overwrite`` and only after success.
    ``progress`` receives the number of samples finished since its last call.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    with atomic_directory(out_dir) as tmp:
        (tmp / "images").mkdir()
        id_width = max(6, len(str(options.size - 1)))
        chunk = max(1, min(256, math.ceil(options.size / (workers * 8))))
        jobs = [
            _Job(str(tmp), options, start, min(start + chunk, options.size), id_width)
            for start in range(0, options.size, chunk)
        ]
        workers = min(workers, len(jobs))
        log.info("drawing %d scenes with %d worker(s) into %s", options.size, workers, tmp)
        records: list[dict] = []
        if workers == 1:
            for job in jobs:
                done = _run_job(job)
                records.extend(done)
                if progress is not None:
                    progress(len(done))
        else:
            # "spawn": a forked child inherits locks held by the parent's other threads (OpenCV's,
            # ONNX Runtime's, torch's) and can wait on them forever.
            with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
                for done in pool.imap(_run_job, jobs):
                    records.extend(done)
                    if progress is not None:
                        progress(len(done))

        counts = options.split_counts()
        tasks: Counter = Counter()
        for record in records:
            tasks.update(m["task"] for m in record["conversations"] if m["from"] == "human")
        task_counts = {t: tasks[t] for t in ("caption", "describe", "list", *QUESTION_TASKS) if tasks[t]}
        start = 0
        for split in SPLITS:
            _write_records(tmp / f"{split}.json", records[start : start + counts[split]])
            start += counts[split]
        meta = {
            "generator": GENERATOR,
            "generator_version": GENERATOR_VERSION,
            "vledge_version": __version__,
            "options": asdict(options),
            "counts": counts,
            "tasks": task_counts,
            "vocabulary": _vocabulary(options),
            "colors_bgr": {name: list(bgr) for name, bgr in COLORS.items()},
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _check_target(out_dir, overwrite)  # it may have appeared while we were drawing
    summary = SynthSummary(out_dir, counts, task_counts, time.perf_counter() - started)
    log.info("%s", summary.describe())
    return summary

