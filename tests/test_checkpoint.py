"""ckpt.pt: weights-only loading, refusal of unsafe or foreign files, atomic writes."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from vledge.checkpoint import load_checkpoint, save_checkpoint
from vledge.errors import CheckpointError


def test_checkpoint_is_plain_data_and_rebuilds_the_same_model(tiny_run):
    path = tiny_run.best_checkpoint
    raw = torch.load(path, weights_only=True)  # would raise on any non-allowlisted object
    assert raw["format"] == "vledge-checkpoint"
    assert isinstance(raw["tokenizer_json"], str)
    assert raw["preprocess"]["image_size"] == 32
    checkpoint = load_checkpoint(path)
    model = checkpoint.build_model()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, raw["state_dict"][key])
    assert checkpoint.tokenizer().vocab_size == checkpoint.model_config.language.vocab_size


class Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, tiny_run):
    marker = tmp_path / "pwned"
    good = torch.load(tiny_run.best_checkpoint, weights_only=True)
    good["metrics"] = {"note": Payload(marker)}
    evil = tmp_path / "evil.pt"
    torch.save(good, evil)
    with pytest.raises(CheckpointError, match="refused without running"):
        load_checkpoint(evil)
    assert not marker.exists()

    plain_pickle = tmp_path / "plain.pt"
    plain_pickle.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError):
        load_checkpoint(plain_pickle)
    assert not marker.exists()


def test_foreign_truncated_and_missing_files_get_clear_errors(tmp_path, tiny_run):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a vledge checkpoint"):
        load_checkpoint(foreign)

    data = tiny_run.best_checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(truncated)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)

    newer = tmp_path / "newer.pt"
    raw = torch.load(tiny_run.best_checkpoint, weights_only=True)
    raw["version"] = 99
    torch.save(raw, newer)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(newer)


def test_a_failed_write_leaves_the_old_file_untouched(tmp_path, tiny_run):
    checkpoint = load_checkpoint(tiny_run.best_checkpoint)
    target = tmp_path / "ckpt.pt"
    save_checkpoint(target, checkpoint)
    before = target.read_bytes()
    checkpoint.state_dict = {"bad": object()}  # torch.save cannot serialise this into a weights-only file
    checkpoint.metrics = {"unpicklable": lambda: None}
    with pytest.raises(Exception):
        save_checkpoint(target, checkpoint)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert zipfile.is_zipfile(target)
