"""What ``vledge serve`` is told: every limit and switch of the server, checked once here."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from vledge.errors import ConfigError
from vledge.runtime.model import MAX_IMAGES_PER_PROMPT

API_KEY_ENV = "VLEDGE_API_KEY"

# (field, lowest, highest) of the request limits: each is checked once here, before the server starts.
_BOUNDS = (
    ("max_messages", 1, 10_000),
    ("max_text_chars", 1, 1 << 20),
    ("max_image_pixels", 1, 64_000_000),  # the runtime's own decoding limit
    ("max_pixels_in_flight", 1, 1 << 31),
    ("max_header_bytes", 1024, 1 << 20),
    ("max_images", 1, MAX_IMAGES_PER_PROMPT),  # what the runtime takes in one prompt
)


@dataclass(frozen=True)
class ServeOptions:
    """Server settings; the model's own settings (precision, providers, threads) go to ``vledge.runtime.load``."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    max_batch: int = 8  # rows in one batched generation; 1 turns batching off
    batch_window_ms: float = 5.0  # how long the first request of a batch waits for others to join
    max_queue: int = 64  # requests waiting for a batch; one more gets 429
    api_key: str | None = None  # None: no authentication
    max_body_bytes: int = 16 << 20  # request body, base64 image included
    max_image_bytes: int = 8 << 20  # one decoded image file
    max_new_tokens_limit: int = 64  # the most tokens a request may ask for (and what it gets when it asks for none)
    request_timeout_s: float = 60.0  # per request, from arrival to the last token: 504 after this
    retry_after_s: int = 1  # the Retry-After header of 429 and 503 answers
    model_name: str | None = None  # the id in /v1/models and answers (default: the model folder's name)
    max_messages: int = 32  # messages in one request (system messages included)
    max_text_chars: int = 16384  # characters of text in one request, all messages together
    max_image_pixels: int = 16_000_000  # width x height of one decoded image
    # image_url parts in one request, for models that take several images in one prompt (tiled models such as
    # SmolVLM: each image is up to ~17 tiles through the vision encoder); other models take exactly one
    max_images: int = 4
    max_pixels_in_flight: int = 64_000_000  # decoded pixels of all requests being decoded at once; more: 429
    max_header_bytes: int = 64 << 10  # a request's line and headers together; more: the connection is closed
    docs: bool = False  # serve /docs, /redoc and /openapi.json (behind the API key when one is set)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip():
            raise ConfigError("host must be a non-empty address or name")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535 (0: any free port), got {self.port}")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.batch_window_ms < 0:
            raise ConfigError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if self.max_queue < 1:
            raise ConfigError(f"max_queue must be at least 1, got {self.max_queue}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key must not be empty (leave it unset to serve without a key)")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.max_image_bytes < 1:
            raise ConfigError(f"max_image_bytes must be at least 1, got {self.max_image_bytes}")
        if self.max_new_tokens_limit < 1:
            raise ConfigError(f"max_new_tokens_limit must be at least 1, got {self.max_new_tokens_limit}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.retry_after_s < 0:
            raise ConfigError(f"retry_after_s must be >= 0, got {self.retry_after_s}")
        for name, low, high in _BOUNDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be an integer in {low}..{high}, got {value!r}")
        if self.max_image_pixels > self.max_pixels_in_flight:
            raise ConfigError(f"max_image_pixels ({self.max_image_pixels}) must not exceed max_pixels_in_flight "
                              f"({self.max_pixels_in_flight}): no image could ever be decoded")
        if self.model_name is not None and not self.model_name.strip():
            raise ConfigError("model_name must not be empty")

    @property
    def batching(self) -> bool:
        return self.max_batch > 1

    @property
    def loopback(self) -> bool:
        """Whether the bind address is reachable from this machine only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
