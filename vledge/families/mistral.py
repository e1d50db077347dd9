"""Mistral: the Llama family with a sliding attention window (refused where it is shorter than the context)."""

from __future__ import annotations

from dataclasses import dataclass

from vledge.families.llama import LlamaConfig, LlamaFamily


@dataclass
class MistralConfig(LlamaConfig):
    kind: str = "mistral"


class MistralFamily(LlamaFamily):
    name = "mistral"
    config_class = MistralConfig
    hf_architectures = ("MistralForCausalLM",)
    hf_model_types = ("mistral",)
    refuse_attention_bias = False
    sliding_window = "always"
    hf_defaults = {**LlamaFamily.hf_defaults, "intermediate_size": 14336, "num_key_value_heads": 8,
                   "max_position_embeddings": 131072, "sliding_window": 4096}


FAMILY = MistralFamily()
