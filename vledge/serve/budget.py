"""The global budget of decoded pixels: how much image memory all requests being decoded may hold at once."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from vledge.errors import RequestError


class PixelBudget:
    """Pixels reserved by the images being decoded now; a reservation past the total is refused with 429.

    Thread-safe: reservations are taken in the worker threads that decode, before decoding starts.
    """

    def __init__(self, total: int, retry_after_s: int) -> None:
        self.total = total
        self.retry_after_s = retry_after_s
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    @contextlib.contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        with self._lock:
            if self._held + pixels > self.total:
                raise RequestError(f"the server is decoding {self._held} pixels of other images; this image's "
                                   f"{pixels} would go over its budget of {self.total}; retry shortly",
                                   status=429, code="pixel_budget_exceeded", param="image_url.url",
                                   retry_after_s=self.retry_after_s)
            self._held += pixels
        try:
            yield
        finally:
            with self._lock:
                self._held -= pixels
