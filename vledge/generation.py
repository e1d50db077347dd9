"""One generation path for every engine: prefill, token choice, stop strings, results and timings.

Torch-free. An engine (the ONNX Runtime model in ``vledge.runtime``, the PyTorch model in
``vledge.models.generate``) only computes: it encodes images and prefills prompts into a
``StepModel``. Everything a caller sees — the positions clamp, stop tokens and stop strings,
the text, ``finish_reason`` and the timings — is decided here once, so ``--ckpt``, ``--model``,
the parity gate and the benchmark behave the same.

Stop strings end a row as soon as its text contains one (sampling and greedy stop early; beam
search ends at its usual point). The text is cut before the stop string, and ``token_ids`` run up
to and including the token that completed it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from vledge.decoding import GenerationOptions, StepModel, StopCheck, TokenCallback, decode_tokens
from vledge.errors import ConfigError


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

    def to_dict(self) -> dict[str, float | None]:
        data: dict[str, float | None] = dict(dataclasses.asdict(self))
        data["total_ms"] = self.total_ms
        data["per_token_ms"] = self.per_token_ms
        return data


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token), "stop_string", or "length"
    timings: Timings = field(default_factory=Timings)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": list(self.token_ids), "finish_reason": self.finish_reason,
                "timings": self.timings.to_dict()}


class TextTokenizer(Protocol):
    eos_id: int
    pad_id: int

    def decode(self, ids: Sequence[int]) -> str: ...


class PrefilledSteps(StepModel, Protocol):
    first_logits: np.ndarray  # [rows, vocab] float32: the logits after the prompt


class Engine(Protocol):
    """What an engine implements; :func:`generate` does the rest.

    An engine may also have ``stop_token_ids`` (a sequence of ids): the model's own stop tokens.
    """

    tokenizer: TextTokenizer

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """Preprocessed pixels [N, 3, S, S] float32 -> image embeddings [N, image_tokens, hidden] float32."""

    def prefill(self, image_embeds: np.ndarray | Sequence[np.ndarray], prompt_ids: Sequence[Sequence[int]],
                options: GenerationOptions) -> tuple[PrefilledSteps, GenerationOptions]:
        """Run the prompts (one image token each, replaced by that row's embeddings); returns the step model
        and ``options`` with ``max_new_tokens`` clamped by :func:`clamp_to_positions`.

        A tiled model's rows (``vledge.image_tiles``) hold one image token per visual token; ``image_embeds``
        is then one array per row, [tiles, image_tokens, hidden], whose tokens fill the row's image tokens in
        order."""


# --------------------------------------------------------------------------- positions


def clamp_to_positions(options: GenerationOptions, prompt_positions: int,
                       max_positions: int | None) -> GenerationOptions:
    """``options`` with ``max_new_tokens`` lowered to the positions the prompt leaves (None: no limit).

    A prompt that leaves no room at all is an error: nothing could be generated.
    """
    if max_positions is None:
        return options
    room = max_positions - prompt_positions
    if room < 1:
        raise ConfigError(f"prompt of {prompt_positions} positions (image tokens included) leaves no room in "
                          f"the model's {max_positions}; ask a shorter question")
    if options.max_new_tokens > room:
        return dataclasses.replace(options, max_new_tokens=room)
    return options


# --------------------------------------------------------------------------- stop strings


def stop_list(stop_strings: Sequence[str] | str | None) -> tuple[str, ...]:
    """Stop strings as a checked tuple (one string is one stop string; empty ones are dropped)."""
    if stop_strings is None:
        return ()
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    stops = tuple(stop_strings)
    for stop in stops:
        if not isinstance(stop, str):
            raise ConfigError(f"stop strings must be strings, got {type(stop).__name__}")
    return tuple(stop for stop in stops if stop)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    cut = min((text.find(stop) for stop in stop_strings if stop and stop in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def partial_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that could be the start of a stop string (held back while streaming)."""
    longest = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def stop_string_check(tokenizer: TextTokenizer, stop_strings: Sequence[str]) -> StopCheck:
    """A decode-loop check: has the row's text just completed a stop string?"""
    stops = [s for s in stop_strings if s]
    # A stop string can only complete inside the text of the last few tokens: a byte-level token holds at
    # least one byte and a character at most four.
    window = 4 * max(len(s) for s in stops) + 4

    def check(row: int, tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens[-window:])
        return any(stop in text for stop in stops)

    return check


def _through_stop(tokenizer: TextTokenizer, tokens: list[int], stop_strings: Sequence[str]) -> list[int]:
    """``tokens`` up to and including the one whose text completes a stop string (beam search decodes past it)."""
    check = stop_string_check(tokenizer, stop_strings)
    for end in range(1, len(tokens) + 1):
        if check(0, tokens[:end]):
            return tokens[:end]
    return tokens


# --------------------------------------------------------------------------- stop tokens


def with_model_stops(options: GenerationOptions, stop_token_ids: Sequence[int]) -> GenerationOptions:
    """``options`` that also stop at ``stop_token_ids`` (a model's own stop ids)."""
    merged = tuple(dict.fromkeys((*options.stop_token_ids, *(int(i) for i in stop_token_ids))))
    return options if merged == options.stop_token_ids else dataclasses.replace(options, stop_token_ids=merged)


# --------------------------------------------------------------------------- the generation path


def generate(
    engine: Engine,
    image_embeds: np.ndarray,
    prompt_ids: Sequence[Sequence[int]],
    options: GenerationOptions,
    stop_strings: Sequence[str] | str = (),
    on_token: TokenCallback | None = None,
    timings: Timings | None = None,
) -> list[GenerationResult]:
    """Answer each (image embeddings, prompt) row; every engine's results are built here.

    A row stops at the tokenizer's ``eos_id``, at ``options.stop_token_ids`` and at the engine's
    ``stop_token_ids`` (the model's recorded stop ids, where the engine has them).
    """
    if not isinstance(options, GenerationOptions):
        raise ConfigError(f"options must be a vledge GenerationOptions, got {type(options).__name__}")
    options = with_model_stops(options, getattr(engine, "stop_token_ids", ()))
    stops = stop_list(stop_strings)
    tokenizer = engine.tokenizer
    timings = timings or Timings()
    tick = time.perf_counter()
    steps, options = engine.prefill(image_embeds, prompt_ids, options)
    timings.prefill_ms = (time.perf_counter() - tick) * 1e3
    stop_check = stop_string_check(tokenizer, stops) if stops else None
    tick = time.perf_counter()
    generated = decode_tokens(steps.first_logits, steps, options, tokenizer.eos_id, on_token, stop_check=stop_check)
    timings.decode_ms = (time.perf_counter() - tick) * 1e3
    timings.new_tokens = max((len(tokens) for tokens in generated), default=0)
    results = []
    for tokens in generated:
        text, stopped = cut_at_stop(tokenizer.decode(tokens), stops)
        if stopped and options.num_beams > 1:
            tokens = _through_stop(tokenizer, list(tokens), stops)
        reason = "stop_string" if stopped else "length" if len(tokens) >= options.max_new_tokens else "stop"
        results.append(GenerationResult(text=text.strip(), token_ids=list(tokens), finish_reason=reason,
                                        timings=dataclasses.replace(timings)))
    return results


def generate_from_pixels(engine: Engine, pixel_values: np.ndarray, prompt_ids: Sequence[Sequence[int]],
                         options: GenerationOptions, *args, timings: Timings | None = None,
                         tiles_per_row: Sequence[int] | None = None, **kwargs) -> list[GenerationResult]:
    """:func:`generate` from preprocessed pixels [N, 3, S, S]: the vision encoder runs first (timed).

    For a tiled model ``pixel_values`` holds every row's tiles one row after the other and ``tiles_per_row``
    says how many are each row's. The other arguments (``stop_strings``, ``on_token``) are :func:`generate`'s.
    """
    timings = timings or Timings()
    tick = time.perf_counter()
    image_embeds = engine.encode_images(pixel_values)
    if tiles_per_row is not None:
        image_embeds = split_rows(image_embeds, tiles_per_row)
    timings.vision_ms = (time.perf_counter() - tick) * 1e3
    return generate(engine, image_embeds, prompt_ids, options, *args, timings=timings, **kwargs)



def split_rows(image_embeds: np.ndarray, tiles_per_row: Sequence[int]) -> list[np.ndarray]:
    """Visual tokens of every row's tiles [N, T, H] -> one array per row (a tiled model's prefill input)."""
    counts = [int(n) for n in tiles_per_row]
    if sum(counts) != len(image_embeds) or any(n < 0 for n in counts):
        raise ConfigError(f"{len(image_embeds)} tiles cannot be split into rows of {counts}")
    ends = np.cumsum(counts)
    return [image_embeds[end - n:end] for n, end in zip(counts, ends)]
