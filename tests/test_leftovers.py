"""Killed saves and exports leave hidden leftovers; the next write removes only stale ones of ours."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import export_tiny
from vledge.checkpoint import load_checkpoint, save_checkpoint


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_killed_save_leaves_a_temp_file_that_the_next_save_removes(tmp_path, tiny_run):
    target = tmp_path / "last.pt"
    script = (
        "import sys, time, torch\n"
        "from vledge.checkpoint import load_checkpoint, save_checkpoint\n"
        "checkpoint = load_checkpoint(sys.argv[1])\n"
        "def stuck(payload, name):\n"
        "    open(name, 'wb').write(b'PK')\n"
        "    print('saving', flush=True)\n"
        "    time.sleep(600)\n"
        "torch.save = stuck\n"
        "save_checkpoint(sys.argv[2], checkpoint)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(tiny_run.best_checkpoint), str(target)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "saving"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.pt.") and leftovers[0].endswith(".tmp")
    assert f".{child.pid}-" in leftovers[0]  # the writer's pid is in the name

    save_checkpoint(target, load_checkpoint(tiny_run.best_checkpoint))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_only_stale_leftovers_of_the_same_target_are_removed(tmp_path, tiny_run):
    dead, alive = _dead_pid(), os.getppid()
    stale = [f".last.pt.{dead}-abcd1234.tmp", ".last.pt.k3j9x0aa.tmp"]  # a dead writer; an old pid-less name
    kept = [
        f".last.pt.{alive}-abcd1234.tmp",  # a save in progress in another live process
        ".last.pt.q8w2e1zz.tmp",  # pid-less but fresh: maybe in progress
        f".best.pt.{dead}-abcd1234.tmp",  # another target's
        ".last.pt.notes.tmp", "last.pt.abcd1234.tmp", f".last.pt.{dead}-abcd1234.tmp.keep",  # not our pattern
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    _age(tmp_path / ".last.pt.k3j9x0aa.tmp", 3600)
    save_checkpoint(tmp_path / "last.pt", load_checkpoint(tiny_run.best_checkpoint))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["last.pt"])


@pytest.mark.slow
def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(tmp_path, tiny_run, synth_data):
    dead, alive = _dead_pid(), os.getppid()
    for stale in (tmp_path / f".model.export-{dead}-abcd1234.tmp", tmp_path / f".model.export-{dead}-wxyz9876"):
        (stale / "onnx").mkdir(parents=True)
        (stale / "onnx" / "vision_encoder.onnx").write_bytes(b"partial")
    legacy = tmp_path / ".model.export-k3j9x0aa"
    legacy.mkdir()
    _age(legacy, 3600)
    busy = tmp_path / f".model.export-{alive}-abcd1234.tmp"
    busy.mkdir()
    other = tmp_path / f".other.export-{dead}-abcd1234"
    other.mkdir()
    export_tiny(tiny_run, synth_data, tmp_path / "model", parity_samples=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", busy.name, other.name])
