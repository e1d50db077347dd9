"""The ``ckpt.pt`` format: plain containers and tensors only, read with ``weights_only=True``.

A checkpoint carries everything needed to rebuild the model without the training
code's objects: the model config, the tokenizer's JSON text and the preprocessing
spec, next to the weights. Loading never unpickles arbitrary objects, and writes
go to a temporary file renamed into place, so a crash never leaves half a file.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vledge.checkpoint_checks import check_special_tokens, check_tensor_layout, checkpoint_tokenizer
from vledge.config import ModelConfig, PreprocessSpec, TrainConfig, from_dict, to_dict
from vledge.errors import CheckpointError, ConfigError
from vledge.hashing import file_sha256  # noqa: F401 (the checkpoint's digest, re-exported)
from vledge.torch_io import SAFE_TORCH, require_safe_torch, save_torch  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

FORMAT = "vledge-checkpoint"
VERSION = 1
# Weights are floating point; integer tensors are only BatchNorm's step counters.
WEIGHT_DTYPES = ("float32", "float16", "bfloat16")
COUNTER_SUFFIX = "num_batches_tracked"


@dataclass
class Checkpoint:
    model_config: ModelConfig
    tokenizer_json: str
    state_dict: dict[str, Any]
    train_config: TrainConfig | None = None
    # Resumable training state: optimizer, scheduler, step, stage; absent in exported-only files.
    train_state: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    # Where it was read from, for error messages ("checkpoint" when built in memory).
    source: str = "checkpoint"

    @property
    def preprocess(self) -> PreprocessSpec:
        return self.model_config.preprocess

    def tokenizer(self):
        return checkpoint_tokenizer(self.tokenizer_json, self.model_config.special_tokens, self.source)

    def build_model(self):
        """The model with these weights, in eval mode, on the CPU.

        The model is built on torch's meta device and takes these tensors as its own (no random initialisation,
        no copy), so a large model is held in memory once; buffers computed from the config rather than saved
        are then made on the CPU.
        """
        import torch

        from vledge.models.vlm import VisionLanguageModel, materialize_buffers

        tokenizer = self.tokenizer()
        with torch.device("meta"):
            model = VisionLanguageModel(self.model_config, image_token_id=tokenizer.image_id)
        try:
            model.load_state_dict(self.state_dict, assign=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.source}: weights do not fit its own config: {exc}") from None
        if self.model_config.language.tie_embeddings:  # assign replaced both by the same tensor: one parameter again
            model.language.lm_head.weight = model.embed_tokens.weight
        materialize_buffers(model)
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

    require_safe_torch()
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
    check_special_tokens(payload.get("model_config"), str(path))
    try:
        model_config = from_dict(ModelConfig, payload["model_config"])
        train_config = from_dict(TrainConfig, payload["train_config"]) if payload.get("train_config") else None
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{path} has an invalid config: {exc}") from None
    for key in ("tokenizer_json", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path} lacks '{key}'")
    if not isinstance(payload["tokenizer_json"], str):
        raise CheckpointError(f"{path}: tokenizer_json is {type(payload['tokenizer_json']).__name__}, not text")
    for key in ("train_state", "metrics"):
        if payload.get(key) is not None and not isinstance(payload[key], dict):
            raise CheckpointError(f"{path}: {key} is {type(payload[key]).__name__}, not a mapping")
    validate_weights(payload["state_dict"], model_config, str(path))
    checkpoint_tokenizer(payload["tokenizer_json"], model_config.special_tokens, str(path))  # garbage: named now
    return Checkpoint(
        model_config=model_config,
        tokenizer_json=payload["tokenizer_json"],
        state_dict=payload["state_dict"],
        train_config=train_config,
        train_state=payload.get("train_state"),
        metrics=payload.get("metrics") or {},
        source=str(path),
    )


def validate_weights(state_dict: Any, model_config: ModelConfig, source: str) -> None:
    """Names, shapes, dtypes and finiteness of the weights against the model the config builds.

    The model is built on torch's meta device, so a hostile config (a huge width) costs no memory.
    """
    import torch

    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{source}: state_dict is {type(state_dict).__name__}, not a mapping of tensors")
    for name, tensor in state_dict.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{source}: state_dict entry {name!r} is {type(tensor).__name__}, not a tensor")
        check_tensor_layout(name, tensor, source)
        dtype = str(tensor.dtype).removeprefix("torch.")
        if name.endswith(COUNTER_SUFFIX):
            if dtype != "int64":
                raise CheckpointError(f"{source}: counter {name} has dtype {dtype}, expected int64")
            continue
        if dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{source}: weight {name} has dtype {dtype}; weights are {', '.join(WEIGHT_DTYPES)}")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: weight {name} holds NaN or infinite values")
    from vledge.families.size import check_model_fits
    from vledge.models.vlm import VisionLanguageModel

    try:
        check_model_fits(model_config, source)  # before building even a meta model of a hostile size
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        with torch.device("meta"):
            expected = VisionLanguageModel(model_config, image_token_id=0).state_dict()
    except (ValueError, RuntimeError, TypeError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{source}: its config does not build a model: {exc}") from None
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit its own config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in expected.items():
        if tuple(state_dict[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: weight {name} has shape {tuple(state_dict[name].shape)}, its config needs {tuple(tensor.shape)}"
            )
