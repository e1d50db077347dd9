"""Teacher-forced parity: how closely a variant's next-token distribution follows PyTorch's at every position.

Free-running token agreement stops counting at the first divergence: one early tie broken the other way
makes a whole long answer "wrong" even when every later prediction is right. Language-model evaluation
instead feeds both models the same tokens (the held-out answers, or a real text) and compares the
predictions position by position: top-1 agreement (both pick the same next token) and the mean KL divergence
KL(PyTorch || variant) in nats. Both go through the engines' ``prefill`` and KV-cached ``step``, so the cache
path a user runs is what is measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vledge.decoding import GenerationOptions, log_softmax
from vledge.errors import ExportError
from vledge.generation import Engine
from vledge.prompt import CAPTION_PROMPT, question_ids
from vledge.tokenizer import Tokenizer

# A text passed with --parity-text is cut into pieces of this many tokens, each forced after the caption
# prompt; at most ``max_tokens`` of it are used (the reference keeps a full distribution per position).
TEXT_CHUNK_TOKENS = 128
MAX_TEXT_BYTES = 16 * 1024 * 1024


@dataclass
class ForcedSet:
    """Rows to force: image row, prompt ids and the target ids whose predictions are compared."""

    source: str
    image_rows: list[int]
    prompts: list[list[int]]
    targets: list[list[int]]

    @property
    def positions(self) -> int:
        return sum(len(target) for target in self.targets)


@dataclass
class TeacherForced:
    source: str
    positions: int
    top1_agreement: float  # share of positions where both pick the same next token
    mean_kl: float  # mean over positions of KL(PyTorch || variant), nats
    max_kl: float

    @classmethod
    def between(cls, source: str, ours: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> "TeacherForced":
        """``ours`` and ``reference`` are per-row log-probabilities [positions, vocab]."""
        agree, kls = 0, []
        for q, p in zip(ours, reference):
            if len(p) == 0:
                continue
            agree += int((q.argmax(-1) == p.argmax(-1)).sum())
            p64, q64 = p.astype(np.float64), q.astype(np.float64)
            kls.append(np.maximum((np.exp(p64) * (p64 - q64)).sum(-1), 0.0))
        values = np.concatenate(kls) if kls else np.zeros(0)
        positions = int(values.size)
        return cls(source=source, positions=positions, top1_agreement=agree / positions if positions else 1.0,
                   mean_kl=float(values.mean()) if positions else 0.0,
                   max_kl=float(values.max()) if positions else 0.0)


def answer_set(tokenizer: Tokenizer, template, image_index: Sequence[int], prompts: Sequence[Sequence[int]],
               answers: Sequence[str]) -> ForcedSet:
    """The held-out answers as the model was trained to produce them: answer prefix, text, end token."""
    targets = [tokenizer.encode(template.answer_prefix + answer) + [tokenizer.eos_id] for answer in answers]
    return ForcedSet("held-out answers", list(image_index), [list(p) for p in prompts], targets)


def read_parity_text(path: Path) -> str:
    """The text of ``--parity-text``, or an ExportError saying why it cannot be used (checked before any work)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--parity-text {path}: no such file")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise ExportError(f"--parity-text {path}: {path.stat().st_size} bytes, more than {MAX_TEXT_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ExportError(f"--parity-text {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ExportError(f"--parity-text {path}: cannot be read ({exc.strerror})") from exc
    if not text.strip():
        raise ExportError(f"--parity-text {path}: the file holds no text")
    return text


def text_set(text: str, tokenizer: Tokenizer, template, max_tokens: int, max_positions: int | None,
             image_tokens: int, name: str, prompt: Sequence[int] | None = None) -> ForcedSet:
    """Pieces of a real text, each forced after the first held-out image and the caption prompt.

    ``prompt``: the caption prompt's ids already holding every image token (a tiled model's, expanded for the
    first image); by default the template's, whose one image token stands for ``image_tokens`` positions."""
    ids = tokenizer.encode(text)[:max_tokens]
    positions = None
    if prompt is None:
        prompt = question_ids(tokenizer, template, CAPTION_PROMPT)
        positions = len(prompt) - 1 + image_tokens
    prompt = list(prompt)
    chunk = TEXT_CHUNK_TOKENS
    if max_positions is not None:
        chunk = min(chunk, max_positions - (len(prompt) if positions is None else positions))
    if chunk < 1:
        raise ExportError(f"--parity-text: the model's {max_positions} positions leave no room after the prompt")
    pieces = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    if not pieces:
        raise ExportError(f"--parity-text {name}: the tokenizer made no tokens of it")
    return ForcedSet(f"text {name}", [0] * len(pieces), [list(prompt) for _ in pieces], pieces)


def tile_spans(grids: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
    """(first tile, tile count) of each image of a tiled model (rows * cols tiles and the global view)."""
    if grids is None:
        return None
    spans, start = [], 0
    for rows, cols in grids:
        spans.append((start, rows * cols + 1))
        start += rows * cols + 1
    return spans


def images_of(image_embeds: np.ndarray, images: Sequence[int], spans: Sequence[tuple[int, int]] | None):
    """``image_embeds[images]``, or for a tiled model (``spans``) one array of each image's tiles per question."""
    if spans is None:
        return image_embeds[list(images)]
    return [image_embeds[spans[i][0]:spans[i][0] + spans[i][1]] for i in images]


def forced_log_probs(engine: Engine, image_embeds: np.ndarray, forced: ForcedSet,
                     spans: Sequence[tuple[int, int]] | None = None, batch_size: int = 16) -> list[np.ndarray]:
    """Per row, log-probabilities [len(target), vocab] of each target token's position, targets fed back.

    ``spans``: a tiled model's (first tile, tile count) of each image in ``image_embeds`` (:func:`tile_spans`)."""
    out: list[np.ndarray] = [np.zeros((0, 0), np.float32)] * len(forced.targets)
    order = sorted(range(len(forced.targets)), key=lambda i: len(forced.targets[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        longest = max(len(forced.targets[i]) for i in batch)
        if longest == 0:
            continue
        rows = [forced.image_rows[i] for i in batch]
        steps, options = engine.prefill(images_of(image_embeds, rows, spans), [forced.prompts[i] for i in batch],
                                        GenerationOptions(max_new_tokens=longest))
        length = min(longest, options.max_new_tokens)
        collected = [log_softmax(np.asarray(steps.first_logits, dtype=np.float32))]
        for t in range(length - 1):
            tokens = np.asarray([forced.targets[i][t] if t < len(forced.targets[i]) else forced.targets[i][-1]
                                 for i in batch], dtype=np.int64)
            collected.append(log_softmax(np.asarray(steps.step(tokens), dtype=np.float32)))
        stacked = np.stack(collected, axis=1)  # [rows, length, vocab]
        for row, index in enumerate(batch):
            out[index] = stacked[row, :min(len(forced.targets[index]), length)].astype(np.float32)
    return out
