"""The fusion model: vision encoder -> projector -> visual tokens spliced into a causal LM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vledge.config import ModelConfig
from vledge.errors import ConfigError
from vledge.models.lora import lora_parameters
from vledge.models.projector import build_projector
from vledge.models.vision import VisionEncoder

IGNORE_INDEX = -100
IMAGE_POSITION_INIT_STD = 0.5


@dataclass
class VLMOutput:
    logits: torch.Tensor  # [B, merged_seq, vocab]
    loss: torch.Tensor | None
    labels: torch.Tensor | None  # merged labels, aligned with logits


@dataclass
class MergedInputs:
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None


def materialize_buffers(model: nn.Module) -> None:
    """Make the buffers a module computes from its config (not saved in a state dict) after a meta-device build.

    A module that holds such a buffer defines ``reset_buffers()``; any meta tensor left afterwards is an error
    rather than a model that fails on its first forward.
    """
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if callable(reset) and any(b.is_meta for b in module.buffers(recurse=False)):
            reset()
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise ConfigError(f"the model still has tensors without values after loading: {left[:5]}")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so left- and right-padded rows see the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class VisionLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, image_token_id: int) -> None:
        super().__init__()
        if config.language.vocab_size <= 0:
            raise ConfigError("language.vocab_size must be set from the tokenizer before building the model")
        self.config = config
        self.image_token_id = image_token_id
        self.vision = VisionEncoder(config.vision)
        self.projector = build_projector(config.projector, self.vision.out_channels, config.language.hidden)
        self.embed_tokens = nn.Embedding(config.language.vocab_size, config.language.hidden)
        # The family's module; a KV-cache family follows TransformerLM's forward contract, a recurrent one LSTMLM's.
        self.language: nn.Module = config.language.family.module(config.language)
        # Visual tokens per image (per tile for a tiled model): what the vision graph outputs per input row.
        self.num_image_tokens = self.vision.num_tokens(config.preprocess.image_size) // config.projector.scale_factor ** 2
        # A tiled model's prompts hold one image token per visual token (expanded as vledge.image_tiles says),
        # filled in order; every other model's hold one image token per image, replaced by its visual tokens.
        self.fills_image_tokens = config.preprocess.tiles is not None
        # One learned vector per visual token position, as loud as the visual tokens themselves.
        self.image_positions = (
            nn.Parameter(torch.randn(self.num_image_tokens, config.language.hidden) * IMAGE_POSITION_INIT_STD)
            if config.projector.positions else None
        )
        # GPT-style small init for the language side only; the projector keeps PyTorch's default
        # (fan-in) init so visual tokens start as loud as they must be to be used at all.
        self.embed_tokens.apply(self._init_weights)
        self.language.apply(self._init_weights)
        if config.language.tie_embeddings:
            self.language.lm_head.weight = self.embed_tokens.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def is_transformer(self) -> bool:
        """An LM with a key/value cache (its family's ``cache`` is "kv"), not a recurrent state."""
        return self.config.language.has_kv_cache

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> image embeddings [B, image_tokens, hidden] (what vision_encoder.onnx outputs)."""
        return self.place_visual_tokens(self.projector(self.vision(pixel_values)))

    def place_visual_tokens(self, projected: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens -> image embeddings: adds each token's cell embedding, if any."""
        return projected if self.image_positions is None else projected + self.image_positions

    def merge(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> MergedInputs:
        """Replace each row's single image token by that row's visual tokens.

        Every row grows by the same amount, so left or right padding stays where it was. A tiled model's rows
        keep their length: their image tokens take the visual tokens of ``image_embeds`` [tiles, tokens, hidden]
        one by one, in order (the tiles of every row, row after row).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        is_image = input_ids == self.image_token_id
        if self.fills_image_tokens:
            return self._fill(input_ids, is_image, image_embeds, attention_mask, labels)
        per_row = is_image.sum(dim=1)
        if not bool((per_row == 1).all()):
            raise ConfigError(f"every sequence needs exactly one image token, got counts {per_row.tolist()}")
        text_embeds = self.embed_tokens(input_ids)
        n_img, length = image_embeds.shape[1], input_ids.shape[1]
        # One gather for the whole batch: merged position j of a row whose image token sits at p
        # holds text j (j < p), visual token j - p (p <= j < p + n_img) or text j - n_img + 1.
        merged_pos = torch.arange(length - 1 + n_img, device=input_ids.device)[None, :]
        image_at = is_image.long().argmax(dim=1, keepdim=True)
        in_image = (merged_pos >= image_at) & (merged_pos < image_at + n_img)
        text_index = torch.where(merged_pos < image_at, merged_pos, merged_pos - n_img + 1).clamp(0, length - 1)
        image_index = (merged_pos - image_at).clamp(0, n_img - 1)
        hidden = text_embeds.shape[-1]
        embeds = torch.where(
            in_image[..., None],
            image_embeds.to(text_embeds.dtype).gather(1, image_index[..., None].expand(-1, -1, hidden)),
            text_embeds.gather(1, text_index[..., None].expand(-1, -1, hidden)),
        )
        merged_mask = torch.where(in_image, 1, attention_mask.gather(1, text_index)).to(attention_mask.dtype)
        merged_labels = (
            torch.where(in_image, IGNORE_INDEX, labels.gather(1, text_index)) if labels is not None else None
        )
        return MergedInputs(
            inputs_embeds=embeds,
            attention_mask=merged_mask,
            position_ids=position_ids_from_mask(merged_mask),
            labels=merged_labels,
        )

    def _fill(self, input_ids: torch.Tensor, is_image: torch.Tensor, image_embeds: torch.Tensor,
              attention_mask: torch.Tensor, labels: torch.Tensor | None) -> MergedInputs:
        text_embeds = self.embed_tokens(input_ids)
        visual = image_embeds.reshape(-1, text_embeds.shape[-1]).to(text_embeds.dtype)
        count = int(is_image.sum())
        if count != visual.shape[0]:
            raise ConfigError(f"the prompts hold {count} image tokens for {visual.shape[0]} visual tokens "
                              f"({image_embeds.shape[0]} tiles of {self.num_image_tokens})")
        embeds = text_embeds.masked_scatter(is_image[..., None], visual)
        merged_labels = torch.where(is_image, IGNORE_INDEX, labels) if labels is not None else None
        return MergedInputs(inputs_embeds=embeds, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask), labels=merged_labels)

    def decode(self, merged: MergedInputs) -> torch.Tensor:
        if self.is_transformer:
            logits, _ = self.language(merged.inputs_embeds, merged.attention_mask, merged.position_ids)
        else:
            logits, _ = self.language(merged.inputs_embeds)
        return logits

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> VLMOutput:
        merged = self.merge(input_ids, self.encode_images(pixel_values), attention_mask, labels)
        logits = self.decode(merged)
        loss = self.loss(logits, merged.labels) if merged.labels is not None else None
        return VLMOutput(logits=logits, loss=loss, labels=merged.labels)

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross entropy, averaged over the labelled (answer) tokens."""
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
        )

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by trainable part name, as stages name them."""
        return {
            "vision": list(self.vision.parameters()),
            "projector": list(self.projector.parameters())
            + ([self.image_positions] if self.image_positions is not None else []),
            # With LoRA adapters only they train; dict.fromkeys lists a tied head (the embeddings) once.
            "language": lora_parameters(self.language)
            or list(dict.fromkeys([*self.embed_tokens.parameters(), *self.language.parameters()])),
        }
