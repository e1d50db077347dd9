"""The LSTM decoder of the original CNN+LSTM captioning write-up, fed with visual tokens first."""

from __future__ import annotations

import torch
from torch import nn

from vledge.config import LanguageConfig

State = tuple[torch.Tensor, torch.Tensor]  # hidden, cell: [layers, batch, hidden]


class LSTMLM(nn.Module):
    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.config = config
        self.lstm = nn.LSTM(config.hidden, config.hidden, config.layers, batch_first=True,
                            dropout=config.dropout if config.layers > 1 else 0.0)
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)

    def forward(self, inputs_embeds: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        output, state = self.lstm(self.drop(inputs_embeds), state)
        return self.lm_head(self.drop(output)), state
