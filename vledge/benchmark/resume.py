"""Continuing a stopped benchmark: which settings an earlier bench.json was measured with, and
whether it may be continued under the present ones."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from vledge.errors import ConfigError


def settings_of(config) -> dict:
    """The configuration as bench.json stores it (paths as strings, lists for tuples), with
    ``inputs_sha256``: a re-export or a retrained checkpoint at the same path is another setting."""
    settings = json.loads(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}))
    settings["inputs_sha256"] = _inputs_digest(config)
    return settings


def _inputs_digest(config) -> str:
    """sha256 over the checkpoint and the model directory's manifest (which holds every file's sha256)."""
    digest = hashlib.sha256()
    for path in (Path(config.ckpt) if config.ckpt is not None else None, Path(config.model_dir) / "vledge.json"):
        if path is None:  # no checkpoint: the model directory alone
            digest.update(b"no checkpoint")
            continue
        try:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError:  # not there or unreadable: loading it names the problem
            digest.update(b"unreadable")
    return digest.hexdigest()


def resumable(previous: dict, settings: dict, engines: list[str]) -> dict:
    """``previous`` (an earlier bench.json) when it was measured with these settings and engines;
    a ConfigError naming what differs otherwise."""
    if not isinstance(previous, dict) or not isinstance(previous.get("config"), dict):
        raise ConfigError("the earlier bench.json is not a vledge benchmark result; use another --out "
                          "or leave out --resume")
    before = previous["config"]
    differ = [f"{k} {before.get(k)!r} then, {settings.get(k)!r} now" if k != "inputs_sha256"
              else "the checkpoint or the model directory's files have changed"
              for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
    if not differ and previous.get("engines") != engines:
        differ.append(f"engines {previous.get('engines')!r} then, {engines!r} now")
    if differ:
        raise ConfigError(f"cannot resume: the earlier benchmark used other settings ({'; '.join(differ)}); "
                          "use another --out or leave out --resume")
    return previous
