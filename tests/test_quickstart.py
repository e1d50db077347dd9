"""The quickstart pipeline end to end on the tiny preset: every promised artifact exists and is real."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from vledge.errors import ConfigError
from vledge.quickstart import STRUCTURED_TASKS, QuickstartConfig, run_quickstart, structured_accuracy


@pytest.mark.slow
def test_quickstart_tiny_produces_every_artifact(tmp_path):
    out = tmp_path / "qs"
    steps = []
    config = QuickstartConfig(out=out, preset="tiny", size=160, minutes=None, max_steps=30, vision_pretrain_steps=10,
                              threads=1,
                              parity_samples=12, bench_repeats=3, bench_parity_samples=8, captions=3,
                              demo_frames=12)
    summary = run_quickstart(config, progress=steps.append)
    assert [s.split()[0] for s in steps if s[:1].isdigit()] == [f"{i}/8" for i in range(1, 9)]

    for name in ("data", "vision", "checkpoint", "eval", "model", "bench", "captions", "demo", "summary"):
        assert Path(summary.artifacts[name]).exists(), name
    assert (out / "data" / "test.json").is_file() and (out / "run" / "ckpt.pt").is_file()
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["counts"]["overall"] > 0
    assert summary.structured_accuracy == pytest.approx(
        structured_accuracy(evaluation["accuracy"], evaluation["counts"]))
    manifest = json.loads((out / "model" / "vledge.json").read_text())
    assert "fp32" in manifest["parity"]["variants"] and manifest["selected"]["cpu"]
    bench = json.loads((out / "bench" / "bench.json").read_text())
    assert {"pytorch", "ort-cpu-fp32"} <= set(bench["engines"])
    assert summary.latency and all(row["caption_ms"] > 0 for row in summary.latency)
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 3 and all(isinstance(c["caption"], str) and c["reference"] for c in captions)
    video = cv2.VideoCapture(str(out / "demo.mp4"))
    assert video.isOpened() and int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    video.release()
    saved = json.loads((out / "summary.json").read_text())
    assert saved["structured_accuracy"] == pytest.approx(summary.structured_accuracy)
    text = summary.describe()
    assert "held-out accuracy" in text and "caption latency" in text and str(out / "model") in text


def test_quickstart_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        run_quickstart(QuickstartConfig(out=tmp_path, size=100))
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_structured_accuracy_pools_by_question_count():
    accuracy = {"count": 1.0, "color": 0.0, "caption": 0.5}
    counts = {"count": 30, "color": 10, "caption": 100}
    assert structured_accuracy(accuracy, counts) == pytest.approx(0.75)
    assert set(STRUCTURED_TASKS) >= {"count", "color"}


@pytest.mark.slow
def test_a_budget_that_cuts_training_short_is_said_loudly_with_the_command_that_finishes_it(tmp_path, synth_data):
    import subprocess
    import sys

    from vledge.checkpoint import load_checkpoint
    from vledge.quickstart import QuickstartSummary, _train, finish_commands

    config = QuickstartConfig(out=tmp_path, preset="tiny", size=50, minutes=0.01, max_steps=60,
                              vision_pretrain_steps=0, threads=1)
    run_dir = tmp_path / "run"
    result, planned = _train(config, synth_data, run_dir, threads=1, on_event=None)
    assert planned == 60 and result.steps < planned  # 0.6 s is not enough for 60 steps
    summary = QuickstartSummary(out=tmp_path, train_steps=result.steps, planned_steps=planned, budget_minutes=0.01,
                                finish_commands=finish_commands(result, planned, synth_data, run_dir, tmp_path / "m"))
    text = summary.describe()
    assert summary.cut_short and summary.to_dict()["cut_short"] is True
    assert "TRAINING WAS CUT SHORT" in text and f"step {result.steps:,} of 60" in text
    assert text.splitlines()[0].startswith("!!") and text.splitlines()[-1].startswith("!!")
    resume = summary.finish_commands[0]
    assert resume.startswith("vledge train ") and "--resume" in resume and "--minutes" in resume

    done = subprocess.run([sys.executable, "-m", "vledge", *resume.split()[1:]], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_checkpoint(run_dir / "last.pt").train_state["run"]["step"] == planned  # the job is finished

    whole = QuickstartSummary(out=tmp_path, train_steps=60, planned_steps=60, budget_minutes=12.0)
    assert not whole.cut_short and "CUT SHORT" not in whole.describe()


def test_the_default_thread_count_leaves_busy_cores_alone(monkeypatch):
    import os

    from vledge.quickstart import default_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for load, threads in ((0.05, 2), (0.4, 2), (1.0, 1), (1.3, 1), (13.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert default_threads() == threads, load
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    assert default_threads() == 6


def test_the_bottom_banner_points_up_at_the_accuracy():
    from vledge.quickstart import QuickstartSummary

    summary = QuickstartSummary(out=Path("qs"), train_steps=10, planned_steps=40, budget_minutes=1.0,
                                finish_commands=["vledge train --resume"], accuracy={"count": 0.5})
    lines = summary.describe().splitlines()
    accuracy_line = next(i for i, line in enumerate(lines) if line.startswith("held-out accuracy"))
    above = [i for i, line in enumerate(lines) if "accuracy above" in line]
    below = [i for i, line in enumerate(lines) if "accuracy below" in line]
    assert len(above) == len(below) == 1 and below[0] < accuracy_line < above[0]


def test_a_sample_caption_is_compared_with_the_answer_to_the_question_asked(tiny_model_dir, synth_data):
    from vledge.data.loaders import load_records
    from vledge.quickstart import _captions

    config = QuickstartConfig(out=Path("unused"), captions=6)
    rows = _captions(config, tiny_model_dir, synth_data, threads=1)
    records = {str(r.image): r for r in load_records(synth_data, split="test")[0]}
    assert len(rows) == 6
    for row in rows:
        turns = [t for t in records[row["image"]].turns if t.question == row["question"]]
        assert turns and turns[0].task == "caption" and row["reference"] == turns[0].answer
