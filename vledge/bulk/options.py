"""What one ``vledge batch`` run is asked to do, checked once when it is built."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vledge.bounds import MAX_THREADS, check_count
from vledge.errors import ConfigError

ENGINES = ("local", "ray")
FORMATS = ("parquet", "jsonl")
PRECISIONS = ("auto", "fp32", "fp16", "int8", "q4")


def default_workers() -> int:
    """One worker per core: a small model is call-overhead bound, so processes scale better than threads."""
    return max(1, os.cpu_count() or 1)


def _set(options: BatchOptions, name: str, value) -> None:
    object.__setattr__(options, name, value)  # frozen: normalised once, in __post_init__


@dataclass(frozen=True)
class BatchOptions:
    """A bulk captioning run: the model, the inputs, where the rows go, and how the work is spread.

    ``workers`` processes (local) or actors (Ray) each load the model once and run it with
    ``threads_per_worker`` ONNX Runtime threads (default: the cores split evenly). ``part_size`` inputs
    make one unit of work and one committed output part; ``batch_size`` images share one generate call.
    """

    model_dir: Path
    input: str
    output: Path
    prompt: str | None = None
    prompt_column: str | None = None
    image_column: str | None = None
    output_format: str | None = None  # None: from the output's suffix (.jsonl -> jsonl, else parquet)
    engine: str = "local"
    ray_address: str | None = None
    workers: int | None = None
    threads_per_worker: int | None = None
    gpus_per_worker: float = 0.0
    batch_size: int = 1
    part_size: int = 128
    precision: str = "auto"
    providers: str | tuple[str, ...] = "auto"
    max_new_tokens: int = 64
    resume: bool = False
    follow_links: bool = False  # read files a folder input links to outside itself

    def __post_init__(self) -> None:
        _set(self, "model_dir", Path(self.model_dir))
        _set(self, "output", Path(self.output))
        if not str(self.input).strip():
            raise ConfigError("--input names nothing: give a folder, a glob, a text file of paths or a table")
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.ray_address is not None and self.engine != "ray":
            raise ConfigError("--ray-address needs --engine ray")
        if self.prompt is not None and not self.prompt.strip():
            raise ConfigError("--prompt is empty")
        if self.output_format is None:
            _set(self, "output_format", "jsonl" if self.output.suffix.lower() == ".jsonl" else "parquet")
        if self.output_format not in FORMATS:
            raise ConfigError(f"unknown output format {self.output_format!r}; choose one of {', '.join(FORMATS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        workers = default_workers() if self.workers is None else self.workers
        if workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        _set(self, "workers", workers)
        threads = max(1, (os.cpu_count() or 1) // workers) if self.threads_per_worker is None else \
            self.threads_per_worker
        check_count("threads_per_worker", threads, 1, MAX_THREADS)
        _set(self, "threads_per_worker", threads)
        for name in ("batch_size", "part_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"--gpus-per-worker must not be negative, got {self.gpus_per_worker}")
        if self.gpus_per_worker and self.engine != "ray":
            raise ConfigError("--gpus-per-worker applies to --engine ray (Ray places the actors on GPUs)")

    @property
    def spin(self) -> bool:
        """ONNX Runtime's busy-waiting helps one session and hurts several sharing the cores."""
        return self.workers == 1
