"""Typed errors: every failure a user can cause names the thing at fault."""

from __future__ import annotations


class VledgeError(Exception):
    """Base of every error vledge raises on purpose."""


class ConfigError(VledgeError, ValueError):
    """A configuration value, preset name or option is invalid."""


class DataError(VledgeError):
    """A dataset, annotation file or record cannot be used."""


class ImageError(DataError):
    """An image is missing, unreadable, truncated, too large or of a wrong type."""


class TokenizerError(VledgeError):
    """A tokenizer cannot be trained, loaded or lacks required special tokens."""


class CheckpointError(VledgeError):
    """A checkpoint is missing, truncated, not a vledge checkpoint, or unsafe."""


class WeightsError(VledgeError):
    """Pretrained weights were asked for but are not available locally."""


class TrainingError(VledgeError):
    """Training cannot continue (non-finite loss, nothing to train, ...)."""


class ModelDirError(VledgeError):
    """A model directory that is missing, malformed, tampered with or unsafe to read."""


class InferenceError(VledgeError):
    """A model's graphs gave values no answer can come from (NaN or infinite logits or image features)."""


class ProviderError(VledgeError):
    """An execution provider was asked for but is not really available, or ran the graph elsewhere."""


class ExportError(VledgeError):
    """An export cannot be written, or its graphs fail the parity gate against the PyTorch model."""


class QuantizationError(ExportError):
    """A graph cannot be optimised, quantized or converted to another precision as asked."""


class OutputError(VledgeError):
    """An output file or folder cannot be written where it was asked for."""


class DisplayError(VledgeError):
    """A window was asked for on a display, but the installed OpenCV build has no GUI support."""


class SourceError(VledgeError):
    """A camera, video file, stream URL or image folder cannot be opened or stops delivering frames."""


class RequestError(VledgeError):
    """A request to ``vledge serve`` that cannot be answered as asked; carries its HTTP status and error code."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request", param: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s


class BatchError(VledgeError):
    """A bulk captioning run cannot go on: a worker process died, or the Ray cluster cannot run it."""
