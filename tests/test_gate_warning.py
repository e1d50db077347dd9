"""A variant that failed the export's parity gate: one warning when loaded by name, never chosen by auto."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

from vledge.runtime import load

LABEL = "decoder_model_merged:q4"


def _failed_copy(model_dir, tmp_path, agreement=0.24, accuracy_delta=0.0, select=False):
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    manifest = json.loads((target / "vledge.json").read_text())
    parity = manifest["parity"]
    assert LABEL in parity["variants"]
    parity["variants"][LABEL]["generation"]["token_agreement"] = agreement
    parity["variants"][LABEL]["accuracy_delta"] = accuracy_delta
    parity.update(min_token_agreement=0.9, max_accuracy_drop=1.0)
    parity.pop("gate", None)  # a directory from before verdicts were recorded: judged on these budgets
    if select:
        manifest["selected"]["cpu"]["decoder_model_merged"] = "q4"
    (target / "vledge.json").write_text(json.dumps(manifest))  # the manifest is not among the hashed files
    return target


def _gate_records(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and "parity gate" in r.getMessage()]


def test_loading_a_failed_variant_by_name_warns_once_with_the_recorded_agreement(tiny_model_dir, tmp_path, caplog):
    model_dir = _failed_copy(tiny_model_dir, tmp_path)
    with caplog.at_level(logging.WARNING):
        runtime = load(model_dir, precision="q4", providers="cpu", threads=1)
    assert runtime.precisions["decoder_model_merged"] == "q4"
    (record,) = _gate_records(caplog)
    message = record.getMessage()
    assert "decoder_model_merged q4" in message and "24.0%" in message and "90%" in message
    assert "\n" not in message


def test_an_accuracy_drop_beyond_the_budget_is_named_too(tiny_model_dir, tmp_path, caplog):
    model_dir = _failed_copy(tiny_model_dir, tmp_path, agreement=0.95, accuracy_delta=-4.0)
    with caplog.at_level(logging.WARNING):
        load(model_dir, precision={"decoder_model_merged": "q4"}, providers="cpu", threads=1)
    (record,) = _gate_records(caplog)
    assert "-4.0 points" in record.getMessage() and "agree" not in record.getMessage()


def test_a_variant_within_the_budgets_loads_without_a_word(tiny_model_dir, tmp_path, caplog):
    model_dir = _failed_copy(tiny_model_dir, tmp_path, agreement=0.95)
    with caplog.at_level(logging.WARNING):
        load(model_dir, precision="q4", providers="cpu", threads=1)
    assert not _gate_records(caplog)


def test_auto_never_picks_a_failed_variant_even_where_selected_names_it(tiny_model_dir, tmp_path, caplog):
    model_dir = _failed_copy(tiny_model_dir, tmp_path, select=True)
    with caplog.at_level(logging.WARNING):
        runtime = load(model_dir, precision="auto", providers="cpu", threads=1)
    assert runtime.precisions["decoder_model_merged"] == "fp32"
    assert not _gate_records(caplog)


def test_the_cli_prints_one_warning_line_on_stderr(tiny_model_dir, synth_data, tmp_path):
    model_dir = _failed_copy(tiny_model_dir, tmp_path)
    image = synth_data / json.loads((synth_data / "test.json").read_text())[0]["image"]
    done = subprocess.run([sys.executable, "-m", "vledge", "ask", str(image), "how many shapes are there?",
                           "--model", str(model_dir), "--precision", "q4", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "parity gate" in line]
    assert len(lines) == 1 and "24.0%" in lines[0] and lines[0].startswith("WARNING")
    assert "Traceback" not in done.stderr
    assert done.stdout.strip()  # it still answers


def _verdict_copy(model_dir, tmp_path, passed: bool):
    """A directory whose teacher-forced gate recorded ``passed`` for q4, with poor free-running agreement."""
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    manifest = json.loads((target / "vledge.json").read_text())
    parity = manifest["parity"]
    parity["variants"][LABEL]["generation"]["token_agreement"] = 0.5
    reasons = [] if passed else ["teacher-forced top-1 agreement 64.4% on the text (798 positions), below 90.0%"]
    parity["gate"]["verdicts"][LABEL] = {"passed": passed, "decided_by": "teacher-forced", "reasons": reasons}
    manifest["selected"]["cpu"]["decoder_model_merged"] = "q4"
    (target / "vledge.json").write_text(json.dumps(manifest))
    return target


def test_the_recorded_teacher_forced_verdict_decides(tiny_model_dir, tmp_path, caplog):
    model_dir = _verdict_copy(tiny_model_dir, tmp_path / "passed", passed=True)
    with caplog.at_level(logging.WARNING):
        runtime = load(model_dir, precision="auto", providers="cpu", threads=1)
    assert runtime.precisions["decoder_model_merged"] == "q4"  # 50% free-running agreement does not matter
    assert not _gate_records(caplog)

    model_dir = _verdict_copy(tiny_model_dir, tmp_path / "failed", passed=False)
    assert load(model_dir, precision="auto", providers="cpu", threads=1).precisions["decoder_model_merged"] == "fp32"
    with caplog.at_level(logging.WARNING):
        load(model_dir, precision="q4", providers="cpu", threads=1)
    (record,) = _gate_records(caplog)
    assert "teacher-forced" in record.getMessage() and "64.4%" in record.getMessage()
