"""Tensors of a local Hugging Face folder: model.safetensors or a sharded index, never pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vledge.errors import WeightsError


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder}: no safetensors weights (pickled .bin files are not read)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(folder / name))
        except (OSError, SafetensorError) as exc:
            raise WeightsError(f"cannot read {folder / name}: {exc}") from None
    return tensors
