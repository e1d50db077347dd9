"""The files of a run folder: ``ckpt.pt`` / ``last.pt``, ``run.json`` and ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

from vledge.checkpoint import Checkpoint, save_checkpoint
from vledge.config import to_dict
from vledge.files import write_json, write_text
from vledge.training.run_options import RunState, encode_train_state
from vledge.training.setup import PreparedRun


def save_run_checkpoint(path: Path, run: PreparedRun, state: RunState, optimizer=None,
                        metrics: dict | None = None) -> None:
    """The model, tokenizer and configs, with the run state and options; the optimizer for ``last.pt``."""
    optimizer_state = optimizer.state_dict() if optimizer is not None else None
    save_checkpoint(path, Checkpoint(
        model_config=run.model_config,
        tokenizer_json=run.tokenizer.to_json(),
        state_dict={k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        train_config=run.train_config,
        train_state=encode_train_state(state, run.options, optimizer_state),
        metrics=metrics or {},
    ))


def write_run_info(run: PreparedRun) -> None:
    info = {
        "model_config": to_dict(run.model_config),
        "train_config": to_dict(run.train_config),
        "stages": [to_dict(s) for s in run.stages],
        "data": str(run.data),
        "train_records": len(run.train_records),
        "val_records": len(run.val_records),
        "data_report": run.train_report.summary(),
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "image_tokens": run.model.num_image_tokens,
        "world_size": run.world,
        "device": str(run.device),
    }
    write_json(run.run_dir / "run.json", info, indent=2)


def read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """The rows of ``metrics.jsonl`` up to a step (a resumed run drops those after its saved step)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("step", 0) <= up_to_step]


def rewrite_metrics(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_metrics(path: Path, row: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
