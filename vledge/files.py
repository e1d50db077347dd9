"""Atomic writes for every file and folder vledge produces: a reader sees the old one or the new one, never half.

Each write goes to a temporary name beside its destination, is flushed to disk (``fsync``) and
renamed over it. Temporary files from ``mkstemp``/``mkdtemp`` are private (0600/0700); what lands
in place gets the modes an ordinary ``open``/``mkdir`` would give, ``0o666 & ~umask`` for files and
``0o777 & ~umask`` for folders (0644 and 0755 under the usual umask 022), so a model directory or
checkpoint copied to a server stays readable by the service user. A target that cannot be written
(no such folder, no permission, a folder where a file should go) is an ``OutputError`` naming it.
Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vledge.errors import OutputError
from vledge.leftovers import clean_stale, temp_prefix

_UMASK_LOCK = threading.Lock()  # guards the os.umask() round trip where /proc cannot tell


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new ordinary file gets: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode a new folder gets: 0o777 less the umask."""
    return 0o777 & ~current_umask()


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """OutputError now, before any work, when ``path`` cannot become a folder of ours.

    Probes for real (a folder made and removed in the nearest existing ancestor), because
    permission bits do not tell: root may write anywhere but in /proc, a mount may be read-only.
    Nothing is left behind.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {what} {path}: {ancestor} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".vledge-probe-", dir=ancestor))
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cannot_write(target: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {target}: {exc.strerror or exc}")


def commit(temp: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Flush a finished temporary file, give it the ordinary file mode and rename it over ``dst``."""
    temp, dst = Path(temp), Path(dst)
    try:
        _fsync_file(temp)
        os.chmod(temp, file_mode())
        os.replace(temp, dst)
    except OSError as exc:
        raise _cannot_write(dst, exc) from None
    _fsync_dir(dst.parent)
    return dst


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``dst`` for a writer that wants a file name (onnx.save, torch.save, ...).

    When the block succeeds the file is committed over ``dst``; when it fails it is removed and
    ``dst`` is untouched. The temporary file is named ``.<dst name>.<pid>-<random><suffix>``; the
    stale ones of killed writers to the same ``dst`` are removed first (see vledge.leftovers).
    """
    dst = Path(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(dst.parent, dst.name, suffix=suffix)
        handle, name = tempfile.mkstemp(prefix=temp_prefix(dst.name), suffix=suffix, dir=dst.parent)
    except OSError as exc:
        raise _cannot_write(dst, exc) from None
    os.close(handle)
    temp = Path(name)
    try:
        yield temp
        commit(temp, dst)
    finally:
        temp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as temp:
        with open(temp, "wb") as handle:
            handle.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2, **dumps: Any) -> Path:
    """Write ``value`` as JSON (with a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(value, indent=indent, **dumps) + "\n")


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, tag: str = "") -> Iterator[Path]:
    """A private staging folder beside ``dst`` that replaces it, with the ordinary folder mode, on success.

    An existing ``dst`` is moved aside and restored if the swap fails; on any error the staging
    folder is removed and ``dst`` is as it was. Checking whether replacing ``dst`` is allowed is
    the caller's job. The staging folder is ``.<dst name>.<tag><pid>-<random>.tmp``; stale ones
    of killed writers (and the pid-less names of earlier versions) are removed first.
    """
    dst = Path(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".tmp", ""):
            clean_stale(dst.parent, dst.name, tag=tag, suffix=suffix)
        staging = Path(tempfile.mkdtemp(prefix=temp_prefix(dst.name, tag), suffix=".tmp", dir=dst.parent))
    except OSError as exc:
        raise _cannot_write(dst, exc) from None
    try:
        yield staging
        try:
            os.chmod(staging, dir_mode())
            _swap_into_place(staging, dst)
        except OSError as exc:
            raise _cannot_write(dst, exc) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_into_place(staging: Path, dst: Path) -> None:
    if not (dst.exists() or dst.is_symlink()):
        os.replace(staging, dst)
        _fsync_dir(dst.parent)
        return
    old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(dst, old)
    try:
        os.replace(staging, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    _fsync_dir(dst.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def check_writable_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Make ``folder`` if needed and prove a file can be created in it, before any long work writes there.

    OutputError names the folder when it is a file, cannot be made, or refuses a new file (read-only, full).
    """
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".vledge-write-check-", dir=path)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write into {what} {path}: {exc.strerror or exc}") from None
    return path
