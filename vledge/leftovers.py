"""Hidden temporary files and folders of writes that were killed, and their safe removal.

Every atomic write here stages beside its target under a hidden name that records the
writer's process id: ``.<target>.<tag><pid>-<random><suffix>`` (``.last.pt.4242-k3j9x0aa.tmp``,
``.model.export-4242-q8w2e1zz``). A later write to the same target removes the leftovers of
earlier ones, but only names of exactly that pattern (nothing a user made), and only stale
ones: the writer's process is gone, or the entry is older than ``STALE_AFTER_S`` (a recycled
process id; also names from versions that recorded no pid).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

STALE_AFTER_S = 6 * 3600  # a live pid this old is a recycled one: no export or save takes that long
LEGACY_STALE_AFTER_S = 30 * 60  # names without a pid: older than any in-flight write of ours


def temp_prefix(target_name: str, tag: str = "") -> str:
    """The ``prefix`` for tempfile.mkstemp/mkdtemp that marks the entry as ours, with our pid."""
    return f".{target_name}.{tag}{os.getpid()}-"


def _pattern(target_name: str, tag: str, suffix: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(target_name)}\.{re.escape(tag)}(?:(\d+)-)?[a-z0-9_]{{8}}{re.escape(suffix)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists under another user, or cannot tell: keep it
    return True


def is_stale(pid: int | None, age_s: float) -> bool:
    if pid is None:
        return age_s > LEGACY_STALE_AFTER_S
    return not _alive(pid) or age_s > STALE_AFTER_S


def clean_stale(directory: Path, target_name: str, tag: str = "", suffix: str = "") -> list[Path]:
    """Remove stale leftovers of writes to ``directory/target_name``; the removed paths, for the log."""
    pattern = _pattern(target_name, tag, suffix)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            stat = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        pid = int(match[1]) if match[1] else None
        if not is_stale(pid, now - stat.st_mtime):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            log.warning("could not remove the stale leftover %s: %s", path, exc)
            continue
        log.info("removed %s, left behind by an interrupted write", path)
        removed.append(path)
    return removed
