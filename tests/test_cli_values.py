"""Every bad command-line value ends in one line ``Error: <Type>: <message>`` and a non-zero exit."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ERROR_LINE = re.compile(r"^Error: [A-Za-z]+(Error)?: .+")


def _vledge(args, cwd=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "vledge", *args], capture_output=True, timeout=timeout, cwd=cwd,
                          env=env)


def _assert_one_error_line(done, *words):
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode != 0, stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]), stderr[-3000:]
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _train(tmp_path, synth_data, *extra):
    return ["train", "--data", str(synth_data), "--preset", "tiny", "--max-steps", "2", "--threads", "1",
            "--out", str(tmp_path / "run"), *extra]


@pytest.mark.parametrize("extra, words", [
    (("--lr", "-1"), ("lr",)),
    (("--lr", "nan"), ("lr",)),
    (("--lr", "inf"), ("lr",)),
    (("--device", "bogus"), ("device", "bogus")),
    (("--device", "cuda:x"), ("device",)),
    (("--max-steps", "100000000000000000000000"), ("max_steps",)),
    (("--max-steps", "1e23"), ("max-steps",)),
    (("--preset", "bogus"), ("preset", "bogus")),
])
def test_train_refuses_bad_values_before_doing_anything(tmp_path, synth_data, extra, words):
    done = _vledge(_train(tmp_path, synth_data) + list(extra))
    _assert_one_error_line(done, *words)
    assert not (tmp_path / "run").exists()


def test_train_out_that_is_a_file(tmp_path, synth_data):
    out = tmp_path / "run"
    out.write_text("not a folder")
    done = _vledge(["train", "--data", str(synth_data), "--preset", "tiny", "--max-steps", "2", "--out", str(out)])
    _assert_one_error_line(done, str(out))
    assert out.read_text() == "not a folder"


@pytest.mark.parametrize("target", ["/proc/vledge-test/x", "/proc/x"])
def test_outputs_that_cannot_be_written(tmp_path, tiny_run, target):
    _assert_one_error_line(_vledge(["data", "synth", "--out", target, "--size", "4"]), target)
    _assert_one_error_line(_vledge(["export", str(tiny_run.best_checkpoint), "-o", target, "--quantize", "none"]),
                           target)


@pytest.mark.parametrize("extra, words", [
    (("--opset", "99"), ("opset",)),
    (("--quantize", ","), ("quantize",)),
    (("--quantize", "int3"), ("int3",)),
])
def test_export_refuses_bad_values(tmp_path, tiny_run, extra, words):
    done = _vledge(["export", str(tiny_run.best_checkpoint), "-o", str(tmp_path / "m"), *extra])
    _assert_one_error_line(done, *words)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("extra, words", [
    (("--temperature", "nan"), ("temperature",)),
    (("--temperature", "inf"), ("temperature",)),
    (("--repetition-penalty", "inf"), ("repetition",)),
    (("--repetition-penalty", "nan"), ("repetition",)),
    (("--top-p", "nan"), ("top-p",)),
])
def test_generation_values_must_be_finite(tiny_model_dir, synth_data, extra, words):
    image = sorted((synth_data / "images").iterdir())[0]
    done = _vledge(["caption", "--model", str(tiny_model_dir), str(image), *extra])
    _assert_one_error_line(done, *words)


def test_a_non_utf8_argument_is_named_not_a_traceback(tmp_path):
    name = os.fsencode(str(tmp_path)) + b"/caf\xe9-\xff.json"
    done = subprocess.run([sys.executable, "-m", "vledge", "data", "inspect", name], capture_output=True,
                          timeout=120)
    _assert_one_error_line(done, "caf")


def test_a_non_utf8_question_is_a_typed_error(tiny_model_dir, synth_data):
    image = sorted((synth_data / "images").iterdir())[0]
    done = subprocess.run([sys.executable, "-m", "vledge", "ask", "--model", str(tiny_model_dir), str(image),
                           b"what \xff?"], capture_output=True, timeout=300)
    _assert_one_error_line(done, "TokenizerError", "not valid text")


def test_quickstart_refuses_a_bad_preset_before_generating_data(tmp_path):
    done = _vledge(["quickstart", "--out", str(tmp_path / "qs"), "--preset", "bogus", "--size", "50"])
    _assert_one_error_line(done, "bogus")
    assert not (tmp_path / "qs").exists() or not any((tmp_path / "qs").iterdir())
