"""Scene-change detection: the model only runs when the picture has really changed."""

from __future__ import annotations

import cv2
import numpy as np

# Mean absolute difference (grey levels, 0-255) between 32x32 grey thumbnails above which a frame
# counts as a new scene. Sensor noise averages out in the thumbnail (well below 1); the drifting
# objects of the synthetic source mostly stay below it (median 2, 90th percentile 6), while its
# scene changes are all above it (smallest 11) — as is a hand in front of a camera.
DEFAULT_SCENE_THRESHOLD = 8.0
THUMBNAIL_SIZE = 32


class SceneChangeDetector:
    """Decides whether a frame shows a new scene, compared with the last captioned frame.

    First a cheap check: mean absolute difference of small grey thumbnails (0-255 scale) against
    ``threshold`` (0 or less: every frame counts as new). Optionally, for frames that pass it, the
    cosine distance between image embeddings against ``embedding_threshold``.
    """

    def __init__(self, threshold: float = DEFAULT_SCENE_THRESHOLD, embedding_threshold: float | None = None,
                 thumbnail_size: int = THUMBNAIL_SIZE) -> None:
        self.threshold = float(threshold)
        self.embedding_threshold = embedding_threshold
        self.thumbnail_size = int(thumbnail_size)
        self._thumbnail: np.ndarray | None = None
        self._embedding: np.ndarray | None = None

    def thumbnail(self, image: np.ndarray) -> np.ndarray:
        small = cv2.resize(image, (self.thumbnail_size, self.thumbnail_size), interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float32)

    def pixel_difference(self, thumbnail: np.ndarray) -> float | None:
        if self._thumbnail is None:
            return None
        return float(np.mean(np.abs(thumbnail - self._thumbnail)))

    def pixel_changed(self, difference: float | None) -> bool:
        return difference is None or self.threshold <= 0 or difference > self.threshold

    def embedding_distance(self, embedding: np.ndarray) -> float | None:
        if self._embedding is None:
            return None
        a, b = embedding.ravel().astype(np.float64), self._embedding.ravel().astype(np.float64)
        norm = float(np.linalg.norm(a) * np.linalg.norm(b))
        return 1.0 - float(a @ b) / norm if norm > 0 else 1.0

    def remember(self, thumbnail: np.ndarray, embedding: np.ndarray | None = None) -> None:
        """Make this frame the reference (call it for every captioned frame)."""
        self._thumbnail = thumbnail
        self._embedding = embedding
