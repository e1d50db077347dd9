"""The PyTorch model as a generation engine; the export and the runtime are compared with it.

``TorchEngine`` implements ``vledge.generation.Engine`` (``encode_images``, ``prefill``), so token
choice, stop strings, the positions clamp and the results are the code the ONNX Runtime engine
uses too. This module only computes logits: a transformer keeps a KV cache (or recomputes
everything, for tests), an LSTM keeps its hidden and cell state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vledge.decoding import GenerationOptions, TokenCallback, decode_tokens, left_pad
from vledge.errors import ConfigError
from vledge.generation import clamp_to_positions, split_rows, with_model_stops
from vledge.hf.generation_config import model_stop_ids
from vledge.models.vlm import VisionLanguageModel, position_ids_from_mask
from vledge.tokenizer import Tokenizer


class TorchTransformerSteps:
    """KV-cached decode steps over a left-padded batch; logits come back as float32 numpy arrays."""

    def __init__(self, model: VisionLanguageModel, inputs_embeds, attention_mask, use_cache: bool = True) -> None:
        self.model, self.use_cache = model, use_cache
        self.mask = attention_mask
        self.embeds = inputs_embeds  # full history, kept only when not caching
        with torch.inference_mode():
            logits, self.past = model.language(inputs_embeds, attention_mask, position_ids_from_mask(attention_mask))
        self.first_logits = logits[:, -1].float().cpu().numpy()

    @torch.inference_mode()
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


class TorchLSTMSteps:
    """Each row is prefilled on its own (no padding ever enters the state), then decoded as a batch."""

    def __init__(self, model: VisionLanguageModel, rows_embeds: list[torch.Tensor]) -> None:
        self.model = model
        hidden, cell, last = [], [], []
        with torch.inference_mode():
            for embeds in rows_embeds:
                logits, (h, c) = model.language(embeds[None])
                hidden.append(h)
                cell.append(c)
                last.append(logits[:, -1])
        self.state = (torch.cat(hidden, dim=1), torch.cat(cell, dim=1))
        self.first_logits = torch.cat(last).float().cpu().numpy()

    @torch.inference_mode()
    def step(self, tokens: np.ndarray) -> np.ndarray:
        new = self.model.embed_tokens(torch.as_tensor(tokens, device=self.state[0].device)[:, None])
        logits, self.state = self.model.language(new, self.state)
        return logits[:, -1].float().cpu().numpy()

    def reorder(self, rows: np.ndarray) -> None:
        index = torch.as_tensor(rows, device=self.state[0].device)
        self.state = (self.state[0].index_select(1, index), self.state[1].index_select(1, index))


class TorchEngine:
    """A ``VisionLanguageModel`` as a ``vledge.generation.Engine``: numpy in, numpy out, on the model's device."""

    def __init__(self, model: VisionLanguageModel, tokenizer: Tokenizer, use_cache: bool = True) -> None:
        self.model, self.tokenizer, self.use_cache = model, tokenizer, use_cache

    @property
    def stop_token_ids(self) -> list[int]:
        """The template's end token and the stop ids recorded from a pretrained LM's folder."""
        return model_stop_ids(self.model.config.language.source, self.tokenizer.eos_id)

    @property
    def device(self) -> torch.device:
        parameter = next(self.model.parameters(), None)  # a dynamically quantized model may have none
        return parameter.device if parameter is not None else torch.device("cpu")

    @torch.inference_mode()
    def encode_images(self, pixel_values) -> np.ndarray:
        pixels = torch.as_tensor(np.asarray(pixel_values, dtype=np.float32) if not torch.is_tensor(pixel_values)
                                 else pixel_values)
        return self.model.encode_images(pixels.to(self.device)).float().cpu().numpy()

    @torch.inference_mode()
    def prefill(self, image_embeds, prompt_ids: Sequence[Sequence[int]], options: GenerationOptions):
        """Prefill (image, prompt) rows; returns the step model and ``options`` clamped to the positions left."""
        model, device = self.model, self.device
        if len(prompt_ids) != len(image_embeds):
            raise ConfigError(f"{len(prompt_ids)} prompts for {len(image_embeds)} rows of image embeddings")
        if model.fills_image_tokens:  # one array of tiles per row; their tokens fill the image tokens in order
            image_embeds = torch.cat([torch.as_tensor(np.asarray(row, dtype=np.float32)).reshape(
                -1, model.config.language.hidden) for row in image_embeds]).to(device)
        else:
            image_embeds = torch.as_tensor(image_embeds).to(device)
        if not model.is_transformer:
            rows = [model.merge(torch.as_tensor([list(prompt)], device=device),
                                image_embeds[row:row + 1]).inputs_embeds[0] for row, prompt in enumerate(prompt_ids)]
            return TorchLSTMSteps(model, rows), options
        ids, mask = left_pad(prompt_ids, self.tokenizer.pad_id)
        merged = model.merge(torch.as_tensor(ids, device=device), image_embeds, torch.as_tensor(mask, device=device))
        options = clamp_to_positions(options, merged.inputs_embeds.shape[1], model.config.language.max_positions)
        steps = TorchTransformerSteps(model, merged.inputs_embeds, merged.attention_mask, use_cache=self.use_cache)
        return steps, options

    def prefill_logits(self, image_embeds, prompt_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Next-token logits [rows, vocab] after the prompt (the parity gate's prefill stage)."""
        return self.prefill(image_embeds, prompt_ids, GenerationOptions())[0].first_logits


def generate(
    model: VisionLanguageModel,
    pixel_values: torch.Tensor,
    prompts: Sequence[Sequence[int]],
    options: GenerationOptions,
    eos_id: int,
    pad_id: int,
    use_cache: bool = True,
    on_token: TokenCallback | None = None,
    tiles_per_row: Sequence[int] | None = None,
) -> list[list[int]]:
    """New token ids for each (image, prompt) row (each prompt holds one image token); no text, no stop strings.

    A tiled model's ``pixel_values`` hold every row's tiles one row after the other, ``tiles_per_row`` how many
    are each row's, and its prompts the expanded image tokens (``vledge.image_tiles``).
    For text, stop strings and timings use ``vledge.generation.generate_from_pixels`` with a
    :class:`TorchEngine`; the tokens are the same.
    """
    rows = pixel_values.shape[0] if tiles_per_row is None else len(tiles_per_row)
    if len(prompts) != rows:
        raise ConfigError(f"{len(prompts)} prompts for {rows} images")
    engine = TorchEngine(model, _Ids(eos_id, pad_id), use_cache=use_cache)
    image_embeds = engine.encode_images(pixel_values)
    if tiles_per_row is not None:
        image_embeds = split_rows(image_embeds, tiles_per_row)
    steps, options = engine.prefill(image_embeds, prompts, with_model_stops(options, engine.stop_token_ids))
    return decode_tokens(steps.first_logits, steps, options, eos_id, on_token)


class _Ids:
    """The two tokenizer facts ``generate`` needs when it is given ids rather than a tokenizer."""

    def __init__(self, eos_id: int, pad_id: int) -> None:
        self.eos_id, self.pad_id = eos_id, pad_id
