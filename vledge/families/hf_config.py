"""Typed, bounded reading of a Hugging Face config.json: a number is a number in range, or a one-line ConfigError.

A saved config keeps only what differs from its class's defaults, so every read names the default the family
spells out. The bounds keep a hostile or garbled file from asking for minutes of work or hundreds of GB before
anything is checked (docs/families.md lists them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from vledge.errors import ConfigError

# Bounds on the numbers a config may give (well above every released model's).
MAX_LAYERS = 512
MAX_WIDTH = 131_072  # hidden and MLP widths
MAX_HEADS = 1_024
MAX_HEAD_DIM = 1_024
MAX_VOCAB = 4_194_304
MAX_POSITIONS = 16_777_216
MAX_IMAGE_SIZE = 8_192
MAX_PATCH = 1_024

_MISSING = object()


class HFConfig:
    """``config`` with ``defaults`` under it; every accessor checks type and range and names ``where`` on failure."""

    def __init__(self, config: Mapping[str, Any], where: str, defaults: Mapping[str, Any] | None = None) -> None:
        if not isinstance(config, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(config).__name__}")
        self.values = {**(defaults or {}), **{k: v for k, v in config.items() if v is not None}}
        self.where = where

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.values:
            return self.values[key]
        if default is _MISSING:
            raise ConfigError(f"{self.where} has no {key}")
        return default

    def has(self, key: str) -> bool:
        return key in self.values

    def int(self, key: str, low: int = 1, high: int = MAX_WIDTH, default: Any = _MISSING) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{self.where}: {key} must be an integer, got {type(value).__name__} {value!r}")
        if not low <= value <= high:
            raise ConfigError(f"{self.where}: {key} = {value} is outside [{low}, {high:,}]")
        return value

    def float(self, key: str, low: float | None = None, high: float | None = None, positive: bool = False,
              default: Any = _MISSING) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.where}: {key} must be a number, got {type(value).__name__} {value!r}")
        value = float(value)
        if not math.isfinite(value) or (positive and value <= 0):
            raise ConfigError(f"{self.where}: {key} must be a {'positive ' if positive else ''}finite number, "
                              f"got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(f"{self.where}: {key} = {value} is outside [{low}, {high}]")
        return value

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}: {key} must be true or false, got {type(value).__name__} {value!r}")
        return value

    def str(self, key: str, choices: tuple[str, ...] | None = None, default: Any = _MISSING) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self.where}: {key} must be text, got {type(value).__name__} {value!r}")
        if choices is not None and value not in choices:
            raise ConfigError(f"{self.where}: {key} {value!r} is not supported; supported: {', '.join(choices)}")
        return value

    def mapping(self, key: str, default: Any = _MISSING) -> dict[str, Any] | None:
        value = self.raw(key, default)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self.where}: {key} must be a JSON object, got {type(value).__name__} {value!r}")
        return dict(value)
