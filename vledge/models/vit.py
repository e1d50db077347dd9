"""Vision transformers (the CLIP and SigLIP families, vledge.families): pixel_values -> the tokens of the chosen hidden layer(s).

Module and parameter names follow Hugging Face's ``CLIPVisionModel`` / ``SiglipVisionModel``
(``embeddings.patch_embedding``, ``encoder.layers.{i}.self_attn.q_proj``, ...), so their
``vision_model.*`` tensors load one to one. Only the blocks the chosen feature layers need are
built: LLaVA-1.5 reads layer -2, so the last block is never run (nor exported).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vledge.config import ViTConfig
from vledge.families import vision_family


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu


class Embeddings(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        family = vision_family(config.family)
        self.patch_embedding = nn.Conv2d(3, config.hidden, config.patch_size, config.patch_size,
                                         bias=family.patch_bias)
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden)) if family.class_token else None
        positions = config.grid * config.grid + (1 if family.class_token else 0)
        self.position_embedding = nn.Embedding(positions, config.hidden)
        self.grid = config.grid
        # Idefics3's towers look their positions up by bucketing each patch's fractional coordinates; for the
        # full tiles vledge feeds that is a fixed permutation, computed once with the reference's arithmetic.
        self.bucketed = family.bucketed_positions
        if self.bucketed:
            self.register_buffer("position_ids", bucketed_position_ids(config.grid, config.grid, config.grid),
                                 persistent=False)

    def reset_buffers(self) -> None:
        if self.bucketed:
            self.position_ids = bucketed_position_ids(self.grid, self.grid, self.grid)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        tokens = patches.flatten(2).transpose(1, 2)  # [B, grid*grid, hidden] in reading order
        if self.class_embedding is not None:
            cls = self.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
            tokens = torch.cat([cls, tokens], dim=1)
        if self.bucketed:
            return tokens + self.position_embedding.weight[self.position_ids][None]
        return tokens + self.position_embedding.weight[None]


def bucketed_position_ids(side: int, rows: int, cols: int) -> torch.Tensor:
    """Position ids of a ``rows`` x ``cols`` patch grid in a tower of ``side`` x ``side`` positions.

    Idefics3VisionEmbeddings' arithmetic for a patch grid with every patch real: float32 fractional coordinates
    ``i / rows`` bucketed against ``arange(1/side, 1, 1/side)`` (right-closed), so float rounding places each
    patch exactly where the reference does.
    """
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    coords_h = torch.clamp(torch.arange(rows, dtype=torch.float32) * (1.0 / torch.tensor(float(rows))),
                           max=1.0 - 1e-6)
    coords_w = torch.clamp(torch.arange(cols, dtype=torch.float32) * (1.0 / torch.tensor(float(cols))),
                           max=1.0 - 1e-6)
    bucket_h = torch.bucketize(coords_h, boundaries, right=True)
    bucket_w = torch.bucketize(coords_w, boundaries, right=True)
    return (bucket_h[:, None] * side + bucket_w[None, :]).reshape(-1)


class Attention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = config.heads, config.hidden // config.heads
        self.q_proj = nn.Linear(config.hidden, config.hidden)
        self.k_proj = nn.Linear(config.hidden, config.hidden)
        self.v_proj = nn.Linear(config.hidden, config.hidden)
        self.out_proj = nn.Linear(config.hidden, config.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        q, k, v = (proj(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq, hidden))


class MLP(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden, config.intermediate)
        self.fc2 = nn.Linear(config.intermediate, config.hidden)
        self.act = _activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: ViTConfig, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(layers))


def resolved_feature_layers(config: ViTConfig) -> tuple[int, ...]:
    """Feature layers as non-negative hidden-state indices (0: embeddings, i: after block i)."""
    return tuple(layer if layer >= 0 else config.layers + 1 + layer for layer in config.feature_layers)


class VisionTransformer(nn.Module):
    """pixel_values [B, 3, S, S] -> visual tokens [B, num_tokens, out_features]."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.feature_layers = resolved_feature_layers(config)
        self.embeddings = Embeddings(config)
        # CLIP normalises the embeddings before the first block (HF spells it "pre_layrnorm").
        self.pre_layrnorm = (nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
                             if vision_family(config.family).pre_layernorm else None)
        self.encoder = Encoder(config, max(self.feature_layers))
        self.post_layernorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps) if config.post_norm else None
        self.out_features = config.out_features
        self.num_tokens = config.num_tokens

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states 0 .. max(feature_layers), as HF's ``output_hidden_states`` numbers them."""
        x = self.embeddings(pixel_values)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.hidden_states(pixel_values)
        chosen = [states[index] for index in self.feature_layers]
        if self.post_layernorm is not None:
            chosen = [self.post_layernorm(state) for state in chosen]
        if self.config.select == "default":
            chosen = [state[:, 1:] for state in chosen]
        tokens = chosen[0] if len(chosen) == 1 else torch.cat(chosen, dim=-1)
        return reduce_tokens(tokens, self.config.reduction)


def reduce_tokens(tokens: torch.Tensor, reduction: str | None) -> torch.Tensor:
    """2x2 token reduction of a square grid in reading order: 4x fewer tokens for the language model."""
    if reduction is None:
        return tokens
    batch, count, width = tokens.shape
    side = math.isqrt(count)
    if reduction == "avg_pool_2x2":
        grid = tokens.transpose(1, 2).reshape(batch, width, side, side)
        return F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    # pixel_shuffle_2x2: each 2x2 block of tokens becomes one token 4x as wide
    half = side // 2
    blocks = tokens.reshape(batch, half, 2, half, 2, width).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(batch, half * half, 4 * width)
