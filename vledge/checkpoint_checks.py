"""Checks of a checkpoint's parts that torch's safe loader lets through: tensor layouts, token texts, the
tokenizer. Each failure is one CheckpointError naming the file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vledge.errors import CheckpointError, TokenizerError


def check_tensor_layout(name: str, tensor: Any, source: str) -> None:
    """A weight must be a dense tensor with data: sparse or meta tensors (no values) are refused."""
    import torch

    if tensor.layout != torch.strided:
        raise CheckpointError(f"{source}: weight {name} is a {str(tensor.layout).removeprefix('torch.')} tensor; "
                              "weights are dense (strided) tensors")
    if tensor.is_meta or tensor.device.type == "meta":
        raise CheckpointError(f"{source}: weight {name} is a meta tensor: it holds no values")


def check_special_tokens(model_config: Any, source: str) -> None:
    """``model_config.special_tokens`` is absent, null, or a mapping of role names to token texts."""
    if not isinstance(model_config, Mapping):
        return  # the config's own checks name this
    tokens = model_config.get("special_tokens")
    if tokens is None:
        return
    if not isinstance(tokens, Mapping):
        raise CheckpointError(f"{source}: model_config.special_tokens is {type(tokens).__name__}, "
                              "not a mapping of role -> token text")
    for role, text in tokens.items():
        if not isinstance(role, str) or not isinstance(text, str):
            raise CheckpointError(f"{source}: model_config.special_tokens entry {role!r}: {text!r} is not "
                                  "text -> text")


def checkpoint_tokenizer(tokenizer_json: str, roles: Mapping[str, str] | None, source: str):
    """The checkpoint's tokenizer; a tokenizer that cannot be built is a CheckpointError naming the file."""
    from vledge.tokenizer import Tokenizer

    try:
        return Tokenizer.from_json(tokenizer_json, roles)
    except TokenizerError as exc:
        raise CheckpointError(f"{source}: its tokenizer cannot be used: {exc}") from None
