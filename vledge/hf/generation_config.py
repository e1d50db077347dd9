"""The stop token ids of a Hugging Face folder, taken as transformers takes them. Torch-free.

transformers' ``generate`` stops at ``generation_config.json``'s ``eos_token_id`` (one id or a
list: Llama 3.x folders list several), and without that file at ``config.json``'s (for a LLaVA
folder, its ``text_config``'s). vledge records those ids with the model (``LanguageConfig.source``
of a checkpoint, ``generation.stop_token_ids`` of a model directory) and stops at each of them as
well as at its prompt template's end token, so an answer ends where transformers ends it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vledge.errors import WeightsError

GENERATION_CONFIG = "generation_config.json"
SOURCE_KEY = "stop_token_ids"  # the key in LanguageConfig.source


def _ids(value: Any, where: str) -> list[int] | None:
    """``eos_token_id`` as a list of ids (None when absent); WeightsError naming ``where`` when garbled."""
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise WeightsError(f"{where}: eos_token_id must be an id or a non-empty list of ids >= 0, got {value!r}")
    return list(dict.fromkeys(values))


def folder_stop_ids(folder: Path, config_json: Mapping[str, Any], template_eos_id: int) -> list[int]:
    """generation_config.json's eos ids, else config.json's (or its text_config's), else the template's end token."""
    path = folder / GENERATION_CONFIG
    if path.is_file():
        try:
            generation = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsError(f"{path} is not readable JSON: {exc}") from None
        if not isinstance(generation, dict):
            raise WeightsError(f"{path} does not hold a JSON object")
        ids = _ids(generation.get("eos_token_id"), str(path))
        if ids is not None:
            return ids
    ids = _ids(config_json.get("eos_token_id"), f"{folder}/config.json")
    text_config = config_json.get("text_config")
    if ids is None and isinstance(text_config, Mapping):
        ids = _ids(text_config.get("eos_token_id"), f"{folder}/config.json text_config")
    return ids if ids is not None else [int(template_eos_id)]


def with_stop_ids(source: dict[str, Any], folder: Path, config_json: Mapping[str, Any],
                  template_eos_id: int) -> dict[str, Any]:
    """``source`` (a LanguageConfig.source record) with the folder's stop ids added."""
    return {**source, SOURCE_KEY: folder_stop_ids(folder, config_json, template_eos_id)}


def model_stop_ids(source: Mapping[str, Any] | None, eos_id: int) -> list[int]:
    """Every id generation stops at: the template's end token and the recorded folder's stop ids."""
    recorded: Sequence[int] = (source or {}).get(SOURCE_KEY) or ()
    return list(dict.fromkeys([int(eos_id), *(int(i) for i in recorded)]))
