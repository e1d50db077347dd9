"""Projectors map visual features into the language model's embedding space (LLaVA)."""

from __future__ import annotations

from torch import nn

from vledge.config import ProjectorConfig


def build_projector(config: ProjectorConfig, in_features: int, hidden: int) -> nn.Module:
    if config.kind == "linear":
        layers: list[nn.Module] = [nn.Linear(in_features, hidden)]
    else:  # mlp2x_gelu, as in LLaVA-1.5
        layers = [nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, hidden)]
    if config.norm:
        layers.append(nn.LayerNorm(hidden))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)
