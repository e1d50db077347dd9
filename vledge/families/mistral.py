"""Mistral: the Llama family with a sliding attention window (refused where it is shorter than the context)."""

from __future__ import annotations

from dataclasses import dataclass

from vledge.errors import ConfigError
from vledge.families.hf_config import HFConfig
from vledge.families.llama import LlamaConfig, LlamaFamily


@dataclass
class MistralConfig(LlamaConfig):
    kind: str = "mistral"


class MistralFamily(LlamaFamily):
    name = "mistral"
    config_class = MistralConfig
    hf_architectures = ("MistralForCausalLM",)
    hf_model_types = ("mistral",)
    hf_defaults = {**LlamaFamily.hf_defaults, "intermediate_size": 14336, "num_key_value_heads": 8,
                   "max_position_embeddings": 131072, "sliding_window": 4096}

    def check_hf_config(self, values: HFConfig, context: int) -> None:
        window = values.raw("sliding_window", None)
        if window is not None and values.int("sliding_window", high=2**31) < context:
            raise ConfigError(f"{values.where}: sliding_window {window} is shorter than the context vledge uses "
                              f"({context} tokens); lower --max-seq-len to at most the window")


FAMILY = MistralFamily()
