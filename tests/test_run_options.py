"""Run options: validated in one place, saved in last.pt as plain data, read back by --resume (old files too)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import tiny_configs
from vledge.errors import CheckpointError, ConfigError
from vledge.training.run_options import RunOptions, RunState, decode_train_state, encode_train_state


@pytest.mark.parametrize("bad, message", [
    (dict(minutes=0), "minutes must be above 0"),
    (dict(minutes=-1.5), "minutes must be above 0"),
    (dict(minutes=math.nan), "minutes must be above 0"),
    (dict(minutes=True), "minutes must be a number"),
    (dict(device="gpu"), "device must be"),
    (dict(device="cuda:x"), "device must be"),
    (dict(freeze=("vision", "decoder")), "cannot freeze"),
    (dict(freeze="vision"), "freeze must be a sequence"),
    (dict(stage=""), "stage must be"),
    (dict(init="a.pt", vision_weights="v.pt"), "cannot be combined"),
])
def test_bad_run_options_are_refused_with_what_is_wrong(bad, message):
    with pytest.raises(ConfigError, match=message):
        RunOptions(**bad)


def test_run_options_are_plain_data_and_round_trip():
    options = RunOptions(stage="instruct", minutes=2, freeze=["vision", "projector"], vision_weights="w/v.pt",
                         device="cuda:1")
    assert options.freeze == ("vision", "projector") and options.vision_weights == Path("w/v.pt")
    assert options.minutes == 2.0 and options.budget_seconds == 120.0
    plain = options.to_dict()
    assert json.loads(json.dumps(plain)) == plain  # nothing but JSON types, so weights_only loading reads it
    assert plain == {"stage": "instruct", "minutes": 2.0, "freeze": ["vision", "projector"], "init": None,
                     "vision_weights": "w/v.pt", "device": "cuda:1", "language_model": None, "lora_rank": None,
                     "lora_alpha": 16.0, "lora_dropout": 0.05,
                     "allow_outside_paths": False, "gradient_checkpointing": False}
    assert RunOptions.from_dict(plain) == options
    assert RunOptions.from_dict({**plain, "a_later_option": 3}) == options  # keys from a newer version: ignored
    assert RunOptions.from_dict({"stage": "align"}) == RunOptions(stage="align")  # missing keys: defaults


def test_train_state_reads_the_current_and_the_older_layout():
    state = RunState(step=7, stage_index=1, stage_start_step=5, elapsed=3.5, best_metric=0.25)
    options = RunOptions(minutes=13, freeze=("vision",))
    encoded = encode_train_state(state, options, optimizer_state={"state": {}})
    assert set(encoded) == {"run", "options", "optimizer"}
    assert decode_train_state(encoded, Path("last.pt")) == (state, options)
    older = {"run": encoded["run"], "budget": 780.0, "only_stage": "instruct", "freeze": ["vision"]}
    assert decode_train_state(older, Path("last.pt")) == (state, RunOptions(stage="instruct", minutes=13.0,
                                                                             freeze=("vision",)))
    assert decode_train_state({"run": encoded["run"], "budget": None}, Path("x")) == (state, RunOptions())
    with pytest.raises(CheckpointError, match="last.pt"):
        decode_train_state({"budget": 1.0}, Path("last.pt"))
    with pytest.raises(CheckpointError, match="invalid run options"):
        decode_train_state({"run": encoded["run"], "options": {"minutes": -1}}, Path("last.pt"))


@pytest.mark.parametrize("layout", ["current", "older"])
def test_resume_takes_the_saved_options_but_this_calls_device(layout, tiny_run, synth_data, tmp_path):
    from vledge.checkpoint import load_checkpoint, save_checkpoint
    from vledge.training.trainer import prepare_run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    checkpoint = load_checkpoint(tiny_run.last_checkpoint)
    saved = RunOptions(stage="instruct", minutes=5.0, freeze=("vision",), device="auto")
    train_state = encode_train_state(RunState(step=9, stage_index=0, stage_start_step=0), saved,
                                     checkpoint.train_state["optimizer"])
    if layout == "older":
        train_state = {"run": train_state["run"], "budget": 300.0, "only_stage": "instruct", "freeze": ["vision"],
                       "optimizer": train_state["optimizer"]}
    checkpoint.train_state = train_state
    save_checkpoint(run_dir / "last.pt", checkpoint)
    model_config, train_config = tiny_configs(max_steps=1)  # ignored on resume: last.pt's configs win
    prepared = prepare_run(synth_data, run_dir, model_config, train_config,
                           RunOptions(stage="align", device="cpu"), resume=True)
    assert prepared.options == RunOptions(stage="instruct", minutes=5.0, freeze=("vision",), device="cpu")
    # a new budget is the one option besides the device that a resume takes: it finishes a run cut short
    longer = prepare_run(synth_data, run_dir, model_config, train_config,
                         RunOptions(minutes=99.0, stage="align", device="cpu"), resume=True)
    assert longer.options == RunOptions(stage="instruct", minutes=99.0, freeze=("vision",), device="cpu")
    assert prepared.start.step == 9 and prepared.resumed and prepared.optimizer_state
    assert prepared.train_config == checkpoint.train_config
    assert [stage.name for stage in prepared.stages] == ["instruct"]
    assert all("vision" not in stage.trainable for stage in prepared.stages)
