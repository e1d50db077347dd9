"""The ``ckpt.pt`` format: plain containers and tensors only, read with ``weights_only=True``.

A checkpoint carries everything needed to rebuild the model without the training
code's objects: the model config, the tokenizer's JSON text and the preprocessing
spec, next to the weights. Loading never unpickles arbitrary objects, and writes
go to a temporary file renamed into place, so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vledge.config import ModelConfig, PreprocessSpec, TrainConfig, from_dict, to_dict
from vledge.errors import CheckpointError, ConfigError
from vledge.files import save_torch

log = logging.getLogger(__name__)

FORMAT = "vledge-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    model_config: ModelConfig
    tokenizer_json: str
    state_dict: dict[str, Any]
    train_config: TrainConfig | None = None
    # Resumable training state: optimizer, scheduler, step, stage; absent in exported-only files.
    train_state: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def preprocess(self) -> PreprocessSpec:
        return self.model_config.preprocess

    def tokenizer(self):
        from vledge.tokenizer import Tokenizer

        return Tokenizer.from_json(self.tokenizer_json)

    def build_model(self):
        """The model with these weights, in eval mode, on the CPU."""
        from vledge.models.vlm import VisionLanguageModel

        tokenizer = self.tokenizer()
        model = VisionLanguageModel(self.model_config, image_token_id=tokenizer.image_id)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint weights do not fit its own config: {exc}") from None
        return model.eval()


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": to_dict(checkpoint.model_config),
        "preprocess": to_dict(checkpoint.model_config.preprocess),
        "tokenizer_json": checkpoint.tokenizer_json,
        "state_dict": checkpoint.state_dict,
        "train_config": to_dict(checkpoint.train_config) if checkpoint.train_config else None,
        "train_state": checkpoint.train_state,
        "metrics": checkpoint.metrics,
    }
    save_torch(payload, path)
    log.debug("saved checkpoint %s", path)
    return path


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> Checkpoint:
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch.save's zip archive, or a legacy pickle
        raise CheckpointError(f"{path} is not a vledge checkpoint (not a file written by torch.save)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling refused"
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain containers, refused without running them ({first})"
        ) from None
    except Exception as exc:  # torch raises many types on corrupt input (KeyError, RuntimeError, ...)
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not a torch file): {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vledge checkpoint (no '{FORMAT}' format tag)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}, this vledge reads {VERSION}")
    try:
        model_config = from_dict(ModelConfig, payload["model_config"])
        train_config = from_dict(TrainConfig, payload["train_config"]) if payload.get("train_config") else None
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{path} has an invalid config: {exc}") from None
    for key in ("tokenizer_json", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path} lacks '{key}'")
    return Checkpoint(
        model_config=model_config,
        tokenizer_json=payload["tokenizer_json"],
        state_dict=payload["state_dict"],
        train_config=train_config,
        train_state=payload.get("train_state"),
        metrics=payload.get("metrics") or {},
    )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
