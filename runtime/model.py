"""The object an app owns: a loaded model directory that captions images and answers questions.

Torch-free. One ``VisionLanguageRuntime`` holds three ONNX Runtime sessions and
no per-call state, so several threads may call it at once (ONNX Runtime sessions
are thread-safe; every call builds its own IO binding and cache).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vledge.decoding import GenerationOptions, decode_tokens, left_pad
from vledge.errors import ConfigError, ModelDirError, ProviderError
from vledge.manifest import COMPONENTS, PRECISIONS, TOKENIZER_NAME, Manifest, read_manifest, resolve_inside
from vledge.prompt import question_ids
from vledge.runtime.decoder import Graphs, LSTMSteps, TransformerSteps
from vledge.runtime.preprocess import ImagePreprocessor
from vledge.runtime.providers import (
    HEAVY_OPS,
    SessionConfig,
    create_session,
    primary_provider,
    profile_placement,
    resolve_providers,
)
from vledge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_CAPTION_PROMPT = "Describe the image briefly."


@dataclass
class Timings:
    """Milliseconds per stage of one call (shared by the rows of a batch)."""

    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    new_tokens: int = 0

    @property
    def total_ms(self) -> float:
        return self.preprocess_ms + self.vision_ms + self.prefill_ms + self.decode_ms

    @property
    def per_token_ms(self) -> float | None:
        steps = self.new_tokens - 1  # the first token comes from the prefill
        return self.decode_ms / steps if steps > 0 else None

    def to_dict(self) -> dict[str, float]:
        data = dataclasses.asdict(self)
        data["total_ms"] = self.total_ms
        data["per_token_ms"] = self.per_token_ms
        return data


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token), "stop_string", or "length"
    timings: Timings = field(default_factory=Timings)


def _choose_precision(manifest: Manifest, component: str, requested: str, device: str) -> str:
    available = manifest.precisions(component)
    if requested != "auto":
        if requested in available:
            return requested
        # Components a precision does not apply to (e.g. int8 token embeddings) stay in float.
        fallback = "fp16" if requested == "fp16" and "fp16" in available else "fp32"
        log.debug("%s has no %s variant; using %s", component, requested, fallback)
        return fallback
    recorded = manifest.selected.get(device, {}).get(component)
    if recorded in available:
        return recorded
    if device == "cuda" and "fp16" in available:
        return "fp16"  # integer MatMuls fall back to the CPU under the CUDA provider: fp16 is the GPU's fast path
    return "fp32"


class VisionLanguageRuntime:
    """A model directory loaded for inference. Create it with :func:`load`."""

    def __init__(self, model_dir: Path, manifest: Manifest, tokenizer: Tokenizer, graphs: Graphs,
                 precisions: dict[str, str], session_config: SessionConfig) -> None:
        self.model_dir = model_dir
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.graphs = graphs
        self.precisions = precisions
        self.session_config = session_config
        self.preprocessor = ImagePreprocessor(manifest.preprocess)
        self.prefix_ids = list(manifest.prefix_ids)
        self.caption_prompt = manifest.generation.get("caption_prompt", DEFAULT_CAPTION_PROMPT)
        self.default_options = GenerationOptions(
            max_new_tokens=int(manifest.generation.get("max_new_tokens", 32)))
        self._prefix_lock = threading.Lock()
        self._prefix_cache: Any = None

    # ------------------------------------------------------------------ public API

    def caption(self, image, options: GenerationOptions | None = None, channel_order: str = "BGR") -> GenerationResult:
        """Caption one image (path, bytes or array)."""
        return self.generate([image], [self.caption_prompt], options, channel_order=channel_order)[0]

    def ask(self, image, question: str, options: GenerationOptions | None = None,
            channel_order: str = "BGR") -> GenerationResult:
        return self.generate([image], [question], options, channel_order=channel_order)[0]

    def generate(
        self,
        images: Sequence,
        prompts: Sequence[str] | str | None = None,
        options: GenerationOptions | None = None,
        stop_strings: Sequence[str] = (),
        on_token: Callable[[int, int], None] | None = None,
        channel_order: str = "BGR",
    ) -> list[GenerationResult]:
        """Answer ``prompts[i]`` about ``images[i]`` (one prompt for all, or the caption prompt when None)."""
        if isinstance(images, (str, Path, bytes, np.ndarray)):
            images = [images]
        if not len(images):
            raise ConfigError("generate() needs at least one image")
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts or self.caption_prompt] * len(images)
        if len(prompts) != len(images):
            raise ConfigError(f"{len(prompts)} prompts for {len(images)} images")
        started = time.perf_counter()
        pixels = self.preprocessor.batch(images, channel_order=channel_order)
        timings = Timings(preprocess_ms=(time.perf_counter() - started) * 1e3)
        return self.generate_from_pixels(pixels, prompts, options, stop_strings, on_token, timings)

    def stream(self, image, prompt: str | None = None, options: GenerationOptions | None = None,
               channel_order: str = "BGR") -> Iterator[str]:
        """Text pieces as tokens are chosen, for one image."""
        pieces: queue.Queue = queue.Queue()
        finished = object()
        tokens: list[int] = []
        emitted = ""
        failure: list[BaseException] = []

        def on_token(row: int, token: int) -> None:
            pieces.put(token)

        def worker() -> None:
            try:
                self.generate([image], [prompt or self.caption_prompt], options, on_token=on_token,
                              channel_order=channel_order)
            except BaseException as exc:  # re-raised in the consumer's thread
                failure.append(exc)
            finally:
                pieces.put(finished)

        thread = threading.Thread(target=worker, name="vledge-stream", daemon=True)
        thread.start()
        while (item := pieces.get()) is not finished:
            tokens.append(item)
            text = self.tokenizer.decode(tokens)
            if len(text) > len(emitted) and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
                yield text[len(emitted):]
                emitted = text
        thread.join()
        if failure:
            raise failure[0]

    def embed_images(self, images: Sequence, channel_order: str = "BGR") -> np.ndarray:
        """Image embeddings [N, image_tokens, hidden]: what the language model sees (also a scene descriptor)."""
        return self.graphs.encode_images(self.preprocessor.batch(images, channel_order=channel_order))

    def info(self) -> dict[str, Any]:
        """What is loaded and where it runs (providers really active, precision per graph)."""
        return {
            "model_dir": str(self.model_dir),
            "architecture": self.manifest.architecture(),
            "precisions": dict(self.precisions),
            "providers": {
                "vision_encoder": self.graphs.vision.get_providers(),
                "embed_tokens": self.graphs.embed.get_providers(),
                "decoder_model_merged": self.graphs.decoder.get_providers(),
            },
            "device": self.graphs.device,
            "threads": self.session_config.threads,
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
        stop_strings: Sequence[str] = (),
        on_token: Callable[[int, int], None] | None = None,
        timings: Timings | None = None,
    ) -> list[GenerationResult]:
        options = options or self.default_options
        timings = timings or Timings()
        tick = time.perf_counter()
        image_embeds = self.graphs.encode_images(pixel_values)
        timings.vision_ms = (time.perf_counter() - tick) * 1e3
        ids = [question_ids(self.tokenizer, self.manifest.prompt, prompt) for prompt in prompts]
        return self.generate_from_embeds(image_embeds, ids, options, stop_strings, on_token, timings)

    def generate_from_embeds(
        self,
        image_embeds: np.ndarray,
        prompt_ids: Sequence[Sequence[int]],
        options: GenerationOptions,
        stop_strings: Sequence[str] = (),
        on_token: Callable[[int, int], None] | None = None,
        timings: Timings | None = None,
    ) -> list[GenerationResult]:
        """Decode from image embeddings and token prompts (each holding one image token)."""
        timings = timings or Timings()
        tick = time.perf_counter()
        steps, options = self.prefill(image_embeds, prompt_ids, options)
        timings.prefill_ms = (time.perf_counter() - tick) * 1e3
        stop_check = _stop_string_check(self.tokenizer, stop_strings) if stop_strings else None
        tick = time.perf_counter()
        generated = decode_tokens(steps.first_logits, steps, options, self.tokenizer.eos_id, on_token,
                                  stop_check=stop_check)
        timings.decode_ms = (time.perf_counter() - tick) * 1e3
        timings.new_tokens = max((len(tokens) for tokens in generated), default=0)
        results = []
        for tokens in generated:
            text = self.tokenizer.decode(tokens)
            reason = "length" if len(tokens) >= options.max_new_tokens else "stop"
            for stop in stop_strings:
                if stop and stop in text:
                    text, reason = text[: text.index(stop)], "stop_string"
            results.append(GenerationResult(text=text.strip(), token_ids=list(tokens), finish_reason=reason,
                                            timings=dataclasses.replace(timings)))
        return results

    def prefill_logits(self, image_embeds: np.ndarray, prompt_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Next-token logits [rows, vocab] after the prompt, for parity checks against PyTorch."""
        steps, _ = self.prefill(image_embeds, prompt_ids, self.default_options)
        return steps.first_logits

    def prefill(self, image_embeds: np.ndarray, prompt_ids: Sequence[Sequence[int]], options: GenerationOptions):
        image_id = self.tokenizer.image_id
        for row, ids in enumerate(prompt_ids):
            if list(ids).count(image_id) != 1:
                raise ConfigError(f"prompt {row} must hold exactly one image token, has {list(ids).count(image_id)}")
        if len(prompt_ids) != image_embeds.shape[0]:
            raise ConfigError(f"{len(prompt_ids)} prompts for {image_embeds.shape[0]} images")
        prefix = self.prefix_ids
        use_prefix = bool(prefix) and all(list(ids[: len(prefix)]) == prefix for ids in prompt_ids)
        rests = [list(ids[len(prefix):]) if use_prefix else list(ids) for ids in prompt_ids]
        rows_embeds = []
        text_embeds = self.graphs.embed_ids(left_pad(rests, self.tokenizer.pad_id)[0])
        width = text_embeds.shape[1]
        for row, rest in enumerate(rests):
            row_text = text_embeds[row, width - len(rest):]
            at = rest.index(image_id)
            rows_embeds.append(np.concatenate([row_text[:at], image_embeds[row], row_text[at + 1:]]))
        if self.graphs.language_kind == "lstm":
            state = self._prefix_state() if use_prefix else None
            return LSTMSteps(self.graphs, rows_embeds, state), options
        lengths = [len(r) for r in rows_embeds]
        longest = max(lengths)
        batch = len(rows_embeds)
        embeds = np.zeros((batch, longest, self.graphs.hidden), dtype=np.float32)
        mask = np.zeros((batch, longest), dtype=np.int64)
        for row, row_embeds in enumerate(rows_embeds):
            embeds[row, longest - lengths[row]:] = row_embeds
            mask[row, longest - lengths[row]:] = 1
        past = None
        if use_prefix:
            prefix_past = self._prefix_kv()
            past = [np.repeat(value, batch, axis=0) for value in prefix_past]
            mask = np.concatenate([np.ones((batch, len(prefix)), dtype=np.int64), mask], axis=1)
        room = int(self.manifest.model_config.language.max_positions) - mask.shape[1]
        if room < 1:
            raise ConfigError(f"prompt of {mask.shape[1]} positions leaves no room in the model's "
                              f"{self.manifest.model_config.language.max_positions}")
        if options.max_new_tokens > room:
            options = dataclasses.replace(options, max_new_tokens=room)
        return TransformerSteps(self.graphs, embeds, mask, past), options

    def _prefix_kv(self) -> list[np.ndarray]:
        """Keys and values of the constant prompt prefix, computed once per loaded model."""
        with self._prefix_lock:
            if self._prefix_cache is None:
                embeds = self.graphs.embed_ids(np.asarray([self.prefix_ids], dtype=np.int64))
                steps = TransformerSteps(self.graphs, embeds, np.ones((1, len(self.prefix_ids)), dtype=np.int64))
                self._prefix_cache = [value.numpy() for value in steps.past_values]
            return self._prefix_cache

    def _prefix_state(self) -> tuple[np.ndarray, np.ndarray]:
        with self._prefix_lock:
            if self._prefix_cache is None:
                embeds = self.graphs.embed_ids(np.asarray([self.prefix_ids], dtype=np.int64))
                steps = LSTMSteps(self.graphs, [embeds[0]])
                self._prefix_cache = (steps.hidden, steps.cell)
            return self._prefix_cache

    def _probe_feeds(self) -> dict[str, dict[str, np.ndarray]]:
        size = self.manifest.preprocess.image_size
        graphs = self.graphs
        feeds: dict[str, dict[str, np.ndarray]] = {
            "vision_encoder": {"pixel_values": np.zeros((1, 3, size, size), np.float32)},
            "embed_tokens": {"input_ids": np.ones((1, 4), np.int64)},
        }
        embeds = np.zeros((1, 4, graphs.hidden), np.float32)
        if graphs.language_kind == "transformer":
            decoder = {"inputs_embeds": embeds, "attention_mask": np.ones((1, 4), np.int64),
                       "position_ids": np.arange(4, dtype=np.int64)[None]}
            for i in range(graphs.layers):
                for kind in ("key", "value"):
                    decoder[f"past_key_values.{i}.{kind}"] = np.zeros((1, graphs.heads, 0, graphs.head_dim), np.float32)
        else:
            state = np.zeros((graphs.layers, 1, graphs.hidden), np.float32)
            decoder = {"inputs_embeds": embeds, "past_hidden": state, "past_cell": state}
        feeds["decoder_model_merged"] = decoder
        return feeds


