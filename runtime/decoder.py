"""Decode loops over the merged decoder graph: the ONNX Runtime side of ``vledge.decoding.StepModel``.

The KV cache (or LSTM state) stays in ONNX Runtime values between steps through
IO binding: each step binds the previous step's ``present`` outputs as the next
``past`` inputs, so on a GPU nothing travels through numpy but the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort


@dataclass
class Graphs:
    """The three sessions of one precision choice, with the facts the loops need."""

    vision: ort.InferenceSession
    embed: ort.InferenceSession
    decoder: ort.InferenceSession
    language_kind: str
    layers: int
    heads: int
    head_dim: int
    hidden: int
    device: str = "cpu"  # "cpu" or "cuda": where IO binding keeps the cache
    device_id: int = 0

    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        return self.embed.run(None, {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)})[0]

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.vision.run(None, {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)})[0]


def position_ids_from_mask(mask: np.ndarray) -> np.ndarray:
    """Positions count real tokens only (as in training), so padding never shifts them."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)


class TransformerSteps:
    """Prefill a left-padded batch (optionally after a cached prefix), then one token per row per step."""

    def __init__(self, graphs: Graphs, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
                 past: list[np.ndarray] | None = None) -> None:
        self.graphs = graphs
        batch = inputs_embeds.shape[0]
        self.past_names = [f"past_key_values.{i}.{kind}" for i in range(graphs.layers) for kind in ("key", "value")]
        self.present_names = [f"present.{i}.{kind}" for i in range(graphs.layers) for kind in ("key", "value")]
        if past is None:
            empty = np.zeros((batch, graphs.heads, 0, graphs.head_dim), dtype=np.float32)
            past_values = [ort.OrtValue.ortvalue_from_numpy(empty, graphs.device, graphs.device_id)] * len(self.past_names)
            past_len = 0
        else:
            past_values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(p), graphs.device, graphs.device_id)
                           for p in past]
            past_len = past[0].shape[2]
        self.mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        if self.mask.shape[1] != past_len + inputs_embeds.shape[1]:
            raise ValueError(f"attention_mask covers {self.mask.shape[1]} positions, "
                             f"past {past_len} + new {inputs_embeds.shape[1]}")
        positions = position_ids_from_mask(self.mask)[:, past_len:]
        self.first_logits = self._run(inputs_embeds, positions, past_values)

    def _run(self, inputs_embeds: np.ndarray, positions: np.ndarray, past_values: list) -> np.ndarray:
        binding = self.graphs.decoder.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, dtype=np.float32))
        binding.bind_cpu_input("attention_mask", self.mask)
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        for name, value in zip(self.past_names, past_values):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.graphs.device, self.graphs.device_id)
        self.graphs.decoder.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.past_values = outputs[1:]
        return outputs[0].numpy()[:, -1].astype(np.float32)

    @property
    def past_length(self) -> int:
        return self.past_values[0].shape()[2]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        embeds = self.graphs.embed_ids(np.asarray(tokens, dtype=np.int64)[:, None])
        self.mask = np.concatenate([self.mask, np.ones((self.mask.shape[0], 1), dtype=np.int64)], axis=1)
        positions = position_ids_from_mask(self.mask)[:, -1:]
        return self._run(embeds, positions, self.past_values)

    def reorder(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        self.mask = self.mask[rows]
        self.past_values = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[rows]), self.graphs.device,
                                             self.graphs.device_id)
            for value in self.past_values
        ]


class LSTMSteps:
    """Rows are prefilled one by one (an LSTM has no mask to hide padding), then decoded as a batch."""

    def __init__(self, graphs: Graphs, rows_embeds: list[np.ndarray],
                 state: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.graphs = graphs
        hidden_rows, cell_rows, last = [], [], []
        for embeds in rows_embeds:
            h0, c0 = state if state is not None else self._zero_state(1)
            logits, h, c = self._run_numpy(embeds[None], h0, c0)
            hidden_rows.append(h)
            cell_rows.append(c)
            last.append(logits[:, -1])
        self.hidden = np.concatenate(hidden_rows, axis=1)
        self.cell = np.concatenate(cell_rows, axis=1)
        self.first_logits = np.concatenate(last).astype(np.float32)

    def _zero_state(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.graphs.layers, batch, self.graphs.hidden)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def _run_numpy(self, embeds, hidden, cell):
        return self.graphs.decoder.run(None, {
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),
            "past_hidden": np.ascontiguousarray(hidden, dtype=np.float32),
            "past_cell": np.ascontiguousarray(cell, dtype=np.float32),
        })

    def step(self, tokens: np.ndarray) -> np.ndarray:
        embeds = self.graphs.embed_ids(np.asarray(tokens, dtype=np.int64)[:, None])
        logits, self.hidden, self.cell = self._run_numpy(embeds, self.hidden, self.cell)
        return logits[:, -1].astype(np.float32)

    def reorder(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        self.hidden = np.ascontiguousarray(self.hidden[:, rows])
        self.cell = np.ascontiguousarray(self.cell[:, rows])
