"""OpenVINO on the same ONNX files: the peer a CPU user would reach for instead of ONNX Runtime.

``OpenVinoEngine`` implements ``vledge.generation.Engine`` over the graphs of a model directory
(the precision chosen per graph as ``vledge.runtime.load`` chooses it), compiled by OpenVINO's CPU
plugin with ``INFERENCE_NUM_THREADS`` = the thread count, the latency hint, f32 inference
precision and no CPU pinning. The decode loop
feeds numpy arrays (OpenVINO has no IO binding to keep the cache in place); the token embeddings
come from a table read once, like the runtime's. Needs the ``openvino`` package (``[bench]`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vledge.decoding import GenerationOptions, left_pad
from vledge.errors import ConfigError
from vledge.generation import clamp_to_positions


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoSteps:
    """KV-cached decode steps through one OpenVINO infer request; the cache goes in and out as numpy."""

    def __init__(self, request, layers: int, heads: int, head_dim: int, table: np.ndarray,
                 inputs_embeds: np.ndarray, attention_mask: np.ndarray) -> None:
        self.request, self.table = request, table
        batch = inputs_embeds.shape[0]
        self.past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
        empty = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)
        self.past = [empty] * len(self.past_names)
        self.mask = attention_mask
        positions = np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0).astype(np.int64)
        self.next_position = positions[:, -1:] + 1
        self.first_logits = self._run(inputs_embeds, positions)[:, -1].astype(np.float32)

    def _run(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        feeds = {"inputs_embeds": embeds, "attention_mask": self.mask, "position_ids": positions}
        feeds.update(zip(self.past_names, self.past))
        outputs = self.request.infer(feeds)
        values = list(outputs.values())  # logits, then present.* in the graph's output order
        self.past = [np.array(v) for v in values[1:]]  # the request reuses its output memory: copy
        return np.array(values[0])

    def step(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        self.mask = np.concatenate([self.mask, np.ones((self.mask.shape[0], 1), dtype=np.int64)], axis=1)
        logits = self._run(self.table[tokens][:, None], self.next_position)
        self.next_position = self.next_position + 1
        return logits[:, -1].astype(np.float32)

    def reorder(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        self.mask, self.next_position = self.mask[rows], self.next_position[rows]
        self.past = [value[rows] for value in self.past]


class OpenVinoEngine:
    """A model directory's transformer graphs compiled by OpenVINO for the CPU."""

    def __init__(self, model_dir: Path, precision: str, threads: int) -> None:
        import openvino as ov

        from vledge.manifest import TOKENIZER_NAME, read_manifest, resolve_inside
        from vledge.runtime.loader import _choose_precision
        from vledge.tokenizer import Tokenizer

        manifest = read_manifest(model_dir, verify=False)
        language = manifest.model_config.language
        if not language.family.bench_peers:
            raise ConfigError(f"the OpenVINO engine does not serve {language.kind} language models")
        self.manifest, self.language = manifest, language
        self.tokenizer = Tokenizer.from_file(resolve_inside(model_dir, TOKENIZER_NAME))
        core = ov.Core()
        # f32: the CPU plugin would otherwise compute in bf16 where the CPU has it, which is not these files.
        # No pinning: ONNX Runtime does not pin either, and a thread pinned to a core another process keeps
        # busy ran the vision graph 3.7x slower here (1.02 vs 3.77 ms, load average 15 on 2 cores).
        config = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False}
        self.precisions, self.requests, self.files = {}, {}, {}
        for component in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
            chosen = _choose_precision(manifest, component, precision, "cpu")
            path = resolve_inside(model_dir, manifest.variants[component][chosen])
            self.precisions[component], self.files[component] = chosen, path
            self.requests[component] = core.compile_model(str(path), "CPU", config).create_infer_request()
        vocab = np.arange(int(language.vocab_size), dtype=np.int64)[None]
        self.table = np.array(next(iter(self.requests["embed_tokens"].infer({"input_ids": vocab}).values())))[0]
        self.table = self.table.astype(np.float32)

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files.values())

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        outputs = self.requests["vision_encoder"].infer({"pixel_values": pixels})
        return np.array(next(iter(outputs.values())), dtype=np.float32)

    def prefill(self, image_embeds: np.ndarray, prompt_ids: Sequence[Sequence[int]], options: GenerationOptions):
        image_id = self.tokenizer.image_id
        prompt_ids = [list(ids) for ids in prompt_ids]
        if len(prompt_ids) != image_embeds.shape[0]:
            raise ConfigError(f"{len(prompt_ids)} prompts for {image_embeds.shape[0]} images")
        ids, _ = left_pad(prompt_ids, self.tokenizer.pad_id)
        text = self.table[ids]
        rows = []
        width = ids.shape[1]
        for row, prompt in enumerate(prompt_ids):
            if prompt.count(image_id) != 1:
                raise ConfigError(f"prompt {row} must hold exactly one image token, has {prompt.count(image_id)}")
            row_text = text[row, width - len(prompt):]
            at = prompt.index(image_id)
            rows.append(np.concatenate([row_text[:at], image_embeds[row].astype(np.float32), row_text[at + 1:]]))
        longest = max(len(r) for r in rows)
        embeds = np.zeros((len(rows), longest, self.language.hidden), dtype=np.float32)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for row, row_embeds in enumerate(rows):
            embeds[row, longest - len(row_embeds):] = row_embeds
            mask[row, longest - len(row_embeds):] = 1
        options = clamp_to_positions(options, longest, int(self.language.max_positions))
        steps = OpenVinoSteps(self.requests["decoder_model_merged"], self.language.layers, self.language.heads,
                              self.language.head_dim, self.table, embeds, mask)
        return steps, options