def _stop_string_check(tokenizer: Tokenizer, stop_strings: Sequence[str]) -> Callable[[int, list[int]], bool]:
    stops = [s for s in stop_strings if s]

    def check(row: int, tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens[-16:])  # a stop string spans at most a few tokens
        return any(stop in text for stop in stops)

    return check


def load(
    model_dir: str | Path,
    precision: str | dict[str, str] = "auto",
    providers: str | Sequence[str] = "auto",
    threads: int | None = None,
    device_id: int = 0,
    optimization: str = "all",
    strict: bool = False,
    verify: bool = True,
) -> VisionLanguageRuntime:
    """Open a model directory written by ``vledge export``: verify it, pick variants, start sessions."""
    wanted = precision if isinstance(precision, dict) else {component: precision for component in COMPONENTS}
    for value in wanted.values():
        if value != "auto" and value not in PRECISIONS:
            raise ConfigError(f"unknown precision {value!r}; choose from auto, {', '.join(PRECISIONS)}")
    config = SessionConfig(providers=tuple(providers) if not isinstance(providers, str) else providers,
                           device_id=device_id, threads=threads, optimization=optimization, strict=strict)
    root = Path(model_dir)
    manifest = read_manifest(root, verify=verify)
    tokenizer = Tokenizer.from_file(resolve_inside(root, TOKENIZER_NAME))
    sessions = {}
    precisions = {}
    device = "cpu"
    for component in COMPONENTS:
        if component not in manifest.variants:
            raise ModelDirError(f"{root / 'vledge.json'} lists no {component} graph")
        # The first session tells us whether a GPU is really active; later choices follow it.
        chosen = _choose_precision(manifest, component, wanted.get(component, "auto"), device if sessions else
                                   ("cuda" if _wants_cuda(config) else "cpu"))
        path = resolve_inside(root, manifest.variants[component][chosen])
        session = create_session(path, config)
        if primary_provider(session) in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
            device = "cuda"
        elif sessions == {} and _wants_cuda(config):
            # CUDA fell back (allowed under "auto"): re-choose this component for the CPU.
            cpu_choice = _choose_precision(manifest, component, wanted.get(component, "auto"), "cpu")
            if cpu_choice != chosen:
                chosen = cpu_choice
                session = create_session(resolve_inside(root, manifest.variants[component][chosen]), config)
        sessions[component], precisions[component] = session, chosen
    language = manifest.model_config.language
    graphs = Graphs(
        vision=sessions["vision_encoder"], embed=sessions["embed_tokens"], decoder=sessions["decoder_model_merged"],
        language_kind=language.kind, layers=language.layers, heads=language.heads if language.kind == "transformer" else 0,
        head_dim=language.head_dim if language.kind == "transformer" else 0, hidden=language.hidden,
        device=device, device_id=device_id,
    )
    runtime = VisionLanguageRuntime(root, manifest, tokenizer, graphs, precisions, config)
    if strict and device == "cuda":
        _check_placement(runtime)
    log.info("loaded %s: %s on %s", root, precisions, device)
    return runtime


def _wants_cuda(config: SessionConfig) -> bool:
    names, _ = resolve_providers(config.providers)
    return names[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _check_placement(runtime: VisionLanguageRuntime) -> None:
    for component, by_provider in runtime.placement().items():
        heavy = sorted(op for op in by_provider.get("CPUExecutionProvider", {}) if op in HEAVY_OPS)
        if heavy:
            raise ProviderError(f"strict mode: {component} runs {', '.join(heavy)} nodes on the CPU under "
                                f"{runtime.graphs.decoder.get_providers()[0]}; choose another precision "
                                f"(fp16 for CUDA) or turn strict off")

