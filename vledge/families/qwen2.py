"""Qwen2: the Llama family with biases on the query, key and value projections and an opt-in sliding window."""

from __future__ import annotations

from dataclasses import dataclass

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
    refuse_attention_bias = False
    sliding_window = "opt_in"
    hf_defaults = {**LlamaFamily.hf_defaults, "vocab_size": 151936, "intermediate_size": 22016,
                   "num_key_value_heads": 32, "max_position_embeddings": 32768}


FAMILY = Qwen2Family()
