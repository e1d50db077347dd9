"""Which reader turns a Hugging Face vision-language folder into a vledge checkpoint, by its architecture.

One line per folder format: the ``architectures`` / ``model_type`` a config.json names and the module whose
``folder_checkpoint(path, context, backend)`` reads it. ``vledge convert`` and ``vledge export HF_DIR`` go through
:func:`folder_checkpoint`, so a new format is one module plus one line here.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from vledge.errors import ConfigError

# (architecture names, model_type values, reading module)
FORMATS: tuple[tuple[tuple[str, ...], tuple[str, ...], str], ...] = (
    (("LlavaForConditionalGeneration",), ("llava",), "vledge.hf.llava"),
    (("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"), ("idefics3", "smolvlm"),
     "vledge.hf.idefics3"),
)


def folder_format(path: str | Path) -> str:
    """The reading module for the folder ``path``; ConfigError naming the architecture vledge does not read."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_bytes()[: 4 << 20].decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_path} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} is not a JSON object")
    architectures = [a for a in (config.get("architectures") or []) if isinstance(a, str)]
    for names, model_types, module in FORMATS:
        if any(a in names for a in architectures) or (not architectures and config.get("model_type") in model_types):
            return module
    shown = ", ".join(architectures) or f"model_type {config.get('model_type')!r}"
    known = ", ".join(name for names, _, _ in FORMATS for name in names)
    raise ConfigError(f"{config_path}: architectures {shown} is not a vision-language model vledge reads; it "
                      f"reads {known}")


def folder_checkpoint(path: str | Path, context: int = 4096, backend: str = "pil"):
    """The folder as a vledge Checkpoint held in memory (its reader checks the weights against the model)."""
    return importlib.import_module(folder_format(path)).folder_checkpoint(path, context=context, backend=backend)


def convert_folder(path: str | Path, out: str | Path, context: int = 4096, backend: str = "pil") -> Path:
    """Write the folder as a vledge ``ckpt.pt`` (atomically)."""
    from vledge.checkpoint import save_checkpoint

    return save_checkpoint(out, folder_checkpoint(path, context=context, backend=backend))
