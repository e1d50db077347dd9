"""Shared fixtures: a small synthetic dataset and a tiny model trained on it, built in the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests are small: one thread avoids the 2-core contention that makes tiny torch ops slow.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    from vledge.data.synth import SynthOptions, generate_dataset

    out = tmp_path_factory.mktemp("data") / "synth"
    generate_dataset(out, SynthOptions(size=240, seed=7, image_size=48, splits=(0.8, 0.1, 0.1)), workers=2)
    return out


def tiny_configs(kind: str = "tiny", **train_overrides):
    import dataclasses

    from vledge.config import preset

    model_config, train_config = preset(kind)
    train_config = dataclasses.replace(train_config, threads=1, **train_overrides)
    return model_config, train_config


@pytest.fixture(scope="session")
def tiny_run(synth_data, tmp_path_factory):
    """A tiny transformer trained for a few dozen steps: enough to beat chance, seconds on a CPU."""
    from vledge.training.trainer import train

    model_config, train_config = tiny_configs(max_steps=150, eval_every=75, eval_samples=24)
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    return train(synth_data, run_dir, model_config, train_config)


@pytest.fixture(scope="session")
def tiny_lstm_run(synth_data, tmp_path_factory):
    from vledge.training.trainer import train

    model_config, train_config = tiny_configs("tiny-lstm", max_steps=30, eval_every=30, eval_samples=16)
    run_dir = tmp_path_factory.mktemp("runs") / "tiny-lstm"
    return train(synth_data, run_dir, model_config, train_config)


def export_tiny(run, synth_data, out_dir: Path, quantize=("none",), parity_samples: int = 24):
    from vledge.export import ExportOptions, export

    options = ExportOptions(quantize=tuple(quantize), data=synth_data, parity_samples=parity_samples,
                            calibration_samples=16)
    return export(run.best_checkpoint, out_dir, options)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_run, synth_data, tmp_path_factory) -> Path:
    """The tiny transformer exported with every variant (int8, q4, fp16; auto picks the CPU ones)."""
    return export_tiny(tiny_run, synth_data, tmp_path_factory.mktemp("export") / "tiny", quantize=("auto",)).model_dir


@pytest.fixture(scope="session")
def tiny_lstm_model_dir(tiny_lstm_run, synth_data, tmp_path_factory) -> Path:
    return export_tiny(tiny_lstm_run, synth_data, tmp_path_factory.mktemp("export") / "tiny-lstm").model_dir
