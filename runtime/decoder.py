"""Decode loops over the merged decoder graph: the ONNX Runtime side of ``vledge.decoding.StepModel``.

The KV cache (or LSTM state) stays in ONNX Runtime values between steps through
IO binding: each step binds the previous step's ``present`` outputs as the next
``past`` inputs, so on a GPU nothing travels through numpy but the logits.

A decode step is a few hundred microseconds on a CPU for the ``small`` preset, so the
loop avoids everything that is not the graph run: token embeddings come from a table
read once from ``embed_tokens`` (the graph is a lookup), positions are counted up
instead of recomputed from the mask, the attention mask grows inside a preallocated
buffer, one IO binding is reused for every step, and on the CPU the logits land in a
preallocated array.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from vledge.errors import ConfigError, InferenceError

log = logging.getLogger(__name__)

# ONNX tensor type strings -> numpy dtypes the loops feed (float16 graphs keep their own IO types).
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32}
# Token embeddings are read into a table when it is at most this big (else each step runs embed_tokens).
EMBED_TABLE_LIMIT_BYTES = 64 << 20


def _input_types(session: ort.InferenceSession) -> dict[str, type]:
    return {node.name: _NUMPY_TYPES.get(node.type, np.float32) for node in session.get_inputs()}


def _output_types(session: ort.InferenceSession) -> dict[str, type]:
    return {node.name: _NUMPY_TYPES.get(node.type, np.float32) for node in session.get_outputs()}


@dataclass
class Graphs:
    """The three sessions of one precision choice, with the facts the loops need."""

    vision: ort.InferenceSession
    embed: ort.InferenceSession
    decoder: ort.InferenceSession
    cache: str  # the decoder's state: "kv" (past_key_values.*) or "recurrent" (past_hidden / past_cell)
    layers: int
    heads: int
    head_dim: int
    hidden: int
    device: str = "cpu"  # "cpu" or "cuda": where IO binding keeps the cache
    device_id: int = 0
    vocab_size: int = 0  # > 0 enables the token embedding table
    use_embed_table: bool = True
    fast_binding: bool = True  # bind through ONNX Runtime's pybind objects (see _Binder); False: public API only
    image_tokens: int = 0  # > 0: the vision encoder's features must have this many tokens
    _table: np.ndarray | None = field(default=None, init=False, repr=False)
    _table_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.decoder_inputs = _input_types(self.decoder)
        self.decoder_outputs = _output_types(self.decoder)
        self.float_type = self.decoder_inputs.get("inputs_embeds", np.float32)
        self.vision_input_type = _input_types(self.vision).get("pixel_values", np.float32)
        # 5: a tiled model's graph takes [batch, tiles, 3, S, S] (transformers.js's layout); 4: [N, 3, S, S]
        self.vision_input_rank = next((len(node.shape or ()) for node in self.vision.get_inputs()
                                       if node.name == "pixel_values"), 4)
        self.logits_type = self.decoder_outputs.get("logits", np.float32)

    # ------------------------------------------------------------------ graphs other than the decoder

    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        """Token embeddings [rows, seq, hidden] of int64 ids [rows, seq] from the embed_tokens graph."""
        return self.run_embed(ids)

    def lookup_ids(self, ids: np.ndarray) -> np.ndarray:
        """The same as :meth:`embed_ids`, read from the token table (built on first use) when there is one."""
        ids = np.asarray(ids, dtype=np.int64)
        table = self.token_table()
        rows = table.shape[0] if table is not None else self.vocab_size
        # checked here for the graph too: a quantized table (GatherBlockQuantized) returns zeros for a bad id
        if rows > 0 and ids.size and (ids.min() < 0 or ids.max() >= rows):
            raise ConfigError(f"token ids must be in [0, {rows}), got {ids.min()}..{ids.max()}")
        return table[ids] if table is not None else self.run_embed(ids)

    def lookup_step(self, tokens: np.ndarray) -> np.ndarray:
        """Embeddings [rows, 1, hidden] of one token per row, for a decode step (ids come from the logits)."""
        table = self._table if self._table is not None else self.token_table()
        if table is not None:
            return table[tokens.reshape(-1, 1)]
        return self.run_embed(tokens.reshape(-1, 1))

    def run_embed(self, ids: np.ndarray) -> np.ndarray:
        embeds = self.embed.run(None, {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)})[0]
        return embeds.astype(self.float_type, copy=False)

    def token_table(self) -> np.ndarray | None:
        """Every token's embedding, read once from ``embed_tokens`` (a lookup graph), or None when too big."""
        if self._table is not None or not self.use_embed_table or self.vocab_size <= 0:
            return self._table
        if self.vocab_size * self.hidden * np.dtype(self.float_type).itemsize > EMBED_TABLE_LIMIT_BYTES:
            self.use_embed_table = False
            return None
        with self._table_lock:
            if self._table is None:
                table = self.run_embed(np.arange(self.vocab_size, dtype=np.int64)[None])[0]
                table.setflags(write=False)
                self._table = table
        return self._table

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """Image embeddings [N, image_tokens, hidden] in float32 of images (a tiled model's: tiles) [N, 3, S, S]."""
        pixels = np.ascontiguousarray(pixel_values, dtype=self.vision_input_type)
        # A graph taking batches of tiles gets all N tiles as one batch row; it returns [N, tokens, hidden] too.
        feed = pixels[None] if self.vision_input_rank == 5 and pixels.ndim == 4 else pixels
        features = self.vision.run(None, {"pixel_values": feed})[0]
        expected = (pixels.shape[0], self.image_tokens or None, self.hidden)
        if features.ndim != 3 or any(want is not None and have != want
                                     for have, want in zip(features.shape, expected)):
            raise InferenceError(f"the vision encoder returned features of shape {features.shape}; the model "
                                 f"needs {tuple(w if w is not None else 'image_tokens' for w in expected)}")
        if features.dtype not in (np.float32, np.float16):
            raise InferenceError(f"the vision encoder returned {features.dtype} features; float32 or float16 "
                                 "expected")
        features = features.astype(np.float32, copy=False)
        if not np.isfinite(features).all():
            raise InferenceError("the vision encoder produced NaN or infinite features: its weights or graph are "
                                 "broken (a caption from them would be meaningless)")
        return features


