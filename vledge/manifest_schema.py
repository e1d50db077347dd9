"""The shape of ``vledge.json``, checked once before any field is used.

A small hand-written checker (the base install stays small): each rule is a function that
raises ModelDirError naming the JSON path of the first value of the wrong type or range.
The model config inside is checked by its own dataclasses; this covers the rest.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from vledge.errors import ModelDirError

Rule = Callable[[Any, str], None]
COMPONENTS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
PRECISIONS = ("fp32", "fp16", "int8", "q4")
SPECIAL_TOKENS = ("pad", "eos", "image")  # required; "bos" and "unk" only where the tokenizer has them
SHA256 = re.compile(r"[0-9a-f]{64}")


def _fail(path: str, expected: str, value: Any) -> None:
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    raise ModelDirError(f"{path} must be {expected}, got {shown[:80]}")


def text(value: Any, path: str) -> None:
    if not isinstance(value, str):
        _fail(path, "text", value)


def count(value: Any, path: str) -> None:
    """An integer >= 0 (JSON booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(path, "an integer >= 0", value)


def positive(value: Any, path: str) -> None:
    count(value, path)
    if value == 0:
        _fail(path, "an integer > 0", value)


def boolean(value: Any, path: str) -> None:
    if not isinstance(value, bool):
        _fail(path, "true or false", value)


def number(value: Any, path: str) -> None:
    """A finite JSON number (not a boolean)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")):
        _fail(path, "a finite number", value)


def anything(value: Any, path: str) -> None:
    pass


def mapping(value: Any, path: str) -> None:
    if not isinstance(value, dict):
        _fail(path, "an object", value)


def one_of(*choices: str) -> Rule:
    def rule(value: Any, path: str) -> None:
        if value not in choices:
            _fail(path, f"one of {', '.join(choices)}", value)
    return rule


def sha256(value: Any, path: str) -> None:
    if not isinstance(value, str) or not SHA256.fullmatch(value):
        _fail(path, "a sha256 in 64 lowercase hex digits", value)


def list_of(item: Rule, non_empty: bool = False) -> Rule:
    def rule(value: Any, path: str) -> None:
        if not isinstance(value, list) or (non_empty and not value):
            _fail(path, "a non-empty list" if non_empty else "a list", value)
        for index, element in enumerate(value):
            item(element, f"{path}[{index}]")
    return rule


def map_of(key: Rule, item: Rule, non_empty: bool = False) -> Rule:
    def rule(value: Any, path: str) -> None:
        if not isinstance(value, dict) or (non_empty and not value):
            _fail(path, "a non-empty object" if non_empty else "an object", value)
        for name, element in value.items():
            key(name, f"{path} key")
            item(element, f"{path}.{name}")
    return rule


def record(required: dict[str, Rule], optional: dict[str, Rule] | None = None, extra: bool = True) -> Rule:
    """An object with these keys (``extra``: other keys are allowed and not checked)."""
    optional = optional or {}

    def rule(value: Any, path: str) -> None:
        mapping(value, path)
        for name, item in required.items():
            if name not in value:
                raise ModelDirError(f"{path} lacks {name!r}")
            item(value[name], f"{path}.{name}" if path else name)
        for name, item in optional.items():
            if name in value and value[name] is not None:
                item(value[name], f"{path}.{name}" if path else name)
        if not extra:
            unknown = sorted(set(value) - set(required) - set(optional))
            if unknown:
                raise ModelDirError(f"{path} has unknown keys {unknown}")
    return rule


def both(first: Rule, second: Rule) -> Rule:
    def rule(value: Any, path: str) -> None:
        first(value, path)
        second(value, path)
    return rule


def _component_names(rule: Rule) -> Rule:
    return map_of(one_of(*COMPONENTS), rule)


MANIFEST = record(
    required={
        "format": text,
        "format_version": count,
        "architecture": record({"image_tokens": positive}),
        "model_config": record({}, {"special_tokens": map_of(text, text)}),
        "special_tokens": both(record({name: count for name in SPECIAL_TOKENS}), map_of(text, count)),
        "prefix_ids": list_of(count),
        "tensors": record({c: record({"inputs": list_of(text, True), "outputs": list_of(text, True)})
                           for c in COMPONENTS}),
        "variants": record({c: map_of(one_of(*PRECISIONS), text, non_empty=True) for c in COMPONENTS}),
        "files": map_of(text, record({"sha256": sha256, "size": count}), non_empty=True),
    },
    optional={
        "selected": map_of(text, _component_names(one_of(*PRECISIONS))),
        "generation": record({}, {"max_new_tokens": positive, "caption_prompt": text,
                                  "eos_token_id": count, "pad_token_id": count,
                                  "stop_token_ids": list_of(count, True)}),
        "parity": mapping,
        "provenance": mapping,
        "prompt": map_of(text, text),  # a copy of model_config.prompt, for readers of the folder
        "preprocess": record({}, {"image_size": positive, "resize_size": positive, "resize": text,
                                  "interpolation": text, "crop_anchor": text, "channel_order": text,
                                  "mean": list_of(number, True), "std": list_of(number, True),
                                  # a tiled model's (Idefics3 / SmolVLM) tiles: what a reader needs to build its
                                  # prompt (docs/model-directory.md); null for one image_size square per image
                                  "tiles": record({"longest_edge": positive, "split": boolean,
                                                   "tokens_per_tile": positive, "fake_token": text,
                                                   "global_token": text})}),
    },
)


def validate_manifest(data: Any, source: str) -> None:
    """ModelDirError naming ``source`` and the first bad field, or nothing."""
    try:
        MANIFEST(data, "")
    except ModelDirError as exc:
        raise ModelDirError(f"{source} is malformed: {str(exc).lstrip('.')}") from None
