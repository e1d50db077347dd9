"""Captioning a list of inputs into output rows: the one function both engines run, so their rows agree.

Each image is decoded and preprocessed on its own, so a broken file becomes a row with ``error`` set
and never costs the rest of its batch; the good ones are then answered ``batch_size`` at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vledge.bulk.inputs import InputItem
from vledge.bulk.options import BatchOptions
from vledge.bulk.schema import error_row
from vledge.errors import VledgeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker process or Ray actor needs to load the model and caption (small and picklable)."""

    model_dir: str
    model_sha256: str
    precision: str
    providers: str | tuple[str, ...]
    threads: int
    spin: bool
    batch_size: int
    max_new_tokens: int
    prompt: str | None

    @classmethod
    def from_options(cls, options: BatchOptions, model_sha256: str) -> WorkerSettings:
        return cls(model_dir=str(options.model_dir), model_sha256=model_sha256, precision=options.precision,
                   providers=options.providers, threads=options.threads_per_worker, spin=options.spin,
                   batch_size=options.batch_size, max_new_tokens=options.max_new_tokens, prompt=options.prompt)


class RowCaptioner:
    """A loaded model and the settings to turn inputs into rows; built once per worker or actor."""

    def __init__(self, settings: WorkerSettings) -> None:
        import vledge.runtime

        self.settings = settings
        self.runtime = vledge.runtime.load(settings.model_dir, precision=settings.precision,
                                           providers=settings.providers, threads=settings.threads, spin=settings.spin)
        self.runtime.warmup()  # first-run costs here, not in the first image's timings
        self.options = vledge.runtime.GenerationOptions(max_new_tokens=settings.max_new_tokens)

    def prompt_for(self, item: InputItem) -> str:
        return item.prompt or self.settings.prompt or self.runtime.caption_prompt

    def caption(self, items: Sequence[InputItem]) -> list[dict[str, Any]]:
        """One row per item, in the items' order."""
        rows: list[dict[str, Any] | None] = [None] * len(items)
        ready: list[tuple[int, str, Any, dict[str, float]]] = []
        for position, item in enumerate(items):
            prompt = self.prompt_for(item)
            try:
                pixels, stage_ms = self._prepare(item)
            except Exception as exc:  # noqa: BLE001 - one bad file is one error row, whatever went wrong
                rows[position] = error_row(item.index, item.path, prompt, self.settings.model_sha256, _one_line(exc))
                continue
            ready.append((position, prompt, pixels, stage_ms))
        for start in range(0, len(ready), self.settings.batch_size):
            group = ready[start:start + self.settings.batch_size]
            for position, row in zip((g[0] for g in group), self._answer(items, group)):
                rows[position] = row
        return rows  # type: ignore[return-value]

    def _prepare(self, item: InputItem) -> tuple[Any, dict[str, float]]:
        """The item's pixels [3, S, S] (for a tiled model its tiles and grid, ``ImagePreprocessor.tiles``)."""
        from vledge.runtime.preprocess import decode_image

        preprocessor = self.runtime.preprocessor
        started = time.perf_counter()
        rgb = decode_image(item.source, max_pixels=preprocessor.max_pixels)
        decoded = time.perf_counter()
        if preprocessor.tiled:
            pixels = preprocessor.tiles(rgb, "RGB")
        else:
            pixels = preprocessor.normalize(preprocessor.resize_and_crop(rgb))
        done = time.perf_counter()
        return pixels, {"image_decode_ms": (decoded - started) * 1e3, "preprocess_ms": (done - decoded) * 1e3}

    def _answer(self, items: Sequence[InputItem], group) -> list[dict[str, Any]]:
        sha = self.settings.model_sha256
        try:
            prompts = [g[1] for g in group]
            if self.runtime.preprocessor.tiled:  # one image per row, each with its own tiles
                results = self.runtime.generate_from_tiles([[g[2]] for g in group], prompts, self.options)
            else:
                results = self.runtime.generate_from_pixels(np.stack([g[2] for g in group]), prompts, self.options)
        except Exception as exc:  # noqa: BLE001 - the batch's rows say what failed; the run goes on
            log.debug("generation failed for %d rows", len(group), exc_info=True)
            return [error_row(items[p].index, items[p].path, prompt, sha, _one_line(exc), stage)
                    for p, prompt, _, stage in group]
        share = 1.0 / len(group)  # a batched call's time, split over the rows it answered
        rows = []
        for (position, prompt, _, stage), result in zip(group, results):
            timings = result.timings
            row = {"index": items[position].index, "path": items[position].path, "prompt": prompt,
                   "text": result.text, "tokens": [int(t) for t in result.token_ids],
                   "finish_reason": result.finish_reason, **stage,
                   "vision_ms": timings.vision_ms * share, "prefill_ms": timings.prefill_ms * share,
                   "decode_ms": timings.decode_ms * share, "model_sha256": sha, "error": None}
            row["total_ms"] = sum(row[name] for name in ("image_decode_ms", "preprocess_ms", "vision_ms",
                                                         "prefill_ms", "decode_ms"))
            rows.append(row)
        return rows


def _one_line(exc: BaseException) -> str:
    """``ImageError: <message>`` for vledge's typed errors; anything else is marked as unexpected."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if isinstance(exc, VledgeError) else f"unexpected {type(exc).__name__}: {text}"
