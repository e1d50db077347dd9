"""What ``vledge caption`` and ``vledge ask`` do, apart from parsing options and printing.

Inputs (files, folders, globs) become a list of image files; an engine — the torch-free
ONNX Runtime runtime on a model directory, or the PyTorch model of a checkpoint — answers
one prompt about each of them in batches. A bad image never stops the run: it becomes an
error record for that file and the others go on. Torch is imported only by the checkpoint
engine, so the runtime path works on a machine without it.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vledge.config import PromptTemplate
from vledge.decoding import GenerationOptions
from vledge.errors import ConfigError, VledgeError
from vledge.generation import Engine, clamp_to_positions, generate_from_pixels
from vledge.prompt import CAPTION_PROMPT, question_ids

log = logging.getLogger(__name__)

# Files a folder contributes (a file named explicitly or matched by a glob is always tried).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff", ".gif",
                              ".pbm", ".pgm", ".ppm", ".pnm", ".jp2", ".hdr", ".pic", ".avif", ".heic"})


@dataclass
class Record:
    """One line of output: an answer, or the error that kept a file from getting one."""

    image: str
    prompt: str
    text: str | None = None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    timings_ms: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"image": self.image, "prompt": self.prompt, "error": self.error}
        return {"image": self.image, "prompt": self.prompt, "text": self.text, "token_ids": self.token_ids,
                "finish_reason": self.finish_reason, "timings_ms": self.timings_ms}


def expand_inputs(arguments: Iterable[str | os.PathLike]) -> tuple[list[str], list[Record]]:
    """Files to run, in order, and error records for arguments that name nothing.

    A folder gives its image files (by extension, recursively, sorted); a pattern with ``*``, ``?``
    or ``[`` that is not an existing path is expanded as a glob (``**`` recursive); anything else is
    taken as a file name, so a missing file is reported by the engine that tries to open it.
    """
    files: list[str] = []
    problems: list[Record] = []
    for argument in arguments:
        text = os.fspath(argument)
        path = Path(text)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append(Record(image=text, prompt="", error=f"folder {text} holds no image files"))
            files.extend(found)
        elif not path.exists() and glob.has_magic(text):
            found = sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p))
            if not found:
                problems.append(Record(image=text, prompt="", error=f"no files match {text}"))
            files.extend(found)
        else:
            files.append(text)
    return files, problems


class _AnswerEngine:
    """What both engines share: prompt ids checked against the model's positions, answers as records."""

    engine: Engine  # the generation engine (vledge.generation)
    template: PromptTemplate
    image_tokens: int
    max_positions: int | None  # None: no position limit (LSTM)
    caption_prompt: str = CAPTION_PROMPT

    def __init__(self) -> None:
        self._prompt_ids: dict[str, list[int]] = {}

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's ids (encoded once per prompt); ConfigError when it leaves the model no room to answer."""
        known = self._prompt_ids
        if prompt not in known:
            ids = question_ids(self.engine.tokenizer, self.template, prompt)
            clamp_to_positions(GenerationOptions(max_new_tokens=1), len(ids) - 1 + self.image_tokens,
                               self.max_positions)
            known[prompt] = ids
        return list(known[prompt])

    def answer(self, prepared: Sequence, prompt: str, options: GenerationOptions,
               stop_strings: Sequence[str]) -> list[Record]:
        """One record per prepared image (what :meth:`prepare` returned for each)."""
        pixels = np.stack(prepared)
        results = generate_from_pixels(self.engine, pixels, [self.prompt_ids(prompt)] * len(pixels), options,
                                       stop_strings)
        return [_record(r, prompt) for r in results]  # preprocess_ms is filled in by run()


def _record(result, prompt: str) -> Record:
    return Record(image="", prompt=prompt, text=result.text, token_ids=result.token_ids,
                  finish_reason=result.finish_reason, timings_ms=result.timings.to_dict())


class RuntimeEngine(_AnswerEngine):
    """The ONNX Runtime engine on an exported model directory (no torch)."""

    def __init__(self, model_dir: str | Path, precision: str = "auto", providers: str | Sequence[str] = "auto",
                 threads: int | None = None, strict: bool = False) -> None:
        from vledge.runtime import load

        super().__init__()
        self.runtime = self.engine = load(model_dir, precision=precision, providers=providers, threads=threads,
                                          strict=strict)
        self.runtime.warmup()  # first-run costs here, not in the first image's timings
        manifest = self.runtime.manifest
        self.caption_prompt = self.runtime.caption_prompt
        self.template = manifest.prompt
        self.image_tokens = manifest.num_image_tokens
        language = manifest.model_config.language
        self.max_positions = language.max_positions if language.has_kv_cache else None
        self.description = (f"{model_dir} ({', '.join(f'{c}={p}' for c, p in self.runtime.precisions.items())} "
                            f"on {self.runtime.info()['provider']})")

    def prepare(self, path: str):
        if self.runtime.preprocessor.tiled:  # a tiled model (SmolVLM): the image's tiles and grid
            return self.runtime.preprocessor.tiles(path)
        return self.runtime.preprocessor.preprocess(path)

    def answer(self, prepared: Sequence, prompt: str, options: GenerationOptions,
               stop_strings: Sequence[str]) -> list[Record]:
        if not self.runtime.preprocessor.tiled:
            return super().answer(prepared, prompt, options, stop_strings)
        self.prompt_ids(prompt)  # the length check
        results = self.runtime.generate_from_tiles([[image] for image in prepared], [prompt] * len(prepared),
                                                   options, stop_strings)
        return [_record(r, prompt) for r in results]


class CheckpointEngine(_AnswerEngine):
    """The PyTorch model of a checkpoint (needs the ``train`` extra)."""

    def __init__(self, ckpt: str | Path, threads: int | None = None) -> None:
        try:
            import torch
        except ImportError:
            raise ConfigError("--ckpt needs PyTorch (pip install 'vledge[train]'); "
                              "use --model with an exported model directory instead") from None
        from vledge.checkpoint import load_checkpoint
        from vledge.models.generate import TorchEngine

        super().__init__()
        if threads:
            torch.set_num_threads(threads)
        checkpoint = load_checkpoint(ckpt)
        model = checkpoint.build_model().eval()
        self.engine = TorchEngine(model, checkpoint.tokenizer())
        self.config = checkpoint.model_config
        self.template = self.config.prompt
        self.image_tokens = model.num_image_tokens
        self.max_positions = self.config.language.max_positions if model.is_transformer else None
        self.description = f"{ckpt} (PyTorch)"

    def prepare(self, path: str):
        """[3, S, S] pixels, or a tiled model's (SmolVLM) ``Idefics3Images``: the image's tiles and grid."""
        from vledge.data.images import preprocess, preprocess_tiles

        if self.config.preprocess.tiles is not None:
            return preprocess_tiles(path, self.config.preprocess)
        return preprocess(path, self.config.preprocess).numpy()

    def answer(self, prepared, prompt: str, options: GenerationOptions, stop_strings: Sequence[str]) -> list[Record]:
        if self.config.preprocess.tiles is None:
            return super().answer(prepared, prompt, options, stop_strings)
        from vledge.image_tiles import expand_image_ids, tiles_per_row

        images = list(prepared)  # what prepare() returned, one per file
        base = self.prompt_ids(prompt)
        ids = [expand_image_ids(self.engine.tokenizer, self.config.preprocess.tiles, base, [(i.rows, i.cols)])
               for i in images]
        results = generate_from_pixels(self.engine, np.concatenate([i.pixel_values for i in images]), ids, options,
                                       stop_strings, tiles_per_row=tiles_per_row([[(i.rows, i.cols)] for i in images]))
        return [Record(image="", prompt=prompt, text=r.text, token_ids=r.token_ids, finish_reason=r.finish_reason,
                       timings_ms=r.timings.to_dict()) for r in results]


def run(engine, files: Sequence[str], prompt: str, options: GenerationOptions, stop_strings: Sequence[str] = (),
        batch_size: int = 1, on_record: Callable[[Record], None] | None = None,
        on_progress: Callable[[int], None] | None = None) -> list[Record]:
    """Answer ``prompt`` about every file; each file gets exactly one record, in input order.

    A prompt that leaves the model no room to answer raises ConfigError before any file is read.
    """
    engine.prompt_ids(prompt)
    records: list[Record] = []

    def emit(record: Record) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record)

    def flush(batch: list[tuple[str, np.ndarray, float]]) -> None:
        if not batch:
            return
        try:
            answers = engine.answer([pixels for _, pixels, _ in batch], prompt, options, stop_strings)
        except VledgeError as exc:
            answers = [Record(image="", prompt=prompt, error=f"{type(exc).__name__}: {exc}") for _ in batch]
        for (path, _, preprocess_ms), answer in zip(batch, answers):
            answer.image = path
            if answer.ok:  # this file's own decoding and preprocessing time
                answer.timings_ms["preprocess_ms"] = preprocess_ms
                answer.timings_ms["total_ms"] = answer.timings_ms.get("total_ms", 0.0) + preprocess_ms
            emit(answer)
        if on_progress is not None:
            on_progress(len(batch))
        batch.clear()

    pending: list[tuple[str, np.ndarray, float]] = []
    for path in files:
        tick = time.perf_counter()
        try:
            pixels = engine.prepare(path)
        except VledgeError as exc:
            flush(pending)  # keep the output in input order
            emit(Record(image=path, prompt=prompt, error=f"{type(exc).__name__}: {exc}"))
            if on_progress is not None:
                on_progress(1)
            continue
        except Exception as exc:  # a decoder bug must not end the run for every other file
            log.debug("unexpected error preparing %s", path, exc_info=True)
            flush(pending)
            emit(Record(image=path, prompt=prompt, error=f"unexpected {type(exc).__name__}: {exc}"))
            if on_progress is not None:
                on_progress(1)
            continue
        pending.append((path, pixels, (time.perf_counter() - tick) * 1e3))
        if len(pending) >= batch_size:
            flush(pending)
    flush(pending)
    return records


# --------------------------------------------------------------------------- several images in one prompt


def ask_images(engine, files: Sequence[str], prompt: str, options: GenerationOptions,
               stop_strings: Sequence[str] = ()) -> Record:
    """Answer ``prompt`` about several images at once (one prompt; tiled models such as SmolVLM take them).

    A model that takes one image per prompt, or a checkpoint, raises ConfigError before any file is read.
    """
    runtime = getattr(engine, "runtime", None)
    if runtime is None:
        raise ConfigError("several images in one prompt need an exported model directory (--model)")
    if not runtime.preprocessor.tiled:
        raise ConfigError(f"this model takes one image per prompt, got {len(files)} (tiled models such as "
                          "SmolVLM take several)")
    engine.prompt_ids(prompt)
    result = runtime.generate([list(files)], [prompt], options, stop_strings)[0]
    record = _record(result, prompt)
    record.image = " + ".join(files)
    return record
