"""Projectors map visual features into the language model's embedding space (LLaVA)."""

from __future__ import annotations

import math

import torch
from torch import nn

from vledge.config import ProjectorConfig


class PixelShuffleProjector(nn.Module):
    """Idefics3's connector: each ``scale`` x ``scale`` block of a square token grid becomes one token (the block's
    features side by side, in the reference's order), then a bias-free linear map to the LM's width."""

    def __init__(self, scale: int, in_features: int, hidden: int) -> None:
        super().__init__()
        self.scale = scale
        self.proj = nn.Linear(in_features * scale * scale, hidden, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_shuffle(tokens, self.scale))


def pixel_shuffle(tokens: torch.Tensor, scale: int) -> torch.Tensor:
    """[B, side*side, C] -> [B, side*side / scale**2, C * scale**2], as Idefics3Connector.pixel_shuffle orders it."""
    # The token count and width are fixed by the tower (plain ints, constants in a traced graph); the batch
    # (tiles) axis stays -1 so an exported vision graph takes any number of tiles.
    count, width = int(tokens.shape[1]), int(tokens.shape[2])
    side = math.isqrt(count)
    x = tokens.reshape(-1, side, side // scale, width * scale).permute(0, 2, 1, 3)
    x = x.reshape(-1, side // scale, side // scale, width * scale * scale).permute(0, 2, 1, 3)
    return x.reshape(-1, count // (scale * scale), width * scale * scale)


def build_projector(config: ProjectorConfig, in_features: int, hidden: int) -> nn.Module:
    if config.kind == "pixel_shuffle":
        return PixelShuffleProjector(config.scale_factor, in_features, hidden)
    if config.kind == "linear":
        layers: list[nn.Module] = [nn.Linear(in_features, hidden)]
    else:  # mlp2x_gelu, as in LLaVA-1.5
        layers = [nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, hidden)]
    if config.norm:
        layers.append(nn.LayerNorm(hidden))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)
