"""Atomic writes: ordinary modes under the user's umask, and nothing half-written or left behind."""

from __future__ import annotations

import json
import os

import pytest

from vledge import files


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def test_umask_is_read_without_changing_it(umask):
    assert files.current_umask() == umask
    assert os.umask(umask) == umask  # still what the fixture set


def test_files_and_folders_get_the_modes_open_and_mkdir_would(umask, tmp_path):
    files.write_text(tmp_path / "a.txt", "hé\n")
    files.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    files.write_json(tmp_path / "c.json", {"x": [1, 2]})
    with files.atomic_path(tmp_path / "d.onnx", suffix=".onnx") as temp:
        temp.write_bytes(b"graph")
    with files.atomic_directory(tmp_path / "folder") as staging:
        (staging / "inner").mkdir()
        files.write_text(staging / "inner" / "e.txt", "e")
    expected_file, expected_dir = 0o666 & ~umask, 0o777 & ~umask
    for name in ("a.txt", "b.bin", "c.json", "d.onnx", "folder/inner/e.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected_file, name
    for name in ("folder", "folder/inner"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected_dir, name
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "hé\n"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "c.json").read_text().endswith("\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.json", "d.onnx", "folder"]


def test_save_torch_round_trips_with_the_file_mode(umask, tmp_path):
    torch = pytest.importorskip("torch")
    from vledge.torch_io import save_torch

    path = save_torch({"w": torch.arange(3)}, tmp_path / "x.pt")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert torch.load(path, weights_only=True)["w"].tolist() == [0, 1, 2]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "report.json"
    files.write_json(target, {"old": True})
    with pytest.raises(RuntimeError, match="writer died"):
        with files.atomic_path(target) as temp:
            temp.write_text("half")
            raise RuntimeError("writer died")
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    with pytest.raises(TypeError):
        files.write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_atomic_directory_replaces_or_keeps_the_old_one(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_directory(target) as staging:
            (staging / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    with files.atomic_directory(target, tag="export-") as staging:
        assert staging.name.startswith(".model.export-") and staging.parent == tmp_path
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_commit_moves_a_finished_file_into_place(umask, tmp_path):
    partial = tmp_path / ".video.partial.mp4"
    partial.write_bytes(b"frames")
    os.chmod(partial, 0o600)
    done = files.commit(partial, tmp_path / "video.mp4")
    assert done == tmp_path / "video.mp4" and done.read_bytes() == b"frames"
    assert done.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not partial.exists()



def test_targets_that_cannot_be_written_are_output_errors_naming_them(tmp_path):
    from vledge.errors import OutputError

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write .*a-file/report.json"):
        files.write_json(blocker / "report.json", {})
    with pytest.raises(OutputError, match="cannot write .*a-file/model"):
        with files.atomic_directory(blocker / "model"):
            raise AssertionError("the block must not run")
    folder = tmp_path / "taken"
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(OutputError, match="cannot write .*taken"):
        files.write_text(folder, "a folder is in the way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "taken"]
