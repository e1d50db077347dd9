"""Token selection for generation, independent of the engine that computes logits.

The PyTorch reference and the ONNX Runtime engine both drive these pieces, so for
the same logits they pick the same tokens (sampling included, for the same seed).
An engine only has to implement ``StepModel``: feed one token per row, return the
next logits, and reorder its cache rows for beam search.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vledge.bounds import MAX_BEAMS, MAX_SEED, check_count
from vledge.errors import ConfigError, InferenceError


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy; > 0: sample
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    num_beams: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):  # NaN passes every comparison below
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        check_count("num_beams", self.num_beams, 1, MAX_BEAMS)
        if self.seed is not None:
            check_count("seed", self.seed, 0, MAX_SEED)
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams > 1 and self.temperature > 0:
            raise ConfigError("beam search is deterministic: use temperature 0 with num_beams > 1")


class StepModel(Protocol):
    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token id per row ([rows] int64); return next-token logits [rows, vocab] float32."""

    def reorder(self, rows: np.ndarray) -> None:
        """Keep cache rows ``rows`` (in that order, repeats allowed) for the next step."""


# --------------------------------------------------------------------------- logit filters


class LogitFilter:
    def apply(self, logits: np.ndarray, generated: list[list[int]]) -> np.ndarray:
        raise NotImplementedError


@dataclass
class RepetitionPenalty(LogitFilter):
    """CTRL-style: divide positive logits (multiply negative ones) of tokens already generated."""

    penalty: float

    def apply(self, logits: np.ndarray, generated: list[list[int]]) -> np.ndarray:
        for row, tokens in enumerate(generated):
            if tokens:
                ids = np.unique(np.asarray(tokens))
                values = logits[row, ids]
                logits[row, ids] = np.where(values > 0, values / self.penalty, values * self.penalty)
        return logits


@dataclass
class TopK(LogitFilter):
    k: int

    def apply(self, logits: np.ndarray, generated: list[list[int]]) -> np.ndarray:
        if self.k >= logits.shape[-1]:
            return logits
        kth = np.partition(logits, -self.k, axis=-1)[:, -self.k][:, None]
        return np.where(logits < kth, -np.inf, logits)


