"""Frame sources: every kind of input behind one ``read()`` that returns BGR uint8 frames or None at the end."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vledge.errors import ConfigError, ImageError, SourceError
from vledge.runtime.image_decoding import MAX_PIXELS
from vledge.reads import MAX_IMAGE_FILE_BYTES, read_capped
from vledge.runtime.image_headers import probe_header

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class FrameSource:
    """Where frames come from. Subclass it (or duck-type it) to feed the demo from anything.

    ``read()`` returns the next BGR uint8 image (H x W x 3; grey and BGRA are converted), returns
    ``None`` at the normal end of the stream, and raises (any exception) when a frame cannot be read;
    the capture thread retries a failed read a bounded number of times. ``live`` sources (cameras,
    network streams) are never paced or blocked and are watched for frozen frames. A source may set
    ``truth`` (the true caption of the frame it just returned) for the overlay and the log.
    """

    name: str = "frames"
    live: bool = False
    fps: float | None = None  # nominal frame rate; None when unknown
    expected_frames: int | None = None  # frames a file says it holds; None when unknown
    truth: str | None = None

    def read(self) -> np.ndarray | None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class VideoSource(FrameSource):
    """A camera index, a video file or a stream URL, read through ``cv2.VideoCapture``."""

    def __init__(self, spec: int | str | os.PathLike, open_timeout_s: float = 10.0) -> None:
        if isinstance(spec, int):
            self.kind, self.name, self.live = "camera", f"camera {spec}", True
            capture = cv2.VideoCapture(spec)
        elif "://" in str(spec):
            self.kind, self.name, self.live = "stream", str(spec), True
            timeout_ms = int(open_timeout_s * 1000)
            capture = cv2.VideoCapture(str(spec), cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms,
                                                                     cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms])
        else:
            path = Path(spec)
            self.kind, self.name, self.live = "file", str(path), False
            if not path.is_file():
                raise SourceError(f"video file {path} does not exist")
            capture = cv2.VideoCapture(str(path))
        if not capture.isOpened():
            capture.release()
            what, hint = {
                "camera": (self.name, "no such camera, or it is in use by another program"),
                "stream": (f"stream {self.name}",
                           "the URL is unreachable, needs credentials, or is not a video stream"),
                "file": (f"video file {self.name}", "not a video OpenCV can decode, or the file is truncated"),
            }[self.kind]
            raise SourceError(f"cannot open {what}: {hint}")
        if self.kind == "camera":
            capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # keep the driver from queueing stale frames
        self._capture = capture
        fps = capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if math.isfinite(fps) and 1.0 <= fps <= 240.0 else None
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        self.expected_frames = int(count) if self.kind == "file" and math.isfinite(count) and count > 0 else None
        self._frames = 0

    def read(self) -> np.ndarray | None:
        ok, image = self._capture.read()
        if ok and image is not None:
            self._frames += 1
            return image
        if self.live:
            raise SourceError(f"{self.name} returned no frame")
        if self.expected_frames is not None and self._frames < self.expected_frames:
            raise SourceError(f"{self.name}: frame {self._frames + 1} of {self.expected_frames} cannot be decoded "
                              f"(truncated or corrupt file?)")
        return None

    def close(self) -> None:
        self._capture.release()


class ImageFolderSource(FrameSource):
    """The images of a folder in name order, each shown as one frame (``fps`` frames per second)."""

    def __init__(self, folder: str | os.PathLike, fps: float = 1.0) -> None:
        self.folder = Path(folder)
        self.name = f"image folder {self.folder}"
        self.fps = float(fps)
        self.files = sorted(p for p in self.folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise SourceError(f"image folder {self.folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.expected_frames = len(self.files)
        self._next = 0

    def read(self) -> np.ndarray | None:
        if self._next >= len(self.files):
            return None
        path = self.files[self._next]
        self._next += 1  # a bad image is skipped after the retries, not read forever
        data = _check_header(path)
        try:
            image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:
            image = None
        if image is None:
            raise SourceError(f"cannot read image {path}")
        return image


def _check_header(path: Path) -> bytes:
    """The file's bytes (a regular file under the size limit); a truncated file or one over the pixel limit is
    refused from its header, before decoding it at full size."""
    data = read_capped(path, MAX_IMAGE_FILE_BYTES, SourceError, "image")
    try:
        probe = probe_header(data, str(path))
    except ImageError as exc:
        raise SourceError(str(exc)) from None
    if probe.size is not None and probe.size[0] * probe.size[1] > MAX_PIXELS:
        width, height = probe.size
        raise SourceError(f"image {path} has {width}x{height} pixels, over the limit of {MAX_PIXELS}: skipped")
    return data


class SyntheticSource(FrameSource):
    """Moving scenes from the built-in synthetic generator: objects drift, the scene changes every few seconds.

    Frames are rendered at ``size`` (a display size; the model's preprocessing resizes) and carry
    the scene's exact caption as ``truth``. Stream time is ``frame index / fps``, so the same seed
    gives the same frames however fast they are read.
    """

    live = False

    def __init__(self, size: int = 384, fps: float = 15.0, scene_seconds: float = 4.0, seed: int = 0,
                 grid: int = 3) -> None:
        from vledge.data.synth import SynthOptions

        if fps <= 0 or scene_seconds <= 0:
            raise ConfigError(f"synthetic source needs fps > 0 and scene_seconds > 0, got {fps} and {scene_seconds}")
        self.options = SynthOptions(size=1, seed=seed, image_size=size, grid=grid, min_objects=1,
                                    max_objects=min(5, grid * grid), word_probability=0.2)
        self.name = f"synthetic scenes (seed {seed})"
        self.fps = float(fps)
        self.scene_seconds = float(scene_seconds)
        self._index = 0
        self._scene_index = -1
        self._scene: Any = None
        self._motion: np.ndarray | None = None

    def _start_scene(self, k: int) -> None:
        from vledge.data.synth import random_scene

        rng = np.random.default_rng([self.options.seed, 1, k])
        self._scene = random_scene(rng, self.options)
        # Per object: amplitude x/y (cells), period (s), phase x/y: a slow drift back and forth that
        # stays inside the object's cell, so the scene's exact caption stays true while it moves.
        n = len(self._scene.objects)
        self._motion = np.column_stack([rng.uniform(0.03, 0.08, (n, 2)), rng.uniform(2.0, 5.0, n),
                                        rng.uniform(0, 2 * math.pi, (n, 2))])
        self._scene_index = k

    def read(self) -> np.ndarray:
        from vledge.data.synth import caption, render_scene

        t = self._index / self.fps
        k = int(t // self.scene_seconds)
        if k != self._scene_index:
            self._start_scene(k)
        assert self._motion is not None
        objects = []
        for obj, (ax, ay, period, px, py) in zip(self._scene.objects, self._motion):
            w = 2 * math.pi * t / period
            offset = (obj.offset[0] + ax * math.sin(w + px), obj.offset[1] + ay * math.sin(w + py))
            objects.append(dataclasses.replace(obj, offset=offset))
        scene = dataclasses.replace(self._scene, objects=tuple(objects))
        image = render_scene(scene, self.options.image_size, np.random.default_rng([self.options.seed, 2, self._index]))
        self.truth = caption(scene)
        self._index += 1
        return image


class _Adapted(FrameSource):
    """Any object with ``read()`` (optionally ``close``, ``name``, ``live``, ``fps``, ``truth``) as a FrameSource."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = str(getattr(inner, "name", type(inner).__name__))
        self.live = bool(getattr(inner, "live", False))
        self.fps = getattr(inner, "fps", None)
        self.expected_frames = getattr(inner, "expected_frames", None)

    def read(self) -> np.ndarray | None:
        image = self.inner.read()
        self.truth = getattr(self.inner, "truth", None)
        return image

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()


def open_source(spec: Any, synthetic_seed: int = 0, open_timeout_s: float = 10.0) -> FrameSource:
    """A FrameSource from a CLI-style spec: camera index, video file, URL, image folder or ``synthetic``.

    A FrameSource is returned as it is; any other object with ``read()`` is adapted.
    """
    if isinstance(spec, FrameSource):
        return spec
    if callable(getattr(spec, "read", None)) and not isinstance(spec, (str, bytes, os.PathLike)):
        return _Adapted(spec)
    if isinstance(spec, bool) or not isinstance(spec, (int, str, os.PathLike)):
        raise SourceError(f"not a video source: {spec!r}")
    if isinstance(spec, int):
        return VideoSource(spec)
    text = str(spec).strip()
    if text.lower() == "synthetic":
        return SyntheticSource(seed=synthetic_seed)
    if text.isdigit():
        return VideoSource(int(text))
    if "://" in text:
        return VideoSource(text, open_timeout_s=open_timeout_s)
    path = Path(text).expanduser()
    if path.is_dir():
        return ImageFolderSource(path)
    if not path.exists():
        raise SourceError(f"video source {text!r} is not an existing file or folder, a camera index, a URL "
                          f"(rtsp://, http://) or 'synthetic'")
    return VideoSource(path)


def _as_bgr(image: Any, name: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3) or image.size == 0:
        raise SourceError(f"{name} gave a frame that is not an 8-bit image: "
                          f"{getattr(image, 'shape', None)} {getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.shape[2] != 3:
        raise SourceError(f"{name} gave a frame with {image.shape[2]} channels")
    return image
