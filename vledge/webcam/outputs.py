"""The files a run writes: the annotated video (renamed into place when finished) and the JSONL caption log."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vledge.errors import OutputError
from vledge.files import commit

VIDEO_FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}


class VideoOutput:
    """Annotated frames into a video file, written beside it and renamed into place when closed."""

    def __init__(self, path: str | os.PathLike, fps: float) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in VIDEO_FOURCC:
            raise OutputError(f"cannot write video {self.path}: use one of {', '.join(VIDEO_FOURCC)}")
        if self.path.is_dir():
            raise OutputError(f"cannot write video {self.path}: it is a folder")
        self.fourcc = VIDEO_FOURCC[suffix]
        self.fps = fps
        self.partial = self.path.with_name(f".{self.path.stem}.partial{suffix}")
        self.size: tuple[int, int] | None = None
        self.frames = 0
        self._writer: Any = None

    def write(self, image: np.ndarray) -> None:
        if self._writer is None:
            self.size = (image.shape[1], image.shape[0])
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot write video {self.path}: {exc}") from None
            self._writer = cv2.VideoWriter(str(self.partial), cv2.VideoWriter_fourcc(*self.fourcc), self.fps,
                                           self.size)
            if not self._writer.isOpened():
                self._writer = None
                raise OutputError(f"cannot write video {self.path}: OpenCV could not open a {self.fourcc} writer")
        if (image.shape[1], image.shape[0]) != self.size:  # image folders mix sizes; a video cannot
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
        self._writer.write(image)
        self.frames += 1

    def close(self) -> Path | None:
        """Finalise the file; the path written, or None when no frame came."""
        if self._writer is None:
            return None
        self._writer.release()
        self._writer = None
        try:
            commit(self.partial, self.path)
        except OSError as exc:
            raise OutputError(f"cannot move the finished video into place at {self.path}: {exc}") from None
        return self.path


class CaptionLog:
    """One JSON object per line, flushed as written so the log can be followed live."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write caption log {self.path}: {exc}") from None

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> Path:
        if not self._file.closed:
            self._file.flush()
            self._file.close()
        return self.path