@dataclass
class TopP(LogitFilter):
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p."""

    p: float

    def apply(self, logits: np.ndarray, generated: list[list[int]]) -> np.ndarray:
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = softmax(sorted_logits)
        cumulative = np.cumsum(probs, axis=-1)
        remove_sorted = cumulative - probs >= self.p  # the first token is always kept
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        return np.where(remove, -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def sample(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row by inverting the cumulative distribution (one uniform number per row)."""
    cumulative = np.cumsum(probs, axis=-1)
    draws = rng.random(probs.shape[0]) * cumulative[:, -1]
    tokens = np.array([np.searchsorted(row, u, side="right") for row, u in zip(cumulative, draws)])
    return np.minimum(tokens, probs.shape[-1] - 1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def build_filters(options: GenerationOptions) -> list[LogitFilter]:
    filters: list[LogitFilter] = []
    if options.repetition_penalty != 1.0:
        filters.append(RepetitionPenalty(options.repetition_penalty))
    if options.temperature > 0 and options.top_k > 0:
        filters.append(TopK(options.top_k))
    if options.temperature > 0 and options.top_p < 1.0:
        filters.append(TopP(options.top_p))
    return filters


# --------------------------------------------------------------------------- token decoders

TokenCallback = Callable[[int, int], None]  # (row, token id), called as each token is chosen
StopCheck = Callable[[int, list[int]], bool]  # (row, tokens so far) -> stop this row now (stop strings)


def _stop_ids(options: GenerationOptions, eos_id: int) -> set[int]:
    return {eos_id, *options.stop_token_ids}


def sample_or_greedy(
    first_logits: np.ndarray,
    model: StepModel,
    options: GenerationOptions,
    eos_id: int,
    on_token: TokenCallback | None = None,
    stop_check: StopCheck | None = None,
) -> list[list[int]]:
    """Greedy (temperature 0) or sampled decoding; a row stops at its first stop token (or ``stop_check``)."""
    rows = first_logits.shape[0]
    stop = _stop_ids(options, eos_id)
    filters = build_filters(options)
    rng = np.random.default_rng(options.seed)
    generated: list[list[int]] = [[] for _ in range(rows)]
    finished = np.zeros(rows, dtype=bool)
    logits = first_logits
    for step in range(options.max_new_tokens):
        logits = logits.astype(np.float32, copy=True)
        for logit_filter in filters:
            logits = logit_filter.apply(logits, generated)
        if options.temperature > 0:
            tokens = sample(softmax(logits.astype(np.float64) / options.temperature), rng)
        else:
            tokens = np.argmax(logits, axis=-1)
        tokens = np.where(finished, eos_id, tokens).astype(np.int64)
        for row in np.flatnonzero(~finished):
            token = int(tokens[row])
            if token in stop:
                finished[row] = True
            else:
                generated[row].append(token)
                if on_token is not None:
                    on_token(int(row), token)
                if stop_check is not None and stop_check(int(row), generated[row]):
                    finished[row] = True
        if finished.all() or step == options.max_new_tokens - 1:
            break
        logits = model.step(tokens)
    return generated


def beam_search(
    first_logits: np.ndarray,
    model: StepModel,
    options: GenerationOptions,
    eos_id: int,
) -> list[list[int]]:
    """Beam search over ``num_beams`` hypotheses per row, scored by length-normalised log-probability.

    The model's cache holds one row per input row on entry; it is expanded to one row per beam.
    """
    batch, vocab = first_logits.shape
    beams = options.num_beams
    stop = _stop_ids(options, eos_id)
    filters = build_filters(options)
    model.reorder(np.repeat(np.arange(batch), beams))
    logits = np.repeat(first_logits, beams, axis=0)
    scores = np.tile(np.r_[0.0, np.full(beams - 1, -np.inf)], batch)  # only the first beam starts live
    sequences: list[list[int]] = [[] for _ in range(batch * beams)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)

    def normalised(score: float, length: int) -> float:
        return score / max(length, 1) ** options.length_penalty

    for step in range(options.max_new_tokens):
        logits = logits.astype(np.float32, copy=True)
        for logit_filter in filters:
            logits = logit_filter.apply(logits, sequences)
        candidates = (log_softmax(logits) + scores[:, None]).reshape(batch, beams * vocab)
        top = np.argsort(-candidates, axis=-1, kind="stable")[:, : 2 * beams]
        next_rows, next_tokens, next_scores = [], [], []
        for b in range(batch):
            kept = 0
            for flat in top[b]:
                beam, token = divmod(int(flat), vocab)
                row, score = b * beams + beam, float(candidates[b, flat])
                if done[b]:
                    row, token, score = b * beams, eos_id, -np.inf
                elif token in stop or step == options.max_new_tokens - 1:
                    tokens = sequences[row] + ([] if token in stop else [token])
                    finished[b].append((normalised(score, len(tokens) + (token in stop)), tokens))
                    continue
                next_rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
                kept += 1
                if kept == beams:
                    break
            finished[b].sort(key=lambda item: -item[0])
            del finished[b][beams:]
            if len(finished[b]) == beams and not done[b]:
                best_live = max(next_scores[-kept:]) if kept else -np.inf
                if normalised(best_live, step + 2) <= finished[b][-1][0]:
                    done[b] = True
        if done.all() or step == options.max_new_tokens - 1:
            break
        rows = np.asarray(next_rows)
        sequences = [sequences[r] + [t] for r, t in zip(next_rows, next_tokens)]
        scores = np.asarray(next_scores, dtype=np.float64)
        model.reorder(rows)
        logits = model.step(np.asarray(next_tokens, dtype=np.int64))
    return [max(finished[b], key=lambda item: item[0])[1] if finished[b] else [] for b in range(batch)]


def decode_tokens(
    first_logits: np.ndarray,
    model: StepModel,
    options: GenerationOptions,
    eos_id: int,
    on_token: TokenCallback | None = None,
    stop_check: StopCheck | None = None,
) -> list[list[int]]:
    """Pick the decoder the options ask for; returns the new tokens of each row, stop token excluded.

    Beam search ignores ``on_token`` and ``stop_check``: its hypotheses are only final at the end.
    """
    model = _FiniteSteps(model)
    first_logits = usable_logits(first_logits)
    if options.num_beams > 1:
        return beam_search(first_logits, model, options, eos_id)
    return sample_or_greedy(first_logits, model, options, eos_id, on_token, stop_check)


def usable_logits(logits: np.ndarray) -> np.ndarray:
    """``logits`` when every row has a finite best score; NaN or +inf anywhere (or a row all -inf) means the
    weights or the graph are broken, and an answer picked from them would be silently wrong."""
    best = np.max(logits, axis=-1) if logits.size else logits
    if not np.isfinite(best).all():
        raise InferenceError("the language model produced NaN or infinite logits: its weights or graph are "
                             "broken (a caption from them would be meaningless)")
    return logits


class _FiniteSteps:
    """A StepModel whose every step's logits are checked by :func:`usable_logits`."""

    def __init__(self, inner: StepModel) -> None:
        self.inner = inner

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return usable_logits(self.inner.step(tokens))

    def reorder(self, rows: np.ndarray) -> None:
        self.inner.reorder(rows)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and attention mask, so every row's next token goes in the same column."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq):] = seq
            mask[row, width - len(seq):] = 1
    return ids, mask
