"""One bad training record is skipped and counted, never a crash; image paths stay inside the dataset."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vledge.data.loaders import load_records

DEPTH = 200_000  # far beyond Python's recursion limit


def _turns(question="<image>\nWhat is in this image?", answer="a red circle"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _write_hostile(folder, synth_data, outside_image):
    """A LLaVA file with three good records and one of every kind of bad one; JSON text written by hand."""
    (folder / "images").mkdir(parents=True)
    for name, image in zip(("a.jpg", "b.jpg"), sorted((synth_data / "images").iterdir())):
        shutil.copy(image, folder / "images" / name)
    good = [{"id": f"good-{i}", "image": "images/a.jpg", "conversations": _turns()} for i in range(3)]
    bad = {
        "long path": {"id": "long", "image": "x" * 5000 + ".jpg", "conversations": _turns()},
        "long folder": {"id": "long-dir", "image": ("d" * 250 + "/") * 30 + "a.jpg", "conversations": _turns()},
        "surrogate answer": {"id": "sur-a", "image": "images/a.jpg", "conversations": _turns(answer="red \ud800")},
        "surrogate question": {"id": "sur-q", "image": "images/a.jpg",
                               "conversations": _turns(question="<image>\nwhat \udfff?")},
        "surrogate path": {"id": "sur-p", "image": "images/\ud83d.jpg", "conversations": _turns()},
        "parent path": {"id": "up", "image": "../../../" + outside_image.name, "conversations": _turns()},
        "absolute path": {"id": "abs", "image": str(outside_image), "conversations": _turns()},
        "system file": {"id": "passwd", "image": "/etc/passwd", "conversations": _turns()},
    }
    pieces = [json.dumps(r) for r in good] + [json.dumps(r) for r in bad.values()]
    nested = '{"id": "deep", "image": "images/a.jpg", "conversations": ' + "[" * DEPTH + "]" * DEPTH + "}"
    deep_answer = ('{"id": "deep-answer", "image": "images/a.jpg", "conversations": [{"from": "human", "value": '
                   '"<image>"}, {"from": "gpt", "value": ' + "[" * DEPTH + "]" * DEPTH + "}]}")
    text = "[" + ", ".join(pieces[:2] + [nested] + pieces[2:] + [deep_answer]) + "]"
    (folder / "train.json").write_text(text, encoding="utf-8")
    (folder / "val.json").write_text(text.replace("images/a.jpg", "images/b.jpg"), encoding="utf-8")
    return len(good), len(bad) + 2


@pytest.fixture()
def hostile(tmp_path, synth_data):
    outside = tmp_path / "outside.jpg"
    shutil.copy(sorted((synth_data / "images").iterdir())[1], outside)
    folder = tmp_path / "deep" / "er" / "data"
    good, bad = _write_hostile(folder, synth_data, outside)
    return folder, good, bad, outside


def test_every_bad_record_is_skipped_and_counted(hostile):
    folder, good, bad, _ = hostile
    records, report = load_records(folder)
    assert [r.id for r in records] == [f"good-{i}" for i in range(good)]
    assert sum(report.skipped.values()) == bad, report.skipped
    assert report.skipped.get("image outside the dataset folder") == 3
    assert report.skipped.get("nested too deep") == 2
    assert report.skipped.get("text not valid Unicode") == 3


def test_paths_outside_the_dataset_are_kept_only_when_allowed(hostile):
    folder, good, _, outside = hostile
    records, report = load_records(folder, allow_outside_paths=True)
    kept = {r.id: r.image for r in records}
    assert kept["abs"] == outside and kept["up"].resolve() == outside.resolve()
    assert kept["passwd"] == Path("/etc/passwd")  # the user's choice; decoding it fails later, one skip
    assert report.skipped.get("image outside the dataset folder") is None


def _vledge(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "vledge", *args], capture_output=True, text=True, timeout=timeout)


def test_data_inspect_reports_instead_of_crashing(hostile):
    folder = hostile[0]
    done = _vledge("data", "inspect", str(folder))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "kept 3" in done.stdout and "nested too deep" in done.stdout


@pytest.mark.slow
def test_train_skips_the_bad_records_and_trains_on_the_rest(hostile, tmp_path):
    folder = hostile[0]
    done = _vledge("train", "--data", str(folder), "--out", str(tmp_path / "run"), "--preset", "tiny",
                   "--max-steps", "2", "--eval-every", "2", "--threads", "1", "--device", "cpu")
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "ckpt.pt").is_file()
