"""Training: it learns, resumes exactly, runs under DDP, and stops cleanly on a diverging loss."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_configs
from vledge.checkpoint import load_checkpoint
from vledge.data.records import TASKS
from vledge.errors import TrainingError
from vledge.training.trainer import Trainer, prepare_run, train

pytestmark = pytest.mark.slow


def rows(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_tiny_model_learns_and_writes_its_artifacts(tiny_run):
    run_dir = tiny_run.run_dir
    for name in ("ckpt.pt", "last.pt", "metrics.jsonl", "curves.png", "run.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_rows = rows(run_dir, "train")
    assert train_rows[-1]["step"] == 150
    assert {r["stage"] for r in train_rows} == {"align", "instruct"}
    first, last = train_rows[0]["loss"], train_rows[-1]["loss"]
    assert last < 0.6 * first, (first, last)
    evals = rows(run_dir, "eval")
    assert [e["step"] for e in evals] == [75, 150]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert 0.0 <= evals[-1]["accuracy"]["overall"] <= 1.0
    tasks = set(evals[-1]["accuracy"]) - {"overall"}
    assert "overall" in evals[-1]["accuracy"] and len(tasks) >= 4 and tasks <= set(TASKS)
    best = load_checkpoint(run_dir / "ckpt.pt")
    assert best.train_state is not None and "optimizer" not in best.train_state
    assert "optimizer" in load_checkpoint(run_dir / "last.pt").train_state


def test_interrupted_and_resumed_run_reproduces_the_loss_curve(synth_data, tmp_path):
    model_config, train_config = tiny_configs(max_steps=24, eval_every=100, eval_samples=0, log_every=1)
    straight = train(synth_data, tmp_path / "straight", model_config, train_config)

    def interrupt(event):
        if event.kind == "step" and event.step == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(synth_data, tmp_path / "broken", model_config, train_config, on_event=interrupt)
    assert load_checkpoint(tmp_path / "broken" / "last.pt").train_state["run"]["step"] == 13
    resumed = train(synth_data, tmp_path / "broken", model_config, train_config, resume=True)
    assert resumed.steps == straight.steps == 24

    expected = {r["step"]: r["loss"] for r in rows(tmp_path / "straight", "train")}
    got = {r["step"]: r["loss"] for r in rows(tmp_path / "broken", "train")}
    assert sorted(got) == sorted(expected) == list(range(1, 25))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    final_a = load_checkpoint(tmp_path / "straight" / "last.pt").state_dict
    final_b = load_checkpoint(tmp_path / "broken" / "last.pt").state_dict
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=1e-4, atol=1e-5)


def test_two_process_ddp_training_on_cpu(synth_data, tmp_path):
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vledge", "train", "--data", str(synth_data), "--preset", "tiny", "--out", str(run_dir),
               "--max-steps", "8", "--eval-every", "8", "--threads", "1", "--device", "cpu"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 2
    train_rows = rows(run_dir, "train")
    assert [r["step"] for r in train_rows] == sorted({r["step"] for r in train_rows})  # one writer only
    checkpoint = load_checkpoint(run_dir / "ckpt.pt")
    assert checkpoint.train_state["run"]["step"] == 8
    assert all(torch.isfinite(v).all() for v in checkpoint.state_dict.values() if v.is_floating_point())


def test_diverging_training_stops_with_a_clear_error_and_no_broken_checkpoint(synth_data, tmp_path):
    model_config, train_config = tiny_configs(max_steps=10, eval_every=1, eval_samples=0, lr=1e30, warmup_steps=0)
    with pytest.raises(TrainingError, match="non-finite"):
        train(synth_data, tmp_path / "nan", model_config, train_config)
    for name in ("ckpt.pt", "last.pt"):
        path = tmp_path / "nan" / name
        if path.exists():
            state = load_checkpoint(path).state_dict
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_broken_image_is_skipped_and_counted_not_fatal(synth_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    records = json.loads((data / "train.json").read_text())
    victim = data / records[0]["image"]
    victim.write_bytes(victim.read_bytes()[:60])  # truncated JPEG
    (data / records[1]["image"]).unlink()  # missing file
    model_config, train_config = tiny_configs(max_steps=2, eval_every=2, eval_samples=0)
    prepared = prepare_run(data, tmp_path / "run", model_config, train_config)
    assert prepared.train_report.skipped["image unreadable"] == 1
    assert prepared.train_report.skipped["image missing"] == 1
    assert records[0]["id"] not in prepared.train_images
    result = Trainer(prepared).run()
    assert result.steps == 2 and (tmp_path / "run" / "ckpt.pt").is_file()
    assert "skipped 2" in json.loads((tmp_path / "run" / "run.json").read_text())["data_report"]


def test_a_tie_in_accuracy_goes_to_the_lower_validation_loss_and_the_run_says_which_step_ckpt_holds(
        synth_data, tmp_path):
    """Two evaluations with the same exact-match accuracy (none right yet): ckpt.pt holds the one that fits better."""
    model_config, train_config = tiny_configs(max_steps=6, eval_every=3, eval_samples=4)
    result = train(synth_data, tmp_path / "run", model_config, train_config)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    first, second = evals
    assert first["accuracy"]["overall"] == second["accuracy"]["overall"]
    assert second["val_loss"] < first["val_loss"]
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt").metrics["step"] == 6
    assert (first["ckpt_step"], second["ckpt_step"], result.best_step) == (3, 6, 6)


def test_a_budget_cut_is_said_loudly_and_a_resume_with_no_time_left_is_refused(synth_data, tmp_path):
    """Plain `vledge train` names a budget cut and the command that finishes it; a resume whose budget is
    already spent fails with one line instead of reporting success with no new step; one with time trains on."""
    from click.testing import CliRunner

    from vledge.cli import main

    run = tmp_path / "run"
    first = CliRunner().invoke(main, ["train", "--data", str(synth_data), "--preset", "tiny", "--out", str(run),
                                      "--threads", "1", "--max-steps", "4000", "--eval-every", "4000",
                                      "--minutes", "0.005"])
    assert first.exit_code == 0, first.output
    step = load_checkpoint(run / "last.pt").train_state["run"]["step"]
    assert 0 < step < 4000
    lines = first.stdout.splitlines()
    assert any(line.startswith("!! TRAINING WAS CUT SHORT") and f"step {step:,} of 4,000" in line for line in lines)
    finish = [line for line in lines if line.startswith("!!   vledge train")]
    assert len(finish) == 1 and f"--out {run} --resume --minutes " in finish[0]

    spent = CliRunner().invoke(main, ["train", "--data", str(synth_data), "--out", str(run), "--resume"])
    assert spent.exit_code == 1
    assert spent.output.startswith("Error: TrainingError: ") and spent.output.count("\n") == 1, spent.output
    assert "budget" in spent.output and "--minutes" in spent.output
    assert load_checkpoint(run / "last.pt").train_state["run"]["step"] == step

    more = CliRunner().invoke(main, ["train", "--data", str(synth_data), "--out", str(run), "--resume",
                                     "--minutes", "0.03"])
    assert more.exit_code == 0, more.output
    now = load_checkpoint(run / "last.pt").train_state["run"]["step"]
    assert now > step and f"trained {now} steps" in more.stdout and f"({now - step} in this run)" in more.stdout


def test_resuming_a_finished_run_is_refused_before_any_work(tiny_run, synth_data, tmp_path):
    import shutil


    run = tmp_path / "done"
    run.mkdir()
    shutil.copy(tiny_run.last_checkpoint, run / "last.pt")
    model_config, train_config = tiny_configs()
    with pytest.raises(TrainingError, match="already trained all 150 planned steps"):
        train(synth_data, run, model_config, train_config, resume=True)
    assert sorted(p.name for p in run.iterdir()) == ["last.pt"]


def test_the_curves_mark_each_stage_change():
    from vledge.training.plot import stage_changes

    rows = [{"kind": "train", "step": s, "stage": "align" if s < 10 else "instruct", "loss": 1.0} for s in (1, 5, 10, 15)]
    rows.insert(2, {"kind": "eval", "step": 5, "stage": "align", "val_loss": 1.0})
    assert stage_changes(rows) == [(10, "instruct")]
    assert stage_changes(rows[:2]) == []
