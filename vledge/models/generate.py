"""Reference generation with the PyTorch model; the export and the runtime are compared with it.

Token choice lives in ``vledge.decoding`` (shared with the runtime); this module only
computes logits: a transformer keeps a KV cache (or recomputes everything, for tests),
an LSTM keeps its hidden and cell state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from vledge.decoding import GenerationOptions, TokenCallback, decode_tokens, left_pad
from vledge.models.vlm import VisionLanguageModel, position_ids_from_mask


class TransformerSteps:
    """KV-cached decode steps over a left-padded batch."""

    def __init__(self, model: VisionLanguageModel, inputs_embeds, attention_mask, use_cache: bool = True) -> None:
        self.model, self.use_cache = model, use_cache
        self.mask = attention_mask
        self.embeds = inputs_embeds  # full history, kept only when not caching
        logits, self.past = model.language(inputs_embeds, attention_mask, position_ids_from_mask(attention_mask))
        self.first_logits = logits[:, -1]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        new = self.model.embed_tokens(torch.as_tensor(tokens, device=self.mask.device)[:, None])
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        positions = position_ids_from_mask(self.mask)
        if self.use_cache:
            logits, self.past = self.model.language(new, self.mask, positions[:, -1:], self.past)
        else:
            self.embeds = torch.cat([self.embeds, new], dim=1)
            logits, _ = self.model.language(self.embeds, self.mask, positions)
        return logits[:, -1].float().cpu().numpy()

    def reorder(self, rows: np.ndarray) -> None:
        index = torch.as_tensor(rows, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        self.embeds = self.embeds.index_select(0, index)
        self.past = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.past]


class LSTMSteps:
    """Each row is prefilled on its own (no padding ever enters the state), then decoded as a batch."""

    def __init__(self, model: VisionLanguageModel, rows_embeds: list[torch.Tensor]) -> None:
        self.model = model
        hidden, cell, last = [], [], []
        for embeds in rows_embeds:
            logits, (h, c) = model.language(embeds[None])
            hidden.append(h)
            cell.append(c)
            last.append(logits[:, -1])
        self.state = (torch.cat(hidden, dim=1), torch.cat(cell, dim=1))
        self.first_logits = torch.cat(last)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        new = self.model.embed_tokens(torch.as_tensor(tokens, device=self.state[0].device)[:, None])
        logits, self.state = self.model.language(new, self.state)
        return logits[:, -1].float().cpu().numpy()

    def reorder(self, rows: np.ndarray) -> None:
        index = torch.as_tensor(rows, device=self.state[0].device)
        self.state = (self.state[0].index_select(1, index), self.state[1].index_select(1, index))


def prefill_steps(model: VisionLanguageModel, image_embeds: torch.Tensor, prompts: Sequence[Sequence[int]],
                  pad_id: int, use_cache: bool = True) -> tuple[TransformerSteps | LSTMSteps, int | None]:
    """Prefill (image, prompt) rows; returns the step model and, for a transformer, the positions left."""
    device = image_embeds.device
    if not model.is_transformer:
        rows = [model.merge(torch.as_tensor([list(prompt)], device=device), image_embeds[row:row + 1]).inputs_embeds[0]
                for row, prompt in enumerate(prompts)]
        return LSTMSteps(model, rows), None
    ids, mask = left_pad(prompts, pad_id)
    merged = model.merge(torch.as_tensor(ids, device=device), image_embeds, torch.as_tensor(mask, device=device))
    room = model.config.language.max_positions - merged.inputs_embeds.shape[1]
    if room < 1:
        raise ValueError(f"prompt of {merged.inputs_embeds.shape[1]} positions leaves no room in the model's "
                         f"{model.config.language.max_positions}")
    return TransformerSteps(model, merged.inputs_embeds, merged.attention_mask, use_cache=use_cache), room


@torch.inference_mode()
def generate(
    model: VisionLanguageModel,
    pixel_values: torch.Tensor,
    prompts: Sequence[Sequence[int]],
    options: GenerationOptions,
    eos_id: int,
    pad_id: int,
    use_cache: bool = True,
    on_token: TokenCallback | None = None,
) -> list[list[int]]:
    """New token ids for each (image, prompt) row; each prompt holds one image token."""
    if len(prompts) != pixel_values.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {pixel_values.shape[0]} images")
    device = next(model.parameters()).device
    image_embeds = model.encode_images(pixel_values.to(device))
    steps, room = prefill_steps(model, image_embeds, prompts, pad_id, use_cache=use_cache)
    if room is not None and options.max_new_tokens > room:
        options = dataclasses.replace(options, max_new_tokens=room)
    first = steps.first_logits.float().cpu().numpy()
    return decode_tokens(first, steps, options, eos_id, on_token)