def position_ids_from_mask(mask: np.ndarray) -> np.ndarray:
    """Positions count real tokens only (as in training), so padding never shifts them."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)


class _Binder:
    """One IO binding of the decoder for one decode loop.

    ONNX Runtime's Python ``IOBinding`` re-validates and re-wraps on every call (a device object per
    ``bind_output``, a Python ``OrtValue`` per output of ``get_outputs``). Binding through the pybind
    object underneath saves 11-18% of a decode step on onnxruntime 1.31 (measured on the tiny and small
    presets, one thread), so this class does that where it can. Those objects are private: if one is
    missing, or a call through one fails (a later onnxruntime changed them), the binder says so once and
    switches the model (``Graphs.fast_binding``) to the public API for good; ``load(fast_binding=False)``
    never tries them. Values are "handles": pybind ``OrtValue``s on the fast path, ``ort.OrtValue`` on
    the other; both have ``numpy()`` and ``shape()``.
    """

    def __init__(self, graphs: Graphs) -> None:
        self.graphs = graphs
        self.session = graphs.decoder
        self.binding = graphs.decoder.io_binding()
        self.device, self.device_id = graphs.device, graphs.device_id
        self.fast = False
        self._arrays: dict[str, np.ndarray] = {}  # numpy inputs bound by reference stay alive until rebound
        if graphs.fast_binding:
            try:
                self._c = self.binding._iobinding
                self._run = self.session._sess.run_with_iobinding
                self._out_device = ort.OrtDevice.make(self.device, self.device_id)._get_c_device()
                self._cpu_device = ort.OrtDevice.make("cpu", 0)._get_c_device()
                self.fast = True
            except Exception as exc:  # any change of the private objects: the public API still works
                self._fall_back(exc)

    def _fall_back(self, exc: Exception) -> None:
        if self.graphs.fast_binding:
            log.warning("onnxruntime %s: binding through its private IOBinding objects failed (%s: %s); using "
                        "the public IOBinding API", ort.__version__, type(exc).__name__, exc)
        self.graphs.fast_binding = False
        self.fast = False

    @staticmethod
    def _public(handle) -> ort.OrtValue:
        """A handle made on the fast path, as the public API wants it (after a fall-back)."""
        return handle if isinstance(handle, ort.OrtValue) else ort.OrtValue(handle)

    def handle(self, array: np.ndarray, on_device: bool = True) -> tuple[Any, ort.OrtValue]:
        """A handle for ``array`` (on the binding's device, or over the array's own memory on the CPU), and
        the object that owns its memory (keep it as long as the handle is used)."""
        if on_device:
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)
        else:
            value = ort.OrtValue.ortvalue_from_numpy(array)  # zero-copy: later writes to ``array`` are seen
        return (value._ortvalue if self.fast else value), value

    # Each call tries the fast path once per binder; a failure switches this binder (and the model) over.

    def input_array(self, name: str, array: np.ndarray) -> None:
        self._arrays[name] = array
        if self.fast:
            try:
                return self._c.bind_input(name, array)
            except Exception as exc:
                self._fall_back(exc)
        self.binding.bind_cpu_input(name, array)

    def input_value(self, name: str, handle) -> None:
        if self.fast:
            try:
                return self._c.bind_ortvalue_input(name, handle)
            except Exception as exc:
                self._fall_back(exc)
        self.binding.bind_ortvalue_input(name, self._public(handle))

    def output_value(self, name: str, handle) -> None:
        """Write output ``name`` into a preallocated value (its shape must match exactly)."""
        if self.fast:
            try:
                return self._c.bind_ortvalue_output(name, handle)
            except Exception as exc:
                self._fall_back(exc)
        self.binding.bind_ortvalue_output(name, self._public(handle))

    def output(self, name: str, on_device: bool = True) -> None:
        if self.fast:
            try:
                return self._c.bind_output(name, self._out_device if on_device else self._cpu_device)
            except Exception as exc:
                self._fall_back(exc)
        if on_device:
            self.binding.bind_output(name, self.device, self.device_id)
        else:
            self.binding.bind_output(name, "cpu")

    def run(self) -> list:
        if self.fast:
            try:
                self._run(self._c, None)
                outputs = self._c.get_outputs()
                return [outputs[i] for i in range(len(outputs))]
            except Exception as exc:
                self.session.run_with_iobinding(self.binding)  # a real error in the inputs fails here too, and says so
                self._fall_back(exc)
                return self.binding.get_outputs()
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()


class OrtTransformerSteps:
    """Prefill a left-padded batch (optionally after a cached prefix), then one token per row per step.

    The keys and values stay ONNX Runtime values between steps (IO binding: each step's ``present``
    outputs are bound as the next step's ``past`` inputs). A decode step writes the token embeddings,
    positions and logits in place in buffers bound once per batch shape; ``capacity`` is how many
    steps the attention-mask buffer is sized for (it grows if exceeded). One object serves one
    generation call: it is not shared between threads.
    """

    def __init__(self, graphs: Graphs, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
                 past: Sequence[np.ndarray] | None = None, capacity: int = 32) -> None:
        self.graphs = graphs
        batch = inputs_embeds.shape[0]
        layers = range(graphs.layers)
        self.past_names = [f"past_key_values.{i}.{kind}" for i in layers for kind in ("key", "value")]
        self.present_names = [f"present.{i}.{kind}" for i in layers for kind in ("key", "value")]
        self._binder = _Binder(graphs)
        if past is None:
            past = [np.zeros((batch, graphs.heads, 0, graphs.head_dim), dtype=graphs.float_type)] * len(
                self.past_names)
        pairs = [self._binder.handle(np.asarray(p, dtype=graphs.float_type)) for p in past]
        self._past = [handle for handle, _ in pairs]
        self._owners = [owner for _, owner in pairs]  # numpy-backed values: keep their memory alive
        past_len = self._past[0].shape()[2]
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        if mask.shape[1] != past_len + inputs_embeds.shape[1]:
            raise ConfigError(f"attention_mask covers {mask.shape[1]} positions, "
                              f"past {past_len} + new {inputs_embeds.shape[1]}")
        positions = position_ids_from_mask(mask)
        # Decode steps: the mask lives in a buffer whose future columns are already 1.
        self._length = mask.shape[1]
        self._mask_buffer = self._new_mask_buffer(mask, capacity)
        self._step_buffers(np.ascontiguousarray(positions[:, -1:] + 1))
        self.first_logits = self._prefill(np.ascontiguousarray(inputs_embeds, dtype=graphs.float_type), mask,
                                          np.ascontiguousarray(positions[:, past_len:]))

    @staticmethod
    def _new_mask_buffer(mask: np.ndarray, capacity: int) -> np.ndarray:
        buffer = np.ones((mask.shape[0], mask.shape[1] + max(capacity, 1)), dtype=np.int64)
        buffer[:, : mask.shape[1]] = mask
        return buffer

    def _step_buffers(self, next_position: np.ndarray) -> None:
        """Per-step inputs and the logits output, bound by reference and rewritten in place each step."""
        graphs, binder = self.graphs, self._binder
        rows = next_position.shape[0]
        self._next_position = next_position  # [rows, 1], counted up after each step
        self._embeds = np.empty((rows, 1, graphs.hidden), dtype=graphs.float_type)
        self._embeds_handle, embeds_owner = binder.handle(self._embeds, on_device=False)
        self._position_handle, position_owner = binder.handle(self._next_position, on_device=False)
        self._step_owners = [embeds_owner, position_owner]
        self._step_bound = False  # the fixed per-step buffers are bound once, before the first step
        self._logits = None
        if graphs.vocab_size > 0:
            self._logits = np.empty((rows, 1, graphs.vocab_size), dtype=graphs.logits_type)
            self._logits_handle, logits_owner = binder.handle(self._logits, on_device=False)
            self._step_owners.append(logits_owner)

    @property
    def mask(self) -> np.ndarray:
        """The attention mask over every position so far [batch, past]."""
        return self._mask_buffer[:, : self._length]

    @property
    def past_values(self) -> list[ort.OrtValue]:
        """The cache after the last call, one ``OrtValue`` per past input."""
        return [value if isinstance(value, ort.OrtValue) else ort.OrtValue(value) for value in self._past]

    @property
    def past_length(self) -> int:
        return self._past[0].shape()[2]

    def _bind_past(self) -> None:
        binder = self._binder
        for name, handle in zip(self.past_names, self._past):
            binder.input_value(name, handle)
        for name in self.present_names:
            binder.output(name)

    def _prefill(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        binder = self._binder
        binder.input_array("inputs_embeds", embeds)
        binder.input_array("attention_mask", mask)
        binder.input_array("position_ids", positions)
        binder.output("logits", on_device=False)
        self._bind_past()
        outputs = binder.run()
        self._past = outputs[1:]
        self._owners = []  # ONNX Runtime owns the new values
        return outputs[0].numpy()[:, -1].astype(np.float32)  # a copy, independent of the output's memory

    # ------------------------------------------------------------------ StepModel

    def step(self, tokens: np.ndarray) -> np.ndarray:
        graphs, binder = self.graphs, self._binder
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.shape[0] != self._embeds.shape[0]:
            raise ConfigError(f"step() got {tokens.shape[0]} tokens for {self._embeds.shape[0]} rows")
        table = graphs.token_table()
        if table is not None:
            np.take(table, tokens, axis=0, out=self._embeds[:, 0])
        else:
            self._embeds[...] = graphs.run_embed(tokens[:, None])
        if self._length >= self._mask_buffer.shape[1]:  # past the planned capacity: double the buffer
            self._mask_buffer = self._new_mask_buffer(self.mask, self._mask_buffer.shape[1])
        self._length += 1
        if not self._step_bound:  # a binding keeps what is bound: the in-place buffers need it once
            binder.input_value("inputs_embeds", self._embeds_handle)
            binder.input_value("position_ids", self._position_handle)
            if self._logits is not None:
                binder.output_value("logits", self._logits_handle)
            self._step_bound = True
        if self._logits is None:
            binder.output("logits", on_device=False)
        binder.input_array("attention_mask", np.ascontiguousarray(self._mask_buffer[:, : self._length]))
        self._bind_past()
        outputs = binder.run()
        self._past = outputs[1:]
        self._owners = []
        self._next_position += 1  # in place: the bound positions buffer is ready for the next step
        logits = self._logits if self._logits is not None else outputs[0].numpy()
        return logits[:, -1].astype(np.float32)  # a copy: the buffer is rewritten by the next step

    def reorder(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        self._mask_buffer = self._mask_buffer[rows]
        self._step_buffers(np.ascontiguousarray(self._next_position[rows]))
        # Fancy indexing copies, so the new values do not depend on the old ones' memory.
        pairs = [self._binder.handle(value.numpy()[rows]) for value in self._past]
        self._past = [handle for handle, _ in pairs]
        self._owners = [owner for _, owner in pairs]


class OrtLSTMSteps:
    """Rows are prefilled one by one (an LSTM has no mask to hide padding), then decoded as a batch.

    The state stays in ONNX Runtime values between decode steps (IO binding), like the KV cache.
    """

    def __init__(self, graphs: Graphs, rows_embeds: list[np.ndarray],
                 state: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.graphs = graphs
        self._binder = _Binder(graphs)
        hidden_rows, cell_rows, last = [], [], []
        for embeds in rows_embeds:
            h0, c0 = state if state is not None else self._zero_state(1)
            logits, h, c = graphs.decoder.run(None, {
                "inputs_embeds": np.ascontiguousarray(embeds[None], dtype=graphs.float_type),
                "past_hidden": np.ascontiguousarray(h0, dtype=graphs.float_type),
                "past_cell": np.ascontiguousarray(c0, dtype=graphs.float_type),
            })
            hidden_rows.append(h)
            cell_rows.append(c)
            last.append(logits[:, -1])
        self._set_state(np.concatenate(hidden_rows, axis=1), np.concatenate(cell_rows, axis=1))
        self.first_logits = np.concatenate(last).astype(np.float32)

    def _set_state(self, hidden: np.ndarray, cell: np.ndarray) -> None:
        (self._hidden, hidden_owner), (self._cell, cell_owner) = self._binder.handle(hidden), self._binder.handle(cell)
        self._owners = [hidden_owner, cell_owner]

    def _zero_state(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.graphs.layers, batch, self.graphs.hidden)
        return np.zeros(shape, self.graphs.float_type), np.zeros(shape, self.graphs.float_type)

    # ``numpy()`` of a value is a view that does not keep a numpy-backed value's memory alive: copy.

    @property
    def hidden(self) -> np.ndarray:
        return self._hidden.numpy().copy()

    @property
    def cell(self) -> np.ndarray:
        return self._cell.numpy().copy()

    def step(self, tokens: np.ndarray) -> np.ndarray:
        graphs, binder = self.graphs, self._binder
        tokens = np.asarray(tokens, dtype=np.int64)
        binder.input_array("inputs_embeds", np.ascontiguousarray(graphs.lookup_step(tokens), dtype=graphs.float_type))
        binder.input_value("past_hidden", self._hidden)
        binder.input_value("past_cell", self._cell)
        binder.output("logits", on_device=False)
        binder.output("present_hidden")
        binder.output("present_cell")
        logits, self._hidden, self._cell = binder.run()
        self._owners = []
        return logits.numpy()[:, -1].astype(np.float32)

    def reorder(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        self._set_state(self._hidden.numpy()[:, rows], self._cell.numpy()[:, rows])
