"""Idefics3's vision tower (SmolVLM's too): SigLIP's blocks with positions bucketed for any patch grid.

The tower is SigLIP's (biased patch embedding, no class token, no LayerNorm before the blocks, the final LayerNorm
on the last hidden state); its positions are looked up by bucketing each patch's fractional coordinates, which
vledge reproduces for the full tiles its image processor makes (``vledge.models.vit.bucketed_position_ids``).
Every tile the processor makes is ``max_image_size`` square, so the exported vision graph takes
``pixel_values [batch, tiles, 3, T, T]`` (transformers.js's layout, flattened in the graph:
``vledge.export.tile_batches``) and no patch mask: transformers' mask is all ones for such tiles, and the
all-zero padding tiles of a batch are dropped before the tower there as here (nothing pads them in). The connector
(pixel shuffle, then a bias-free projection) is ``ProjectorConfig(kind="pixel_shuffle")``; the whole-folder
reading is ``vledge.hf.idefics3``.
"""

from __future__ import annotations

from vledge.families.siglip import SiglipFamily


class Idefics3VisionFamily(SiglipFamily):
    name = "idefics3"
    bucketed_positions = True
    hf_model_types = ("idefics3_vision", "smolvlm_vision")
    hf_parent_model_types = ("idefics3", "smolvlm")
    # transformers' Idefics3VisionConfig defaults
    hf_defaults = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 16, "image_size": 224, "patch_size": 32,
                   "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "num_channels": 3}
    hf_image_processors = tuple(f"{family}ImageProcessor{suffix}" for family in ("Idefics3", "SmolVLM")
                                for suffix in ("", "Pil", "Fast"))
    transformers_js = True  # its vision graph takes [batch, tiles, 3, S, S] (vledge.export.tile_batches)


FAMILY = Idefics3VisionFamily()
