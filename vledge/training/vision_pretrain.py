"""Supervised pretraining of the vision backbone on the built-in synthetic scenes' own labels.

The synthetic generator stores every scene it drew next to its conversations (the
``"scene"`` key of each record in ``train.json``: each object's cell, colour, shape and
size, and the cell of the written word). This module trains the vision backbone with a
linear classifier per grid cell on those labels, so that each visual token states what
lies in its cell before the language model ever sees it. Trained from scratch on the
conversations alone, the backbone keeps mostly what the easiest task needs (where the
objects are, their colour) and little of their shape.

Only data that carries scene labels can be used, i.e. vledge's own synthetic data; the
labels are the same facts the conversations state, read from the same training split,
and the ``val`` split measures the per-cell accuracy. The output file holds the
backbone's state dict (under ``"state_dict"``, the layout ``--vision-weights`` reads)
and the vision config and measurements it came from.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vledge.config import ModelConfig, PreprocessSpec, to_dict
from vledge.data.dataset import cache_images
from vledge.data.images import normalize
from vledge.data.records import LoadReport, Record
from vledge.data.synth import COLORS, SHAPES, SIZES, WORDS
from vledge.errors import ConfigError, DataError, TrainingError, WeightsError
from vledge.torch_io import save_torch
from vledge.models.projector import build_projector
from vledge.models.vision import VisionEncoder
from vledge.training.schedule import learning_rate

log = logging.getLogger(__name__)

# Per-cell targets; the last class of each is "nothing of this kind here".
HEADS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": tuple(SHAPES),
    "size": tuple(SIZES),
    "word": tuple(WORDS),
}


@dataclass
class VisionPretrainConfig:
    steps: int = 300  # with minutes, whichever runs out first ends the run
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05
    seed: int = 0
    threads: int | None = None
    val_images: int = 512
    log_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr}")


@dataclass
class VisionPretrainResult:
    weights: Path
    steps: int
    seconds: float
    # Per-cell accuracy on held-out images, per head: over all cells and over the cells that hold that kind.
    accuracy: dict[str, float] = field(default_factory=dict)


def cell_targets(scene: dict, grid: int) -> dict[str, np.ndarray]:
    """Class index per cell (reading order) for every head, from a record's ``"scene"`` dict."""
    targets = {name: np.full(grid * grid, len(classes), dtype=np.int64) for name, classes in HEADS.items()}
    try:
        for obj in scene["objects"]:
            cell = int(obj["row"]) * grid + int(obj["col"])
            for name in ("color", "shape", "size"):
                targets[name][cell] = HEADS[name].index(obj[name])
        if scene.get("word") is not None and scene.get("word_cell") is not None:
            row, col = scene["word_cell"]
            targets["word"][int(row) * grid + int(col)] = HEADS["word"].index(scene["word"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(f"scene labels not understood: {exc!r}") from None
    return targets


def _labelled_split(data: Path, split: str, limit: int | None = None) -> tuple[list[Record], list[dict], int]:
    """Records (image only) and scenes of one split of a vledge synthetic dataset, and its grid size."""
    path = Path(data) / f"{split}.json"
    if not path.is_file():
        raise DataError(f"{path} not found: vision pretraining needs vledge synthetic data (vledge data synth)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    records, scenes = [], []
    for item in raw if isinstance(raw, list) else []:
        if isinstance(item, dict) and isinstance(item.get("scene"), dict) and isinstance(item.get("image"), str):
            records.append(Record(id=str(item.get("id", len(records))), image=path.parent / item["image"], turns=()))
            scenes.append(item["scene"])
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise DataError(f"{path} has no records with scene labels: vision pretraining needs vledge synthetic data")
    grids = {int(s.get("grid", 3)) for s in scenes}
    if len(grids) != 1:
        raise DataError(f"{path} mixes scene grids {sorted(grids)}")
    return records, scenes, grids.pop()


class _CellClassifier(nn.Module):
    """Vision encoder -> projector (the visual tokens the language model reads) -> one linear
    classifier per head, shared by all cells, on the token grid pooled to the scene grid."""

    def __init__(self, config: ModelConfig, grid: int) -> None:
        super().__init__()
        self.encoder = VisionEncoder(config.vision)
        self.projector = build_projector(config.projector, self.encoder.out_channels, config.language.hidden)
        size = config.preprocess.image_size
        was_training = self.encoder.training
        self.encoder.eval()
        with torch.no_grad():
            rows, cols = self.encoder.pool(self.encoder.backbone(torch.zeros(1, 3, size, size))).shape[-2:]
        self.encoder.train(was_training)
        if rows < grid or cols < grid:
            raise ConfigError(f"the vision encoder's {rows}x{cols} token grid is coarser than the scenes' "
                              f"{grid}x{grid} grid: per-cell labels cannot be learned")
        self.token_grid = (int(rows), int(cols))
        self.pool = nn.AdaptiveAvgPool2d(grid)
        hidden = config.language.hidden
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(classes) + 1) for name, classes in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.projector(self.encoder(pixels))  # [B, rows*cols, hidden]
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.token_grid)
        cells = self.pool(grid).flatten(2).transpose(1, 2)  # [B, scene cells, hidden]
        return {name: head(cells) for name, head in self.heads.items()}


def _stack(records: list[Record], scenes: list[dict], images: dict[str, torch.Tensor], grid: int):
    kept = [(r, s) for r, s in zip(records, scenes) if str(r.image) in images]
    if not kept:
        raise DataError("no readable images with scene labels")
    pixels = torch.stack([images[str(r.image)] for r, _ in kept])
    per_scene = [cell_targets(s, grid) for _, s in kept]
    targets = {name: torch.from_numpy(np.stack([t[name] for t in per_scene])) for name in HEADS}
    return pixels, targets


def _loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(F.cross_entropy(logits[n].reshape(-1, logits[n].shape[-1]), targets[n].reshape(-1)) for n in HEADS)


@torch.no_grad()
def _accuracy(model: _CellClassifier, pixels: torch.Tensor, targets: dict[str, torch.Tensor],
              spec: PreprocessSpec) -> dict[str, float]:
    model.eval()
    predicted: dict[str, list[torch.Tensor]] = {name: [] for name in HEADS}
    for start in range(0, len(pixels), 256):
        logits = model(normalize(pixels[start:start + 256], spec))
        for name in HEADS:
            predicted[name].append(logits[name].argmax(-1))
    model.train()
    out = {}
    for name, classes in HEADS.items():
        guess, truth = torch.cat(predicted[name]), targets[name]
        right = guess == truth
        present = truth != len(classes)
        out[f"{name}_all"] = float(right.float().mean())
        out[name] = float(right[present].float().mean()) if bool(present.any()) else float("nan")
    return out


def pretrain_vision(
    data: Path,
    out: Path,
    model_config: ModelConfig,
    config: VisionPretrainConfig | None = None,
    minutes: float | None = None,
    on_progress: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> VisionPretrainResult:
    """Train ``model_config``'s vision encoder and projector on per-cell scene labels of ``data``; save to ``out``.

    The classifiers read the projected visual tokens, so what the language model will see states
    every cell's colour, shape, size and word linearly.
    """
    config = config or VisionPretrainConfig()
    torch.set_num_threads(config.threads or max(1, os.cpu_count() or 1))
    data, out = Path(data), Path(out)
    preprocess = model_config.preprocess
    train_records, train_scenes, grid = _labelled_split(data, "train")
    try:
        val_records, val_scenes, val_grid = _labelled_split(data, "val", limit=config.val_images)
    except DataError:
        held = min(config.val_images, len(train_records) // 10)
        log.info("no labelled val split in %s: holding out %d training images", data, held)
        val_records, val_scenes, val_grid = train_records[:held], train_scenes[:held], grid
        train_records, train_scenes = train_records[held:], train_scenes[held:]
    if val_grid != grid:
        raise DataError(f"{data}: the train and val splits have different scene grids ({grid} and {val_grid})")

    report = LoadReport(source="vision pretraining")
    images = cache_images(train_records + val_records, preprocess, report)
    train_pixels, train_targets = _stack(train_records, train_scenes, images, grid)
    val_pixels, val_targets = _stack(val_records, val_scenes, images, grid) if val_records else (None, None)
    del images

    torch.manual_seed(config.seed)
    model = _CellClassifier(model_config, grid)
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    budget = minutes * 60.0 if minutes else None
    log.info("vision pretraining on %d images (%d held out), %dx%d cells", len(train_pixels),
             0 if val_pixels is None else len(val_pixels), grid, grid)

    started = time.monotonic()
    step = 0
    order = torch.randperm(len(train_pixels), generator=generator)
    cursor = 0
    while True:
        elapsed = time.monotonic() - started
        progress = max(step / config.steps, elapsed / budget if budget else 0.0)
        if progress >= 1.0:
            break
        if cursor + config.batch_size > len(order):
            order, cursor = torch.randperm(len(train_pixels), generator=generator), 0
        index = order[cursor:cursor + config.batch_size]
        cursor += config.batch_size
        lr = learning_rate(config.lr, step, config.warmup_steps, progress, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(normalize(train_pixels[index], preprocess))
        loss = _loss(logits, {name: targets[index] for name, targets in train_targets.items()})
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss at vision pretraining step {step + 1}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if on_progress is not None and (step % config.log_every == 0 or step == 1):
            on_progress(step, config.steps, {"loss": loss.item(), "lr": lr, "elapsed_s": time.monotonic() - started})
    seconds = time.monotonic() - started
    accuracy = _accuracy(model, val_pixels, val_targets, preprocess) if val_pixels is not None else {}
    log.info("vision pretraining: %d steps in %.0f s; held-out per-cell accuracy %s", step, seconds,
             ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items() if not math.isnan(v)))
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.encoder.backbone.state_dict().items()},
        "projector_state_dict": {k: v.detach().cpu() for k, v in model.projector.state_dict().items()},
        "vision_config": to_dict(model_config.vision),
        "projector_config": to_dict(model_config.projector),
        "hidden": model_config.language.hidden,
        "image_size": preprocess.image_size,
        "source": "vledge pretrain-vision: per-cell labels of the synthetic scenes",
        "data": str(data),
        "steps": step,
        "accuracy": accuracy,
    }
    save_torch(payload, out)
    return VisionPretrainResult(out, step, seconds, accuracy)


def load_projector_weights(projector: nn.Module, path: str | Path) -> bool:
    """The projector saved by :func:`pretrain_vision` next to the backbone, if the file has one.

    Returns whether one was loaded; a projector of another shape is a :class:`WeightsError`.
    """
    if Path(path).is_dir():  # a Hugging Face vision tower folder holds no projector
        return False
    from vledge.torch_io import require_safe_torch

    require_safe_torch()  # weights_only=True is no protection before torch 2.6
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read vision weights {path}: {exc}") from None
    projector_state = state.get("projector_state_dict") if isinstance(state, dict) else None
    if not projector_state:
        return False
    try:
        projector.load_state_dict(projector_state)
    except RuntimeError as exc:
        raise WeightsError(f"the projector in {path} does not fit this model (pretrain it with the same preset): "
                           f"{str(exc).splitlines()[0]}") from None
    log.info("loaded the pretrained projector from %s", path)
    return True
