"""Qwen2: the Llama family with biases on the query, key and value projections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vledge.families.hf_config import HFConfig
from vledge.families.llama import LlamaConfig, LlamaFamily


@dataclass
class Qwen2Config(LlamaConfig):
    kind: str = "qwen2"
    qkv_bias: bool = True


class Qwen2Family(LlamaFamily):
    name = "qwen2"
    config_class = Qwen2Config
    hf_architectures = ("Qwen2ForCausalLM",)
    hf_model_types = ("qwen2",)
    hf_defaults = {**LlamaFamily.hf_defaults, "vocab_size": 151936, "intermediate_size": 22016,
                   "num_key_value_heads": 32, "max_position_embeddings": 32768}

    def check_hf_config(self, values: HFConfig, context: int) -> None:
        window = values.raw("sliding_window", None)
        if window is not None and values.bool("use_sliding_window", default=False) and \
                values.int("sliding_window", high=2**31) < context:
            from vledge.errors import ConfigError

            raise ConfigError(f"{values.where}: sliding_window {window} is shorter than the context vledge uses "
                              f"({context} tokens); lower --max-seq-len to at most the window")

    def config_extras(self, values: HFConfig) -> dict[str, Any]:
        return {"qkv_bias": True}


FAMILY = Qwen2Family()
