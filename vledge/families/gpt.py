"""The built-in GPT-style decoder: pre-norm blocks, learned absolute positions, one fused q/k/v projection.

Trained from scratch on vledge's data (the ``tiny``/``small``/``base`` presets); it has no Hugging Face form. Its
exported decoder is the graph ``vledge.export.layer_fusion`` was written for: attention and residual + LayerNorm
fuse into ONNX Runtime's contrib ops.
"""

from __future__ import annotations

from dataclasses import dataclass

from vledge.config import LanguageConfig
from vledge.errors import ConfigError
from vledge.families.base import LanguageFamily


@dataclass
class TransformerConfig(LanguageConfig):
    kind: str = "transformer"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden % self.heads:
            raise ConfigError(f"hidden size {self.hidden} is not divisible by {self.heads} heads")


class GPTFamily(LanguageFamily):
    name = "transformer"
    config_class = TransformerConfig
    cache = "kv"
    decoder_fusions = ("attention", "layers")
    bench_peers = True  # torch.compile and OpenVINO were measured on this graph

    def module(self, config: TransformerConfig):
        from vledge.models.transformer import TransformerLM

        return TransformerLM(config)

    def parameter_count(self, config: TransformerConfig) -> int:
        h = config.hidden
        block = 12 * h * h + 13 * h  # q/k/v + output (4h^2 + 4h), MLP (8h^2 + 5h), two LayerNorms (4h)
        head = 0 if config.tie_embeddings else config.vocab_size * h
        return config.layers * block + config.max_positions * h + 2 * h + head


FAMILY = GPTFamily()
