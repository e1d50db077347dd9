"""The command line: version, typed errors as one line, eval and caption on a trained checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from vledge import __version__
from vledge.cli import main


def test_version_and_help():
    runner = CliRunner()
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(main, ["--help"])
    for command in ("data", "train", "eval", "caption"):
        assert command in result.output


def test_eval_reports_per_task_accuracy_as_json(tiny_run, synth_data):
    result = CliRunner().invoke(main, ["eval", "--ckpt", str(tiny_run.best_checkpoint), "--data", str(synth_data),
                                       "--split", "test", "--limit", "40", "--json", "--examples", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["counts"]["overall"] == 40
    assert sum(v for k, v in report["counts"].items() if k != "overall") == 40
    assert all(0.0 <= v <= 1.0 for v in report["accuracy"].values())
    assert len(report["examples"]) == 3
    for example in report["examples"]:
        assert example["correct"] == (example["prediction"].strip().lower() == example["reference"].strip().lower())


def test_caption_names_bad_images_and_keeps_going(tiny_run, synth_data, tmp_path):
    good = sorted((synth_data / "images").iterdir())[0]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(good.read_bytes()[:100])
    result = CliRunner().invoke(main, ["caption", "--ckpt", str(tiny_run.best_checkpoint), str(bad), str(good)])
    assert result.exit_code == 1
    assert f"{good}:" in result.output  # the good image was still captioned
    assert "broken.jpg" in result.output and "1 of 2 images could not be read" in result.output


def test_typed_errors_become_one_clear_line(tmp_path):
    not_a_ckpt = tmp_path / "x.pt"
    not_a_ckpt.write_text("hello")
    done = subprocess.run([sys.executable, "-m", "vledge", "caption", "--ckpt", str(not_a_ckpt), "img.jpg"],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "CheckpointError" in done.stderr and str(not_a_ckpt) in done.stderr
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"),
                                       "--preset", "tiny"])
    assert result.exit_code == 1 and "DataError" in result.output
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                                       "--preset", "huge"])
    assert result.exit_code == 1 and "unknown preset" in result.output


def test_importing_vledge_and_its_runtime_never_imports_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None; "
            "import vledge, vledge.runtime, vledge.cli, vledge.decoding, vledge.metrics, vledge.prompt, "
            "vledge.tokenizer, vledge.data.synth, vledge.data.loaders; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_eval_skips_questions_whose_image_is_unreadable(tiny_run, synth_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    records = json.loads((data / "test.json").read_text())
    (data / records[0]["image"]).write_bytes(b"not an image")
    questions_of_first = len(records[0]["conversations"]) // 2
    result = CliRunner().invoke(main, ["eval", "--ckpt", str(tiny_run.best_checkpoint), "--data", str(data),
                                       "--split", "test", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["skipped_unreadable"] == questions_of_first
    total = sum(len(r["conversations"]) // 2 for r in records)
    assert report["counts"]["overall"] == total - questions_of_first


def test_caption_with_an_exported_model_runs_with_torch_blocked(tiny_model_dir, synth_data):
    from vledge.decoding import GenerationOptions
    from vledge.runtime import load

    image = sorted((synth_data / "images").iterdir())[0]
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
        "from vledge.cli import main\n"
        f"main(['caption', '--model', {str(tiny_model_dir)!r}, {str(image)!r}, '--provider', 'cpu', "
        "'--threads', '1', '--max-new-tokens', '6', '--jsonl'], standalone_mode=False)\n"
        "assert not any(n == 'torch' or n.startswith('torch.') for n, m in sys.modules.items() if m)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout.strip().splitlines()[-1])
    expected = load(tiny_model_dir, providers="cpu", threads=1).caption(image, GenerationOptions(max_new_tokens=6))
    assert line["image"] == str(image) and line["token_ids"] == expected.token_ids


def test_eval_takes_threads_defaults_to_the_free_cores_and_keeps_pipes_clean(tiny_run, synth_data, monkeypatch):
    """--threads sets torch's threads; without it, the cores the load average leaves free (as train); the
    progress bar stays off when stderr is not a terminal, so a pipe or log gets only the report."""
    import os

    import torch

    before = torch.get_num_threads()
    args = ["eval", "--ckpt", str(tiny_run.best_checkpoint), "--data", str(synth_data), "--limit", "8"]
    try:
        torch.set_num_threads(3)
        result = CliRunner().invoke(main, args + ["--threads", "1"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
        assert "overall" in result.stdout and result.stderr == ""
        monkeypatch.setattr(os, "cpu_count", lambda: 4)
        monkeypatch.setattr(os, "getloadavg", lambda: (2.2, 2.0, 2.0))
        result = CliRunner().invoke(main, args + ["--quiet"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_resumed_training_bar_counts_only_this_runs_steps():
    """Speed and time left come from the steps of this run: 10 steps in 10 s after resuming at step 100."""
    from vledge.cli.progress import training_bar
    from vledge.training.trainer import TrainEvent

    import io

    bar = training_bar(TrainEvent("start", 100, 400), desc="train", file=io.StringIO())
    bar.n = 110
    text = bar.format_meter(**{**bar.format_dict, "elapsed": 10.0})
    bar.close()
    assert "110/400" in text and "1.00step/s" in text and "04:50" in text, text
