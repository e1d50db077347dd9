"""The overlay drawn on each shown frame: caption, question, truth, FPS, latency and per-stage timings."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from vledge.webcam.captioner import CaptionEvent

FONT = cv2.FONT_HERSHEY_SIMPLEX


def wrap_text(text: str, max_width: int, scale: float, thickness: int = 1) -> list[str]:
    """Split ``text`` into lines no wider than ``max_width`` pixels (long words are cut)."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if cv2.getTextSize(candidate, FONT, scale, thickness)[0][0] <= max_width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while cv2.getTextSize(word, FONT, scale, thickness)[0][0] > max_width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and cv2.getTextSize(word[:cut], FONT, scale, thickness)[0][0] > max_width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return lines


@dataclass
class OverlayState:
    """What the overlay shows; updated from caption events by the demo loop."""

    caption: str | None = None
    question: str | None = None
    latency_ms: float | None = None  # of the last new caption
    timings: dict[str, Any] | None = None  # of the last new caption
    checked_at: float | None = None  # monotonic capture time of the last frame the caption was confirmed for
    reused: bool = False
    made: int = 0
    reused_count: int = 0

    def update(self, event: CaptionEvent) -> None:
        self.caption = event.caption
        self.checked_at = event.captured_at
        self.reused = event.reused
        if event.reused:
            self.reused_count += 1
        else:
            self.made += 1
            self.latency_ms, self.timings = event.latency_ms, event.timings


def _shade(image: np.ndarray, y0: int, y1: int) -> None:
    y0, y1 = max(0, y0), min(image.shape[0], y1)
    if y1 > y0:
        image[y0:y1] = cv2.convertScaleAbs(image[y0:y1], alpha=0.35)


_Line = tuple[str, tuple[int, int, int], float, int]  # text, BGR colour, font scale, thickness


def _block(text: str, colour: tuple[int, int, int], scale: float, thickness: int, width: int) -> list[_Line]:
    return [(line, colour, scale, thickness) for line in wrap_text(text, width, scale, thickness)]


def _draw_lines(image: np.ndarray, lines: list[_Line], y0: int, margin: int) -> None:
    y = y0 + margin
    for text, colour, scale, thickness in lines:
        (_, h), baseline = cv2.getTextSize(text, FONT, scale, thickness)
        y += h
        cv2.putText(image, text, (margin, y), FONT, scale, colour, thickness, cv2.LINE_AA)
        y += baseline + max(2, h // 3)


def _height(lines: list[_Line], margin: int) -> int:
    total = 2 * margin
    for text, _, scale, thickness in lines:
        (_, h), baseline = cv2.getTextSize(text, FONT, scale, thickness)
        total += h + baseline + max(2, h // 3)
    return total


def draw_overlay(image: np.ndarray, state: OverlayState, fps: float | None, now: float,
                 truth: str | None = None) -> np.ndarray:
    """Draw stats (top) and the wrapped caption (bottom) onto ``image`` in place; returns it."""
    height, width = image.shape[:2]
    scale = float(np.clip(width / 800.0, 0.3, 1.2))
    small = scale * 0.8
    thickness = 1 if scale < 0.9 else 2
    margin = max(3, int(round(10 * scale)))
    room = width - 2 * margin

    stats = [f"{fps:.1f} fps" if fps else "-- fps"]
    if state.latency_ms is not None:
        stats.append(f"caption {state.latency_ms:.0f} ms")
    if state.checked_at is not None:
        stats.append(f"age {max(0.0, now - state.checked_at):.1f} s")
    if state.reused:
        stats.append("same scene")
    top = _block(" | ".join(stats), (120, 255, 120), small, 1, room)
    if state.timings:
        t = state.timings
        top += _block(f"pre {t.get('preprocess_ms', 0):.1f}  vision {t.get('vision_ms', 0):.1f}  "
                      f"prefill {t.get('prefill_ms', 0):.1f}  decode {t.get('decode_ms', 0):.1f} ms "
                      f"({t.get('new_tokens', 0)} tokens)", (120, 255, 120), small, 1, room)
    _shade(image, 0, _height(top, margin))
    _draw_lines(image, top, 0, margin)

    bottom: list[_Line] = []
    if state.question:
        bottom += _block(f"Q: {state.question}", (200, 200, 255), scale, thickness, room)
    text = state.caption if state.caption is not None else "(captioning...)"
    bottom += _block(text or "(empty caption)", (255, 255, 255), scale, thickness, room)
    if truth:
        bottom += _block(f"truth: {truth}", (170, 170, 170), small, 1, room)
    y0 = height - _height(bottom, margin)
    _shade(image, y0, height)
    _draw_lines(image, bottom, y0, margin)
    return image


class RateMeter:
    """Frames per second over the last ``window`` seconds."""

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self._times: deque[float] = deque()

    def tick(self, now: float) -> float | None:
        self._times.append(now)
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()
        if len(self._times) < 2:
            return None
        span = self._times[-1] - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else None
