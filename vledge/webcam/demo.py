"""The demo loop: wires source, capture, captioner and outputs together and says why the run ended."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vledge.errors import ConfigError
from vledge.webcam.capture import CaptureThread, Frame, LatestFrame
from vledge.webcam.captioner import CaptionEvent, Captioner
from vledge.webcam.display import Window, open_window, require_gui
from vledge.webcam.outputs import CaptionLog, OutputError, VideoOutput
from vledge.webcam.overlay import OverlayState, RateMeter, draw_overlay
from vledge.webcam.reasons import (
    END_OF_STREAM,
    INTERRUPTED,
    MAX_FRAMES,
    NORMAL_ENDS,
    READ_ERROR,
    STALE_SOURCE,
    TIME_LIMIT,
    USER_QUIT,
)
from vledge.webcam.scene import DEFAULT_SCENE_THRESHOLD, SceneChangeDetector
from vledge.webcam.sources import open_source

log = logging.getLogger(__name__)

PACES = ("auto", "realtime", "lockstep")


@dataclass
class DemoOptions:
    question: str | None = None  # ask this instead of the model's caption prompt
    every_ms: float = 500.0  # at most one caption decision per this much stream time
    output: str | os.PathLike | None = None  # annotated video (.mp4, .avi, .mkv, .mov, .m4v)
    log: str | os.PathLike | None = None  # JSONL caption log
    headless: bool = False  # never open a window (also the automatic fallback without a display)
    pace: str = "auto"  # realtime | lockstep | auto (lockstep for files/folders/synthetic without a window)
    max_frames: int | None = None
    seconds: float | None = None  # limit: wall clock for a live source, the stream's own time otherwise
    max_new_tokens: int | None = None
    scene_threshold: float = DEFAULT_SCENE_THRESHOLD  # <= 0: caption every due frame
    embedding_threshold: float | None = None  # cosine distance; None: pixel check only
    stale_frames: int = 30  # watchdog for live sources: this many identical frames ...
    stale_seconds: float = 3.0  # ... spanning at least this long end the run
    read_retries: int = 5
    retry_delay_s: float = 0.2  # live sources wait retry * this between retries
    output_fps: float | None = None  # default: the source's frame rate (25 when unknown)
    window_title: str = "vledge webcam"

    def __post_init__(self) -> None:
        if self.pace not in PACES:
            raise ConfigError(f"pace must be one of {', '.join(PACES)}, got {self.pace!r}")
        checks = [
            ("every_ms", self.every_ms, 0, True), ("max_frames", self.max_frames, 1, True),
            ("seconds", self.seconds, 0, False), ("max_new_tokens", self.max_new_tokens, 1, True),
            ("embedding_threshold", self.embedding_threshold, 0, True), ("stale_frames", self.stale_frames, 2, True),
            ("stale_seconds", self.stale_seconds, 0, True), ("read_retries", self.read_retries, 0, True),
            ("retry_delay_s", self.retry_delay_s, 0, True), ("output_fps", self.output_fps, 0, False),
        ]
        for name, value, low, inclusive in checks:
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                    value < low if inclusive else value <= low):
                raise ConfigError(f"DemoOptions.{name} must be a number {'>=' if inclusive else '>'} {low}, "
                                  f"got {value!r}")


@dataclass
class DemoSummary:
    source: str
    reason: str  # one of END_OF_STREAM, MAX_FRAMES, TIME_LIMIT, USER_QUIT, INTERRUPTED, READ_ERROR, STALE_SOURCE
    message: str
    frames: int  # frames shown / written
    frames_read: int  # frames the source delivered
    frames_dropped: int  # read but replaced by a newer one before they were shown
    captions_made: int
    captions_reused: int
    output: Path | None
    log: Path | None
    pace: str
    window: bool
    seconds: float
    last_caption: str | None = None

    @property
    def ok(self) -> bool:
        """True for a normal end; False when the source failed (read errors, frozen camera)."""
        return self.reason in NORMAL_ENDS

    def describe(self) -> str:
        lines = [
            f"{self.message}",
            f"  {self.frames} frames shown ({self.frames_read} read, {self.frames_dropped} dropped) in "
            f"{self.seconds:.1f} s, pace {self.pace}",
            f"  {self.captions_made} captions made, {self.captions_reused} reused (scene unchanged)",
        ]
        if self.last_caption is not None:
            lines.append(f"  last caption: {self.last_caption}")
        if self.output is not None:
            lines.append(f"  annotated video: {self.output}")
        if self.log is not None:
            lines.append(f"  caption log: {self.log}")
        return "\n".join(lines)


def _resolve_model(model: Any, precision: str, providers: Any, threads: int | None) -> Any:
    if isinstance(model, (str, os.PathLike)):
        from vledge.runtime import load

        return load(model, precision=precision, providers=providers, threads=threads)
    return model


def run_demo(
    model: Any,
    source: Any = 0,
    options: DemoOptions | None = None,
    on_caption: Callable[[CaptionEvent], None] | None = None,
    precision: str = "auto",
    providers: Any = "auto",
    threads: int | None = None,
) -> DemoSummary:
    """Caption a live source until it ends, fails, a limit is reached, or the user stops it.

    ``model`` is a loaded runtime (``vledge.runtime.load``) or a model directory; ``source`` is a
    spec for :func:`open_source` or a :class:`FrameSource`. ``on_caption`` is called in this thread
    for every caption event (new or reused). Sources that cannot be opened raise SourceError;
    output paths that cannot be written raise OutputError; a window asked for on a display with an
    OpenCV build that has no GUI raises DisplayError (before anything is opened); a source that
    fails mid-stream ends the run (``summary.ok`` is False) with the video and log finalised.
    """
    options = options or DemoOptions()
    if not options.headless:
        require_gui()
    if options.output is not None and isinstance(source, (str, os.PathLike)):
        try:
            if Path(source).resolve() == Path(options.output).resolve():
                raise OutputError(f"the output video {options.output} is the source itself")
        except OSError:
            pass
    runtime = _resolve_model(model, precision, providers, threads)
    generation = None
    if options.max_new_tokens is not None:
        generation = dataclasses.replace(runtime.default_options, max_new_tokens=int(options.max_new_tokens))
    src = open_source(source)
    started = time.monotonic()
    window: Window | None = None
    video: VideoOutput | None = None
    caption_log: CaptionLog | None = None
    capture: CaptureThread | None = None
    captioner: Captioner | None = None
    state = OverlayState(question=options.question)
    last_caption: str | None = None
    frames = 0
    reason, message = None, ""
    output_path = log_path = None
    pace = options.pace
    slot = LatestFrame()
    try:
        if not options.headless:
            window, why = open_window(options.window_title)
            if window is None:
                log.warning("no window: %s; running headless", why)
        if pace == "auto":
            pace = "realtime" if (src.live or window is not None) else "lockstep"
        if options.output is not None:
            video = VideoOutput(options.output, options.output_fps or src.fps or 25.0)
        if options.log is not None:
            caption_log = CaptionLog(options.log)
        if window is None and video is None and caption_log is None and on_caption is None:
            log.warning("headless without an output video or a caption log: captions only go to the log messages")

        capture = CaptureThread(src, slot, realtime=pace == "realtime", wait=pace == "lockstep",
                                read_retries=options.read_retries, retry_delay_s=options.retry_delay_s,
                                stale_frames=options.stale_frames, stale_seconds=options.stale_seconds)
        detector = SceneChangeDetector(options.scene_threshold, options.embedding_threshold)
        captioner = Captioner(runtime, options.question, generation, detector)
        meter = RateMeter()
        every_s = options.every_ms / 1000.0
        last_due = -math.inf
        fps: float | None = None

        def handle(new_events: list[CaptionEvent]) -> None:
            nonlocal last_caption
            for event in new_events:
                state.update(event)
                last_caption = event.caption
                if caption_log is not None:
                    caption_log.write(event.to_json())
                if event.reused:
                    log.debug("frame %d: scene unchanged (difference %s), caption reused", event.frame_index,
                              event.scene_difference)
                else:
                    log.info("frame %d: %s (%.0f ms)", event.frame_index, event.caption, event.latency_ms)
                if on_caption is not None:
                    on_caption(event)

        log.info("captioning %s (pace %s, %s)", src.name, pace, "window" if window else "headless")
        captioner.start()
        capture.start()
        try:
            while True:
                if options.seconds is not None and src.live and time.monotonic() - started >= options.seconds:
                    reason, message = TIME_LIMIT, f"stopped after {options.seconds:g} s"
                    break
                frame: Frame | None = slot.take(timeout=0.05)
                # A file, folder or synthetic scene has its own clock: the limit is on its time, so the
                # output video lasts --seconds however fast frames are made.
                if options.seconds is not None and frame is not None and not src.live \
                        and frame.stream_time >= options.seconds - 1e-9:
                    reason, message = TIME_LIMIT, f"stopped after {options.seconds:g} s of {src.name}"
                    break
                handle(captioner.drain())
                if captioner.error is not None:
                    raise captioner.error
                if frame is None:
                    if slot.finished:
                        if capture.error is not None:
                            raise capture.error
                        reason, message = capture.reason or END_OF_STREAM, capture.message
                        break
                    if window is not None and not window.poll():
                        reason, message = USER_QUIT, "stopped by the user"
                        break
                    continue
                # (a microsecond of slack: 0.6 - 0.4 < 0.2 in floating point)
                if frame.stream_time - last_due >= every_s - 1e-6 and captioner.submit(frame):
                    last_due = frame.stream_time
                    if pace == "lockstep":
                        while not captioner.wait_idle(0.1):
                            pass
                        handle(captioner.drain())
                        if captioner.error is not None:
                            raise captioner.error
                now = time.monotonic()
                fps = meter.tick(now) or fps
                annotated = draw_overlay(frame.image.copy(), state, fps, now, frame.truth)
                frames += 1
                if video is not None:
                    video.write(annotated)
                if window is not None and not window.show(annotated):
                    reason, message = USER_QUIT, "stopped by the user"
                    break
                if options.max_frames is not None and frames >= options.max_frames:
                    reason, message = MAX_FRAMES, f"stopped after {frames} frames"
                    break
        except KeyboardInterrupt:
            reason, message = INTERRUPTED, "interrupted"
        # A caption in flight when the stream ended still belongs in the log.
        if captioner.busy and reason in (END_OF_STREAM, MAX_FRAMES):
            captioner.wait_idle(5.0)
        handle(captioner.drain())
    except BaseException as exc:
        reason, message = "error", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if capture is not None:
            capture.stop()
        if captioner is not None:
            captioner.stop()
        if capture is not None and capture.is_alive():
            capture.slot.close()
            capture.join(timeout=5.0)
        if captioner is not None and captioner.is_alive():
            captioner.join(timeout=10.0)
        if window is not None:
            window.close()
        try:
            if video is not None:
                output_path = video.close()
        finally:
            if caption_log is not None:
                caption_log.write({"event": "end", "timestamp": time.time(), "reason": reason or "error",
                                   "message": message, "frames": frames, "captions_made": state.made,
                                   "captions_reused": state.reused_count})
                log_path = caption_log.close()
            if capture is None or not capture.is_alive():  # never release a capture a thread is still reading
                src.close()
    if not message:
        message = reason or ""
    if reason in (READ_ERROR, STALE_SOURCE):
        log.warning("%s", message)
    return DemoSummary(
        source=src.name, reason=reason or END_OF_STREAM, message=message, frames=frames,
        frames_read=capture.frames if capture else 0, frames_dropped=slot.dropped,
        captions_made=state.made, captions_reused=state.reused_count, output=output_path, log=log_path, pace=pace,
        window=window is not None, seconds=time.monotonic() - started, last_caption=last_caption,
    )
