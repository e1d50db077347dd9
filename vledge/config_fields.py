"""Field checks and the plain-dict round trip of the config dataclasses (checkpoints and manifests store dicts).

Kept apart from ``vledge.config`` so that module holds only the configurations themselves.
"""

from __future__ import annotations

import dataclasses
import math
import typing

from vledge.errors import ConfigError


def require_positive(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"{owner}.{name} must be a positive finite number, got {value!r}")


def require_at_most(owner: str, **values: tuple[int | float, int | float]) -> None:
    """ConfigError for a number above its documented bound (value, bound) — checked before anything is built."""
    for name, (value, bound) in values.items():
        if value > bound:
            raise ConfigError(f"{owner}.{name} is {value:,}, more than the {bound:,} vledge allows")


def require_finite(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise ConfigError(f"{owner}.{name} must be finite, got {value!r}")


# --------------------------------------------------------------------------- dict round trip


def to_dict(config: typing.Any) -> dict:
    """A plain-container copy (lists, not tuples) fit for JSON and weights-only checkpoints."""

    def plain(value: typing.Any) -> typing.Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def from_dict(cls: type, data: typing.Mapping) -> typing.Any:
    """Rebuild a dataclass from ``to_dict`` output, rejecting unknown keys by name."""
    if not isinstance(data, typing.Mapping):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    kwargs = {key: _coerce(hints[key], value, f"{cls.__name__}.{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def _coerce(hint: typing.Any, value: typing.Any, where: str) -> typing.Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        # A base config whose concrete class depends on the data (a language model family's) reads itself.
        from_plain = getattr(hint, "__from_plain__", None)
        return from_plain(value) if from_plain is not None else from_dict(hint, value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where) if len(inner) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {type(value).__name__} {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected text, got {type(value).__name__} {value!r}")
    return value
