"""Dataset JSON read so that one record nested absurdly deep cannot sink the whole file.

``json.load`` raises RecursionError for the whole document when any value nests deeper than
Python's recursion limit. Then the file is read again piece by piece: the top-level list's
elements (LLaVA records), or the top-level object's members and the elements of its lists
(COCO's ``annotations``), each parsed on its own; an element too deep becomes ``TOO_DEEP``
for the loader to skip and count, and everything else loads as usual.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from vledge.errors import DataError
from vledge.reads import MAX_JSON_BYTES, read_text

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class TooDeep:
    """Stands in for a value nested deeper than the JSON parser can follow."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "TOO_DEEP"


TOO_DEEP = TooDeep()


def read_json(path: Path) -> object:
    """The file's JSON value; any failure to read it as JSON at all is a DataError naming the file."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    text = read_text(path, MAX_JSON_BYTES, DataError, "annotation file")  # a regular file, size-capped, UTF-8
    try:
        try:
            return json.loads(text)
        except RecursionError:
            return loads_piecewise(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not a JSON file ({exc})") from None


def loads_piecewise(text: str) -> object:
    start = _skip_space(text, 0)
    levels = 1 if text[start:start + 1] == "[" else 2
    value, end = _value(text, start, levels)
    if _skip_space(text, end) != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def _skip_space(text: str, pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()


def _value(text: str, pos: int, levels: int) -> tuple[object, int]:
    if levels > 0 and text[pos:pos + 1] in ("[", "{"):
        return _container(text, pos, levels)
    try:
        return _DECODER.raw_decode(text, pos)
    except RecursionError:
        return TOO_DEEP, _end_of_container(text, pos)


def _container(text: str, pos: int, levels: int) -> tuple[object, int]:
    closing = "]" if text[pos] == "[" else "}"
    items: list | dict = [] if closing == "]" else {}
    pos = _skip_space(text, pos + 1)
    if text[pos:pos + 1] == closing:
        return items, pos + 1
    while True:
        if isinstance(items, dict):
            key, pos = _DECODER.raw_decode(text, pos)
            if not isinstance(key, str):
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
            pos = _skip_space(text, pos)
            if text[pos:pos + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
            pos = _skip_space(text, pos + 1)
        value, pos = _value(text, pos, levels - 1)
        if isinstance(items, dict):
            items[key] = value
        else:
            items.append(value)
        pos = _skip_space(text, pos)
        delimiter = text[pos:pos + 1]
        if delimiter == closing:
            return items, pos + 1
        if delimiter != ",":
            raise json.JSONDecodeError(f"Expecting ',' or '{closing}' delimiter", text, pos)
        pos = _skip_space(text, pos + 1)


def _end_of_container(text: str, pos: int) -> int:
    """Where the array or object starting at ``pos`` ends, counting brackets outside strings."""
    depth = 0
    index, length = pos, len(text)
    while index < length:
        char = text[index]
        if char == '"':
            index += 1
            while index < length and text[index] != '"':
                index += 2 if text[index] == "\\" else 1
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    raise json.JSONDecodeError("Unterminated array or object", text, pos)
