"""Reading a file a user or a model directory names: a regular file, checked by size first, read with a cap.

One helper for every such read, so that ``/dev/zero``, a FIFO, a directory or a file of gigabytes is one
typed error naming the file instead of a process that hangs or grows until it is killed. JSON read
through :func:`read_json` is also refused when nested deeper than :data:`MAX_JSON_DEPTH`.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from vledge.errors import DataError, VledgeError

MAX_IMAGE_FILE_BYTES = 256 << 20  # one image file (a 64-megapixel PNG fits)
MAX_JSON_BYTES = 256 << 20  # a JSON file: manifests, tokenizers, annotation files
MAX_TEXT_BYTES = 64 << 20  # a text file: batch lists, caption lists
MAX_JSON_DEPTH = 100  # objects and lists inside each other

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_capped(path: str | os.PathLike, max_bytes: int, error: type[VledgeError] = DataError,
                what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes``; anything else raises ``error`` naming it.

    The file is opened without blocking (a FIFO with no writer cannot hang the open), its type and size are
    checked on the open descriptor, and it is read with a cap (a file that grows while read is refused too).
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"cannot read {what} {name}: no such file") from None
    except OSError as exc:
        raise error(f"cannot read {what} {name}: {exc.strerror or exc}") from None
    except ValueError as exc:  # an embedded NUL, or a name the file system cannot encode
        raise error(f"cannot read {what} {name!r}: {exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"cannot read {what} {name}: it is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > max_bytes:
            raise error(f"cannot read {what} {name}: it has {info.st_size} bytes, over the limit of {max_bytes}")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise error(f"cannot read {what} {name}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if total > max_bytes:
        raise error(f"cannot read {what} {name}: it grew past the limit of {max_bytes} bytes while being read")
    return b"".join(chunks)


def check_regular(path: str | os.PathLike, max_bytes: int, error: type[VledgeError] = DataError,
                  what: str = "file") -> int:
    """The size of the regular file ``path`` (at most ``max_bytes``), for readers that open it themselves."""
    name = os.fspath(path)
    try:
        info = os.stat(name)
    except FileNotFoundError:
        raise error(f"cannot read {what} {name}: no such file") from None
    except (OSError, ValueError) as exc:
        raise error(f"cannot read {what} {name}: {getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"cannot read {what} {name}: it is {_kind(info.st_mode)}, not a regular file")
    if info.st_size > max_bytes:
        raise error(f"cannot read {what} {name}: it has {info.st_size} bytes, over the limit of {max_bytes}")
    return info.st_size


def read_text(path: str | os.PathLike, max_bytes: int = MAX_TEXT_BYTES, error: type[VledgeError] = DataError,
              what: str = "file") -> str:
    """A capped regular file as UTF-8 text (a BOM is dropped); not UTF-8 raises ``error`` naming the file."""
    data = read_capped(path, max_bytes, error, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"cannot read {what} {os.fspath(path)}: not UTF-8 text (byte {exc.start})") from None


def parse_json(text: str | bytes, source: str, error: type[VledgeError] = DataError) -> Any:
    """``json.loads`` whose failures, nesting past :data:`MAX_JSON_DEPTH` included, raise ``error``."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"cannot read {source}: nested too deeply (limit {MAX_JSON_DEPTH} levels)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {source}: not valid JSON ({exc})") from None
    check_depth(value, source, error)
    return value


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES, error: type[VledgeError] = DataError,
              what: str = "JSON file") -> Any:
    """A capped regular file parsed as JSON, with every failure one ``error`` naming the file."""
    return parse_json(read_text(path, max_bytes, error, what), f"{what} {Path(path)}", error)


def check_depth(value: Any, source: str, error: type[VledgeError] = DataError, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse containers nested deeper than ``limit`` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                raise error(f"cannot read {source}: nested more than {limit} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
