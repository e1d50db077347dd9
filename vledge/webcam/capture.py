"""The capture thread: the newest frame in a one-slot holder, so a slow captioner never makes the display lag.

It retries failed reads, paces files to their frame rate when asked, and ends a run on a frozen camera.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from vledge.webcam.reasons import END_OF_STREAM, READ_ERROR, STALE_SOURCE
from vledge.webcam.sources import FrameSource, _as_bgr

log = logging.getLogger(__name__)


@dataclass
class Frame:
    index: int  # 0-based position in the stream (frames the source delivered)
    image: np.ndarray  # BGR uint8; never drawn on
    stream_time: float  # seconds: index / fps for files and generated frames, wall time since start for live
    captured_at: float  # time.monotonic() when read
    truth: str | None = None


class LatestFrame:
    """A one-slot holder: ``put`` replaces what nobody took (counted as dropped), ``take`` waits for a frame.

    With ``wait=True`` a ``put`` waits until the slot is free instead (no frame is lost) — only used
    for sources that can wait (files), never for a camera.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._closed = False
        self.dropped = 0

    def put(self, item: Any, wait: bool = False) -> bool:
        with self._cond:
            while wait and self._item is not None and not self._closed:
                self._cond.wait(0.1)
            if self._closed:
                return False
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self._cond.notify_all()
            return True

    def take(self, timeout: float | None = None) -> Any:
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def finished(self) -> bool:
        """Closed and emptied: nothing more will come."""
        with self._cond:
            return self._closed and self._item is None


class CaptureThread(threading.Thread):
    """Reads the source into a LatestFrame; retries failed reads; ends on end of stream, failure or a frozen camera."""

    def __init__(self, source: FrameSource, slot: LatestFrame, realtime: bool, wait: bool, read_retries: int = 5,
                 retry_delay_s: float = 0.2, stale_frames: int = 30, stale_seconds: float = 3.0) -> None:
        super().__init__(name="vledge-capture", daemon=True)
        self.source, self.slot = source, slot
        self.realtime, self.wait = realtime, wait
        self.read_retries, self.retry_delay_s = read_retries, retry_delay_s
        self.stale_frames, self.stale_seconds = stale_frames, stale_seconds
        self.stop_event = threading.Event()
        self.frames = 0
        self.reason: str | None = None
        self.message = ""
        self.error: BaseException | None = None
        self.started_at = time.monotonic()

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        source = self.source
        fps = source.fps or 25.0
        live = source.live
        previous: np.ndarray | None = None
        same_run, same_since = 1, 0.0
        self.started_at = time.monotonic()
        try:
            while not self.stop_event.is_set():
                image = self._read()
                if image is None:
                    if self.reason is None:
                        self.reason, self.message = END_OF_STREAM, f"end of {source.name} after {self.frames} frames"
                    return
                now = time.monotonic()
                if live:  # watchdog: a camera that is gone often keeps returning its last buffer
                    if previous is not None and previous.shape == image.shape and np.array_equal(previous, image):
                        same_run += 1
                        if same_run >= self.stale_frames and now - same_since >= self.stale_seconds:
                            self.reason = STALE_SOURCE
                            self.message = (f"{source.name} returned {same_run} identical frames over "
                                            f"{now - same_since:.1f} s; it looks frozen or unplugged")
                            return
                    else:
                        same_run, same_since = 1, now
                    previous = image
                    stream_time = now - self.started_at
                else:
                    stream_time = self.frames / fps
                    if self.realtime:  # play files and generated scenes at their own speed
                        delay = self.started_at + stream_time - time.monotonic()
                        if delay > 0 and self.stop_event.wait(delay):
                            return
                frame = Frame(self.frames, image, stream_time, time.monotonic(), source.truth)
                self.frames += 1
                if not self.slot.put(frame, wait=self.wait and not live):
                    return
        except BaseException as exc:  # reported by the demo loop, which owns the outputs
            self.error = exc
        finally:
            self.slot.close()

    def _read(self) -> np.ndarray | None:
        failures = 0
        while True:
            try:
                image = self.source.read()
                return None if image is None else _as_bgr(image, self.source.name)
            except Exception as exc:  # any failure of a source is a read failure, retried
                failures += 1
                if failures > self.read_retries:
                    self.reason = READ_ERROR
                    self.message = (f"{self.source.name} stopped delivering frames after {self.frames} frames "
                                    f"({failures} failed reads): {exc}")
                    return None
                log.warning("%s: read failed (%s); retry %d of %d", self.source.name, exc, failures,
                            self.read_retries)
                if self.source.live and self.stop_event.wait(self.retry_delay_s * failures):
                    return None
