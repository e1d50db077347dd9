"""The LSTM decoder of the original CNN+LSTM captioning write-up, fed with the visual tokens first.

Its recurrent state (hidden and cell) replaces the key/value cache: the merged decoder takes ``past_hidden`` /
``past_cell`` and returns ``present_hidden`` / ``present_cell`` (docs/model-directory.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from vledge.config import LanguageConfig
from vledge.families.base import LanguageFamily


@dataclass
class LSTMConfig(LanguageConfig):
    kind: str = "lstm"


class LSTMFamily(LanguageFamily):
    name = "lstm"
    config_class = LSTMConfig
    cache = "recurrent"
    q4_refusal = ("q4 is not applicable to an LSTM decoder: its only MatMul weight is the LM head, which stays "
                  "float; use int8 instead")

    def module(self, config: LSTMConfig):
        from vledge.models.lstm import LSTMLM

        return LSTMLM(config)

    def parameter_count(self, config: LSTMConfig) -> int:
        h = config.hidden
        head = 0 if config.tie_embeddings else config.vocab_size * h
        return config.layers * (8 * h * h + 8 * h) + head


FAMILY = LSTMFamily()
