"""The object an app owns: a loaded model directory that captions images and answers questions.

Torch-free. One ``VisionLanguageRuntime`` holds three ONNX Runtime sessions and
no per-call state, so several threads may call it at once (ONNX Runtime sessions
are thread-safe; every call builds its own IO binding and cache). The only shared
mutable state, the prefix KV cache and the token embedding table, is built once
under a lock and only read afterwards.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from vledge import generation
from vledge.decoding import GenerationOptions, left_pad
from vledge.errors import ConfigError, ImageError
from vledge.image_tiles import tiled_question, tiles_per_row
from vledge.generation import GenerationResult, Timings, clamp_to_positions, cut_at_stop, partial_stop, stop_list
from vledge.manifest import Manifest, resolve_inside
from vledge.prompt import CAPTION_PROMPT, question_ids
from vledge.runtime.decoder import Graphs, OrtLSTMSteps, OrtTransformerSteps
from vledge.runtime.preprocess import ImagePreprocessor
from vledge.runtime.providers import SessionConfig, primary_provider, profile_placement
from vledge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_IMAGES_PER_PROMPT = 16  # images one prompt of a tiled model may come with (each is up to ~17 tiles)

__all__ = ["GenerationResult", "Timings", "VisionLanguageRuntime"]  # the results are re-exported here


class _StreamClosed(Exception):
    """Raised inside the decode loop when the consumer of ``stream()`` stopped reading."""


class VisionLanguageRuntime:
    """A model directory loaded for inference. Create it with :func:`load`.

    It is the ONNX Runtime implementation of ``vledge.generation.Engine`` (``encode_images`` and
    ``prefill``); every generating method goes through ``vledge.generation.generate``.
    """

    def __init__(self, model_dir: Path, manifest: Manifest, tokenizer: Tokenizer, graphs: Graphs,
                 precisions: dict[str, str], session_config: SessionConfig, gpu_fallback: str = "",
                 prefix_cache: bool = True) -> None:
        self.model_dir = model_dir
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.graphs = graphs
        self.precisions = precisions
        self.session_config = session_config
        self.gpu_fallback = gpu_fallback
        self.preprocessor = ImagePreprocessor(manifest.preprocess)
        self.prefix_ids = list(manifest.prefix_ids)
        self.prefix_cache = prefix_cache  # reuse the constant prompt prefix's keys and values
        # Rows whose cache one decoder call may extend by several positions (GroupQueryAttention decoders: 1).
        self.cache_extend_rows = int(manifest.generation.get("cache_extend_rows") or 1 << 30)
        self.caption_prompt = manifest.generation.get("caption_prompt", CAPTION_PROMPT)
        # The template's end token and a pretrained LM's own stop ids (directories without the field: eos only).
        self.stop_token_ids = tuple(manifest.generation.get("stop_token_ids") or (tokenizer.eos_id,))
        self.default_options = GenerationOptions(
            max_new_tokens=int(manifest.generation.get("max_new_tokens", 32)))
        self._prefix_lock = threading.Lock()
        self._prefix_cache: Any = None

    def __repr__(self) -> str:
        return (f"VisionLanguageRuntime({str(self.model_dir)!r}, precisions={self.precisions}, "
                f"device={self.graphs.device!r})")

    # ------------------------------------------------------------------ public API

    def caption(self, image, options: GenerationOptions | None = None, stop_strings: Sequence[str] = (),
                on_token: Callable[[int, int], None] | None = None, channel_order: str = "BGR") -> GenerationResult:
        """Caption one image (path, encoded bytes, or an HxWxC uint8 array in ``channel_order``)."""
        return self.generate([image], [self.caption_prompt], options, stop_strings, on_token, channel_order)[0]

    def ask(self, image, question: str, options: GenerationOptions | None = None, stop_strings: Sequence[str] = (),
            on_token: Callable[[int, int], None] | None = None, channel_order: str = "BGR") -> GenerationResult:
        """Answer ``question`` about one image."""
        if not isinstance(question, str) or not question.strip():
            raise ConfigError("ask() needs a non-empty question string")
        return self.generate([image], [question], options, stop_strings, on_token, channel_order)[0]

    def generate(
        self,
        images: Sequence | np.ndarray,
        prompts: Sequence[str] | str | None = None,
        options: GenerationOptions | None = None,
        stop_strings: Sequence[str] | str = (),
        on_token: Callable[[int, int], None] | None = None,
        channel_order: str = "BGR",
    ) -> list[GenerationResult]:
        """Answer ``prompts[i]`` about ``images[i]`` as one left-padded batch.

        ``prompts`` may be one string for every image, or None for the caption prompt. ``on_token(row,
        token_id)`` is called as each token is chosen (not with beam search, whose hypotheses are only
        final at the end). ``stop_strings`` end a row as soon as its text contains one, and cut it there.
        """
        images = self._image_list(images)
        prompts = self._prompt_list(prompts, len(images))
        started = time.perf_counter()
        if self.preprocessor.tiled:
            rows = [self._tiled_row(row, index, channel_order) for index, row in enumerate(images)]
            timings = Timings(preprocess_ms=(time.perf_counter() - started) * 1e3)
            return self.generate_from_tiles(rows, prompts, options, stop_strings, on_token, timings)
        several = [index for index, image in enumerate(images) if isinstance(image, (list, tuple))]
        if several:
            raise ConfigError(f"prompt {several[0]} comes with several images; this model takes one image per "
                              "prompt (tiled models such as SmolVLM take several)")
        pixels = self.preprocessor.batch(images, channel_order=channel_order)
        timings = Timings(preprocess_ms=(time.perf_counter() - started) * 1e3)
        return self.generate_from_pixels(pixels, prompts, options, stop_strings, on_token, timings)

    def _tiled_row(self, row, index: int, channel_order: str) -> list:
        """One prompt's images (one image, or a list of them) as tiles, each failure naming the prompt."""
        items = list(row) if isinstance(row, (list, tuple)) else [row]
        if not items:
            raise ConfigError(f"prompt {index} comes with an empty list of images")
        if len(items) > MAX_IMAGES_PER_PROMPT:
            raise ConfigError(f"prompt {index} comes with {len(items)} images; at most {MAX_IMAGES_PER_PROMPT} "
                              "are taken")
        try:
            return [self.preprocessor.tiles(item, channel_order) for item in items]
        except ImageError as exc:
            raise ImageError(f"prompt {index}: {exc}") from exc

    def stream(self, image, prompt: str | None = None, options: GenerationOptions | None = None,
               stop_strings: Sequence[str] | str = (), channel_order: str = "BGR") -> Iterator[str]:
        """Text pieces for one image as tokens are chosen; joined, they equal ``generate(...)[0].text``.

        Whitespace at the end and anything that may be the start of a stop string are held back until
        the text goes on. With beam search the whole text arrives at the end. Closing the generator early
        stops the decoding.
        """
        stops = stop_list(stop_strings)
        pieces: queue.Queue = queue.Queue()
        finished = object()
        closed = threading.Event()
        outcome: list = []

        def on_token(row: int, token: int) -> None:
            if closed.is_set():
                raise _StreamClosed
            pieces.put(token)

        def worker() -> None:
            try:
                outcome.append(self.generate([image], [prompt or self.caption_prompt], options, stops, on_token,
                                             channel_order)[0])
            except _StreamClosed:
                pass
            except BaseException as exc:  # re-raised in the consumer's thread
                outcome.append(exc)
            finally:
                pieces.put(finished)

        thread = threading.Thread(target=worker, name="vledge-stream", daemon=True)
        thread.start()
        tokens: list[int] = []
        emitted = ""
        try:
            while (item := pieces.get()) is not finished:
                tokens.append(item)
                text = self.tokenizer.decode(tokens)
                if text.endswith("\ufffd"):  # wait for whole UTF-8 characters
                    continue
                text, _ = cut_at_stop(text, stops)
                text = text.lstrip()
                visible = text.rstrip()
                visible = visible[: len(visible) - partial_stop(visible, stops)].rstrip()  # held: may end the text
                if len(visible) > len(emitted) and visible.startswith(emitted):
                    yield visible[len(emitted):]
                    emitted = visible
            thread.join()
            result = outcome[0] if outcome else None
            if isinstance(result, BaseException):
                raise result
            if result is not None and len(result.text) > len(emitted):
                if result.text.startswith(emitted):
                    yield result.text[len(emitted):]
                else:  # cannot happen with a byte-level tokenizer; say so rather than yield garbage
                    log.warning("streamed text %r is not a prefix of the final text %r", emitted, result.text)
        finally:
            closed.set()

    def warmup(self) -> None:
        """Caption a blank image once, so the first real call does not pay ONNX Runtime's first-run costs."""
        size = self.manifest.preprocess.image_size
        if self.preprocessor.tiled:
            self.generate([np.zeros((size, size, 3), np.uint8)], [self.caption_prompt],
                          GenerationOptions(max_new_tokens=2))
            return
        self.generate_from_pixels(np.zeros((1, 3, size, size), np.float32), [self.caption_prompt],
                                  GenerationOptions(max_new_tokens=2))

    def embed_images(self, images: Sequence, channel_order: str = "BGR") -> np.ndarray:
        """Image embeddings [N, image_tokens, hidden]: what the language model sees (also a scene descriptor).

        A tiled model gives one array per image instead, [tiles, image_tokens, hidden] (its tiles, then the
        global view)."""
        if self.preprocessor.tiled:
            return [self.graphs.encode_images(self.preprocessor.tiles(image, channel_order).pixel_values)
                    for image in self._image_list(images)]
        return self.graphs.encode_images(self.preprocessor.batch(self._image_list(images), channel_order=channel_order))

    def info(self) -> dict[str, Any]:
        """What is loaded and where it runs (providers really active, precision per graph)."""
        sessions = {"vision_encoder": self.graphs.vision, "embed_tokens": self.graphs.embed,
                    "decoder_model_merged": self.graphs.decoder}
        config = self.session_config
        return {
            "model_dir": str(self.model_dir),
            "architecture": self.manifest.architecture(),
            "precisions": dict(self.precisions),
            "files": {c: self.manifest.variants[c][p] for c, p in self.precisions.items()},
            "provider": primary_provider(self.graphs.decoder),
            "providers": {component: session.get_providers() for component, session in sessions.items()},
            "requested_providers": config.providers,
            "gpu_fallback": self.gpu_fallback or None,
            "device": self.graphs.device,
            "device_id": config.device_id,
            "threads": config.threads,
            "optimization": config.optimization,
            "spin": config.spin,
            "strict": config.strict,
            "prefix_cache_tokens": len(self.prefix_ids) if self.prefix_cache else 0,
            "fast_binding": self.graphs.fast_binding,
            "onnxruntime": ort.__version__,
        }

    def placement(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per graph, how many nodes of each type each provider ran (one profiled run each)."""
        feeds = self._probe_feeds()
        result = {}
        for component, feed in feeds.items():
            path = resolve_inside(self.model_dir, self.manifest.variants[component][self.precisions[component]])
            result[component] = profile_placement(path, self.session_config, feed).to_dict()
        return result

    # ------------------------------------------------------------------ generation pieces

    def generate_from_pixels(
        self,
        pixel_values: np.ndarray,
        prompts: Sequence[str],
        options: GenerationOptions | None = None,
        stop_strings: Sequence[str] | str = (),
        on_token: Callable[[int, int], None] | None = None,
        timings: Timings | None = None,
    ) -> list[GenerationResult]:
        """Like :meth:`generate` from preprocessed ``pixel_values`` [N, 3, S, S] float32."""
        if self.preprocessor.tiled:
            raise ConfigError("this model splits each image into tiles: use generate() or generate_from_tiles()")
        pixel_values = np.asarray(pixel_values)
        size = self.manifest.preprocess.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, size, size):
            raise ConfigError(f"pixel_values must have shape [N, 3, {size}, {size}], got {list(pixel_values.shape)}")
        prompts = self._prompt_list(prompts, pixel_values.shape[0])
        ids = [question_ids(self.tokenizer, self.manifest.prompt, prompt) for prompt in prompts]
        return generation.generate_from_pixels(self, pixel_values, ids, self._options(options), stop_strings,
                                               on_token, timings=timings)

    def generate_from_tiles(
        self,
        rows: Sequence[Sequence],
        prompts: Sequence[str],
        options: GenerationOptions | None = None,
        stop_strings: Sequence[str] | str = (),
        on_token: Callable[[int, int], None] | None = None,
        timings: Timings | None = None,
    ) -> list[GenerationResult]:
        """A tiled model's generation from preprocessed images: ``rows[i]`` is prompt i's list of
        ``ImagePreprocessor.tiles()`` results (``Idefics3Images``), in the order the images appear."""
        prompts = self._prompt_list(prompts, len(rows))
        ids, pixels, counts = self.tiled_inputs(rows, prompts)
        return generation.generate_from_pixels(self, pixels, ids, self._options(options), stop_strings, on_token,
                                               timings=timings, tiles_per_row=counts)

    def tiled_inputs(self, rows: Sequence[Sequence], prompts: Sequence[str]):
        """(expanded prompt ids, every row's tiles [N, 3, S, S], tiles per row) for a tiled model."""
        tiles_spec = self.manifest.preprocess.tiles
        ids = [tiled_question(self.tokenizer, self.manifest.prompt, tiles_spec, prompt, images)
               for images, prompt in zip(rows, prompts)]
        pixels = np.concatenate([image.pixel_values for images in rows for image in images])
        counts = tiles_per_row([[(image.rows, image.cols) for image in images] for images in rows])
        return ids, pixels, counts

    def generate_from_embeds(
        self,
        image_embeds: np.ndarray,
        prompt_ids: Sequence[Sequence[int]],
        options: GenerationOptions | None = None,
        stop_strings: Sequence[str] | str = (),
        on_token: Callable[[int, int], None] | None = None,
        timings: Timings | None = None,
    ) -> list[GenerationResult]:
        """Decode from image embeddings and token prompts (each holding one image token)."""
        return generation.generate(self, image_embeds, prompt_ids, self._options(options), stop_strings, on_token,
                                   timings)

    # ------------------------------------------------------------------ the engine (vledge.generation.Engine)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """Image embeddings [N, image_tokens, hidden] float32 of preprocessed pixels [N, 3, S, S]."""
        return self.graphs.encode_images(pixel_values)

    def prefill_logits(self, image_embeds: np.ndarray, prompt_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Next-token logits [rows, vocab] after the prompt, for parity checks against PyTorch."""
        steps, _ = self.prefill(image_embeds, prompt_ids, self.default_options)
        return steps.first_logits

    def prefill(self, image_embeds: np.ndarray, prompt_ids: Sequence[Sequence[int]], options: GenerationOptions):
        """Run the prompts (image embeddings spliced in) through the decoder; returns (steps, options).

        ``options.max_new_tokens`` is lowered to what the model's positions leave room for
        (``vledge.generation.clamp_to_positions``).
        """
        image_id = self.tokenizer.image_id
        prompt_ids = [list(ids) for ids in prompt_ids]
        if len(prompt_ids) != len(image_embeds):
            raise ConfigError(f"{len(prompt_ids)} prompts for {len(image_embeds)} rows of image embeddings")
        fill = self.preprocessor.tiled
        visual = [np.asarray(row, dtype=np.float32).reshape(-1, self.graphs.hidden) if fill
                  else np.asarray(row, dtype=np.float32) for row in image_embeds]
        for row, ids in enumerate(prompt_ids):
            wanted = len(visual[row]) if fill else 1
            if ids.count(image_id) != wanted:
                what = f"{wanted} image tokens (one per visual token)" if fill else "exactly one image token"
                raise ConfigError(f"prompt {row} must hold {what}, has {ids.count(image_id)}")
        prefix = self.prefix_ids
        use_prefix = self.prefix_cache and bool(prefix) and all(ids[: len(prefix)] == prefix for ids in prompt_ids)
        if len(prompt_ids) > self.cache_extend_rows:  # the decoder cannot extend a cache for that many rows at once
            use_prefix = False
        rests = [ids[len(prefix):] if use_prefix else ids for ids in prompt_ids]
        rows_embeds = []
        text_embeds = self.graphs.embed_ids(left_pad(rests, self.tokenizer.pad_id)[0])
        width = text_embeds.shape[1]
        for row, rest in enumerate(rests):
            row_text = text_embeds[row, width - len(rest):]
            image = visual[row].astype(row_text.dtype)
            if fill:  # one image token per visual token, filled in order
                row_text = row_text.copy()
                row_text[np.asarray(rest) == image_id] = image
                rows_embeds.append(row_text)
                continue
            at = rest.index(image_id)
            rows_embeds.append(np.concatenate([row_text[:at], image, row_text[at + 1:]]))
        if self.graphs.cache == "recurrent":
            state = self._prefix_state() if use_prefix else None
            return OrtLSTMSteps(self.graphs, rows_embeds, state), options
        lengths = [len(r) for r in rows_embeds]
        longest = max(lengths)
        batch = len(rows_embeds)
        embeds = np.zeros((batch, longest, self.graphs.hidden), dtype=self.graphs.float_type)
        mask = np.zeros((batch, longest), dtype=np.int64)
        for row, row_embeds in enumerate(rows_embeds):
            embeds[row, longest - lengths[row]:] = row_embeds
            mask[row, longest - lengths[row]:] = 1
        past = None
        if use_prefix:
            prefix_past = self._prefix_kv()
            past = prefix_past if batch == 1 else [np.repeat(value, batch, axis=0) for value in prefix_past]
            mask = np.concatenate([np.ones((batch, len(prefix)), dtype=np.int64), mask], axis=1)
        options = clamp_to_positions(options, mask.shape[1], int(self.manifest.model_config.language.max_positions))
        return OrtTransformerSteps(self.graphs, embeds, mask, past, capacity=options.max_new_tokens), options

    def _prefix_kv(self) -> list[np.ndarray]:
        """Keys and values of the constant prompt prefix, computed once per loaded model."""
        with self._prefix_lock:
            if self._prefix_cache is None:
                embeds = self.graphs.embed_ids(np.asarray([self.prefix_ids], dtype=np.int64))
                steps = OrtTransformerSteps(self.graphs, embeds, np.ones((1, len(self.prefix_ids)), dtype=np.int64))
                cache = [value.numpy().copy() for value in steps.past_values]  # own memory, not a view
                for value in cache:
                    value.setflags(write=False)
                self._prefix_cache = cache
            return self._prefix_cache

    def _prefix_state(self) -> tuple[np.ndarray, np.ndarray]:
        with self._prefix_lock:
            if self._prefix_cache is None:
                embeds = self.graphs.embed_ids(np.asarray([self.prefix_ids], dtype=np.int64))
                steps = OrtLSTMSteps(self.graphs, [embeds[0]])
                self._prefix_cache = (steps.hidden, steps.cell)
            return self._prefix_cache

    # ------------------------------------------------------------------ argument checks

    @staticmethod
    def _image_list(images) -> list:
        if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)):
            return [images]
        if isinstance(images, np.ndarray):
            return list(images) if images.ndim == 4 else [images]  # a stack of frames, or one image
        try:
            items = list(images)
        except TypeError:
            raise ConfigError(f"images must be a path, bytes, an array or a sequence of those, "
                              f"got {type(images).__name__}") from None
        if not items:
            raise ConfigError("generate() needs at least one image")
        return items

    def _prompt_list(self, prompts, count: int) -> list[str]:
        if prompts is None or isinstance(prompts, str):
            return [prompts or self.caption_prompt] * count
        prompts = list(prompts)
        if len(prompts) != count:
            raise ConfigError(f"{len(prompts)} prompts for {count} images")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ConfigError(f"prompt {index} must be a string, got {type(prompt).__name__}")
        return [prompt or self.caption_prompt for prompt in prompts]

    def _options(self, options) -> GenerationOptions:
        if options is None:
            return self.default_options
        if not isinstance(options, GenerationOptions):
            raise ConfigError(f"options must be a vledge GenerationOptions, got {type(options).__name__}")
        return options

    def _probe_feeds(self) -> dict[str, dict[str, np.ndarray]]:
        size = self.manifest.preprocess.image_size
        graphs = self.graphs
        floats = graphs.float_type
        feeds: dict[str, dict[str, np.ndarray]] = {
            "vision_encoder": {"pixel_values": np.zeros((1,) * (graphs.vision_input_rank - 3) + (3, size, size),
                                                        graphs.vision_input_type)},
            "embed_tokens": {"input_ids": np.ones((1, 4), np.int64)},
        }
        embeds = np.zeros((1, 4, graphs.hidden), floats)
        if graphs.cache == "kv":
            decoder = {"inputs_embeds": embeds, "attention_mask": np.ones((1, 4), np.int64),
                       "position_ids": np.arange(4, dtype=np.int64)[None]}
            for i in range(graphs.layers):
                for kind in ("key", "value"):
                    decoder[f"past_key_values.{i}.{kind}"] = np.zeros((1, graphs.heads, 0, graphs.head_dim), floats)
        else:
            state = np.zeros((graphs.layers, 1, graphs.hidden), floats)
            decoder = {"inputs_embeds": embeds, "past_hidden": state, "past_cell": state}
        feeds["decoder_model_merged"] = decoder
        return feeds
