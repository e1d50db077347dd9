"""Reading a local Hugging Face model folder: config.json and safetensors weights, never pickle, never a download.

These helpers serve every family and every folder kind (a causal LM, a vision tower, a LLaVA folder); what a
family's config and tensor names mean is the family's business (``vledge.families``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vledge.errors import WeightsError
from vledge.hashing import file_sha256
from vledge.reads import read_json

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"


def local_folder(path: str | Path, what: str = "model") -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        hint = " (nothing is downloaded: download it first, e.g. `huggingface-cli download NAME --local-dir DIR`)"
        raise WeightsError(f"{what} {str(path)!r} is not a local folder{hint if not folder.exists() else ''}")
    return folder


def read_config_json(folder: Path) -> dict[str, Any]:
    """config.json as a JSON object: a capped regular file, depth-limited (vledge.reads), else one WeightsError."""
    path = folder / "config.json"
    if not path.exists():
        raise WeightsError(f"{folder} has no config.json: not a Hugging Face model folder")
    config = read_json(path, error=WeightsError, what="config")
    if not isinstance(config, dict):
        raise WeightsError(f"{path} does not hold a JSON object")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: one ``model.safetensors`` or the shards its index names."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = read_json(index, error=WeightsError, what="safetensors index")["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{index} is not a safetensors index: {exc}") from None
        outside = [name for name in shards if not isinstance(name, str) or Path(name).name != name]
        if outside:
            raise WeightsError(f"{index} names shards outside its folder: {outside}")
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise WeightsError(f"{index} names shards that are not in {folder}: {missing}")
        return [folder / name for name in shards]
    single = folder / SAFETENSORS
    if single.is_file():
        return [single]
    pickled = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    if pickled:
        raise WeightsError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}); vledge reads safetensors only. Convert "
            "them once: `python -c \"import transformers as t; m = t.AutoModelForCausalLM.from_pretrained('DIR'); "
            "m.save_pretrained('DIR', safe_serialization=True)\"`"
        )
    raise WeightsError(f"{folder} has no {SAFETENSORS} or {SAFETENSORS_INDEX}")


def read_safetensors(files: Iterable[Path]) -> dict[str, Any]:
    """Every tensor of the files by name, bf16/fp16 upcast to float32 (CPU training wants fp32)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for path in files:
        try:
            loaded = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from None
        for name, tensor in loaded.items():
            if name in tensors:
                raise WeightsError(f"tensor {name!r} appears in more than one file of {path.parent}")
            tensors[name] = tensor.float() if tensor.is_floating_point() else tensor
    return tensors


def source_record(folder: Path, config_json: dict[str, Any], files: Iterable[Path]) -> dict[str, Any]:
    """What a checkpoint keeps about where its pretrained weights came from."""
    return {
        "folder": str(folder.resolve()),
        "architecture": (config_json.get("architectures") or [config_json.get("model_type")])[0],
        "config_json": json.dumps(config_json, sort_keys=True),
        "files": {path.name: file_sha256(path) for path in files},
    }


def grow_rows(matrix, rows: int):
    """``matrix`` grown to ``rows`` rows, each new row the mean of the existing ones.

    A new token whose id falls inside the matrix (Qwen2 pads its vocabulary with unused rows)
    keeps that row as it is, so every logit of the original vocabulary stays exactly the LM's.
    """
    import torch

    if rows <= matrix.shape[0]:
        return matrix
    return torch.cat([matrix, matrix.mean(dim=0).expand(rows - matrix.shape[0], -1)])


def check_weight_values(state, folder: Path) -> None:
    """WeightsError for a weight that is not floating point or holds NaN or infinity (named, with the folder)."""
    import torch

    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise WeightsError(f"{folder}: tensor {name} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                               "weights are floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise WeightsError(f"{folder}: tensor {name} holds NaN or infinite values")
