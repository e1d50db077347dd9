"""Checks on a Llama-family folder's settings and weights that must fail with a clear message. Torch-free.

Each refuses what vledge would otherwise run differently from transformers: a RoPE variant it does
not implement, or an LM head stored apart from the embeddings it is declared tied to.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from vledge.config import ROPE_SCALINGS
from vledge.errors import ConfigError, WeightsError

EMBEDDINGS, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def check_rope_type(rope: Mapping[str, Any], where: str) -> None:
    """ConfigError naming the rope type of a ``rope_parameters`` / ``rope_scaling`` mapping vledge cannot run."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise ConfigError(f"{where}: rope type {kind!r} is not supported (vledge implements "
                          f"{', '.join(ROPE_SCALINGS)})")


def drop_tied_head(tensors: MutableMapping[str, Any], folder: Path) -> None:
    """Remove a stored ``lm_head.weight`` of a tied LM: allowed only as an exact copy of the embeddings.

    Some tied folders store the shared matrix twice; a head that differs means the folder's weights
    and its ``tie_word_embeddings`` disagree, and dropping it would silently change the model.
    """
    head = tensors.get(HEAD)
    if head is None:
        return
    embeddings = tensors.get(EMBEDDINGS)
    same = embeddings is None or (tuple(head.shape) == tuple(embeddings.shape) and bool((head == embeddings).all()))
    if not same:
        raise WeightsError(f"{folder}: lm_head.weight differs from embed_tokens.weight although the config ties "
                           "them (tie_word_embeddings); set tie_word_embeddings to false to use the stored head")
    del tensors[HEAD]
