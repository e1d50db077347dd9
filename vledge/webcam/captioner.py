"""The captioner thread: runs the model one frame at a time, or reuses the last caption for an unchanged scene."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from vledge.errors import ImageError
from vledge.webcam.capture import Frame
from vledge.webcam.scene import SceneChangeDetector

log = logging.getLogger(__name__)


@dataclass
class CaptionEvent:
    """One caption decision: a new caption, or the last one reused because the scene had not changed."""

    frame_index: int
    stream_time: float
    timestamp: float  # time.time() when decided
    caption: str
    reused: bool
    latency_ms: float  # from taking the frame to the decision, scene check included
    timings: dict[str, Any] | None  # per stage (runtime Timings) for a new caption
    scene_difference: float | None
    embedding_distance: float | None
    finish_reason: str | None
    captured_at: float  # time.monotonic() when the frame was read
    truth: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("captured_at")
        data["event"] = "caption"
        return data


class Captioner(threading.Thread):
    """Captions the frame it is given, unless the scene is unchanged; one frame at a time."""

    def __init__(self, runtime: Any, question: str | None, options: Any, detector: SceneChangeDetector) -> None:
        super().__init__(name="vledge-captioner", daemon=True)
        self.runtime, self.question, self.options, self.detector = runtime, question, options, detector
        self._cond = threading.Condition()
        self._job: Frame | None = None
        self._busy = False
        self._stopping = False
        self._events: list[CaptionEvent] = []
        self._last: CaptionEvent | None = None
        self.error: BaseException | None = None

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._busy

    def submit(self, frame: Frame) -> bool:
        """Hand over a frame if the captioner is free; False if it is busy."""
        with self._cond:
            if self._busy or self._stopping:
                return False
            self._job, self._busy = frame, True
            self._cond.notify_all()
            return True

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            if self._busy:
                self._cond.wait(timeout)
            return not self._busy

    def drain(self) -> list[CaptionEvent]:
        with self._cond:
            events, self._events = self._events, []
            return events

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def run(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._stopping:
                    self._cond.wait()
                job = self._job
                if job is None:
                    return
            try:
                event = self._process(job)
            except ImageError as exc:  # one bad frame (over the pixel limit, a strange layout) is skipped
                log.warning("frame %d skipped: %s", job.index, exc)
                event = None
            except BaseException as exc:  # raised again by the demo loop
                event = None
                self.error = exc
            with self._cond:
                if event is not None:
                    self._events.append(event)
                    self._last = event
                self._job, self._busy = None, False
                self._cond.notify_all()
                if self.error is not None:
                    return

    def _process(self, frame: Frame) -> CaptionEvent:
        started = time.perf_counter()
        detector = self.detector
        thumbnail = detector.thumbnail(frame.image)
        difference = detector.pixel_difference(thumbnail)
        changed = detector.pixel_changed(difference)
        embedding = descriptor = distance = None
        embed_ms = 0.0
        if changed and detector.embedding_threshold is not None:
            tick = time.perf_counter()
            embedding, descriptor = self._embed(frame.image)
            embed_ms = (time.perf_counter() - tick) * 1e3
            distance = detector.embedding_distance(descriptor)
            changed = distance is None or distance > detector.embedding_threshold
        last = self._last
        if not changed and last is not None:
            return CaptionEvent(frame.index, frame.stream_time, time.time(), last.caption, True,
                                (time.perf_counter() - started) * 1e3, None, difference, distance, None,
                                frame.captured_at, frame.truth)
        if embedding is not None:
            result = self._from_embedding(embedding, embed_ms)
        elif self.question:
            result = self.runtime.ask(frame.image, self.question, self.options)
        else:
            result = self.runtime.caption(frame.image, self.options)
        detector.remember(thumbnail, descriptor)
        timings = result.timings.to_dict() if hasattr(result.timings, "to_dict") else dataclasses.asdict(result.timings)
        return CaptionEvent(frame.index, frame.stream_time, time.time(), result.text, False,
                            (time.perf_counter() - started) * 1e3, timings, difference, distance,
                            result.finish_reason, frame.captured_at, frame.truth)

    def _embed(self, image: np.ndarray):
        """(what the decoder needs, the scene descriptor) of one frame.

        A tiled model (SmolVLM) embeds the frame's tiles; its global view, the last tile, is the descriptor
        (the same size whatever the frame's grid), and its tiles are kept to expand the prompt."""
        runtime = self.runtime
        if getattr(runtime.preprocessor, "tiled", False):
            tiles = runtime.preprocessor.tiles(image)
            embeds = runtime.encode_images(tiles.pixel_values)
            return (tiles, embeds), embeds[-1]
        embedding = runtime.embed_images([image])
        return embedding, embedding

    def _from_embedding(self, embedding, embed_ms: float):
        """Decode from the embedding the scene check already computed (its time counts as vision)."""
        from vledge.prompt import question_ids
        from vledge.runtime.model import Timings

        runtime = self.runtime
        prompt = self.question or runtime.caption_prompt
        options = self.options or runtime.default_options
        if isinstance(embedding, tuple):  # a tiled model: the prompt holds one image token per visual token
            tiles, embeds = embedding
            ids, _, _ = runtime.tiled_inputs([[tiles]], [prompt])
            return runtime.generate_from_embeds([embeds], ids, options, timings=Timings(vision_ms=embed_ms))[0]
        ids = [question_ids(runtime.tokenizer, runtime.manifest.prompt, prompt)]
        return runtime.generate_from_embeds(embedding, ids, options, timings=Timings(vision_ms=embed_ms))[0]
