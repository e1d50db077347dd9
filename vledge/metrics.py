"""Answer accuracy and caption metrics (BLEU-4, CIDEr-D), torch-free.

BLEU-4 and CIDEr-D follow pycocoevalcap, the COCO caption evaluation, so numbers
can be set beside published ones; its Java PTB tokenizer is approximated by
:func:`caption_tokens`. The runtime and the benchmarks use these too.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from vledge.errors import ConfigError

MAX_N = 4

# --------------------------------------------------------------------------- answers

_OPEN_QUOTES = "\"'“‘`"
_CLOSE_QUOTES = "\"'”’`"


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no trailing period or surrounding quotes: "Three." == 'three'."""
    text = " ".join(text.lower().split())
    while True:
        before = text
        if text.endswith("."):
            text = text[:-1].rstrip()
        if len(text) >= 2 and text[0] in _OPEN_QUOTES and text[-1] in _CLOSE_QUOTES:
            text = text[1:-1].strip()
        if text == before:
            return text


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


class AccuracyByTask:
    """Counts right answers per task (count, color, ...), because one overall number hides
    which skills a small model lacks."""

    def __init__(self) -> None:
        self.correct: Counter = Counter()
        self.total: Counter = Counter()

    def add(self, task: str, correct: bool) -> None:
        self.total[task] += 1
        self.correct[task] += int(bool(correct))

    def add_answer(self, task: str, prediction: str, reference: str) -> bool:
        """Score one answer by exact match and count it; returns whether it was right."""
        correct = exact_match(prediction, reference)
        self.add(task, correct)
        return correct

    def __len__(self) -> int:
        return sum(self.total.values())

    @property
    def tasks(self) -> list[str]:
        return sorted(self.total)

    def accuracy(self, task: str | None = None) -> float:
        """Accuracy of one task, or over everything; 0.0 when nothing was counted."""
        total = len(self) if task is None else self.total[task]
        correct = sum(self.correct.values()) if task is None else self.correct[task]
        return correct / total if total else 0.0

    def to_dict(self) -> dict:
        by_task = {
            task: {"accuracy": self.accuracy(task), "correct": self.correct[task], "count": self.total[task]}
            for task in self.tasks
        }
        correct = sum(self.correct.values())
        return {"accuracy": self.accuracy(), "correct": correct, "count": len(self), "tasks": by_task}


# --------------------------------------------------------------------------- captions

# Tokens the COCO evaluation's PTB tokenizer drops; "n't" and "'s" stay words as there.
_DROPPED = frozenset(".,?!:;-'\"`()[]{}")
_CLITICS = re.compile(r"(\w)(n't|'(?:s|re|ve|ll|d|m))\b")
_TOKENS = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.]\w+)*|[^\w\s]")


def caption_tokens(text: str) -> list[str]:
    """Roughly the PTB tokenizer of the COCO evaluation: lower case, clitics split off
    ("dog's" -> "dog 's"), punctuation dropped, hyphenated words and decimals kept."""
    text = _CLITICS.sub(r"\1 \2", text.lower())
    return [token for token in _TOKENS.findall(text) if token not in _DROPPED]


def _ngram_counts(tokens: Sequence[str], max_n: int = MAX_N) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ConfigError(f"{len(predictions)} predictions but {len(references)} reference sets")
    if not predictions:
        raise ConfigError("no predictions to score")
    if any(isinstance(refs, str) or not refs for refs in references):
        raise ConfigError("every prediction needs a non-empty list of reference strings")


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 as pycocoevalcap computes it: n-gram counts clipped by their most
    frequent occurrence in any one reference, summed over the corpus, geometric mean of
    the four precisions, brevity penalty against the closest reference length (ties go
    to the shorter one). Where pycocoevalcap's epsilon smoothing gives about 1e-4 for a
    corpus without any matching 4-gram, this gives 0.0."""
    _check(predictions, references)
    correct, guessed = [0] * MAX_N, [0] * MAX_N
    prediction_length = reference_length = 0
    for prediction, refs in zip(predictions, references):
        tokens = caption_tokens(prediction)
        ref_tokens = [caption_tokens(ref) for ref in refs]
        most = Counter()
        for ref in ref_tokens:
            most |= _ngram_counts(ref)  # | keeps the larger count of each n-gram
        for ngram, count in _ngram_counts(tokens).items():
            correct[len(ngram) - 1] += min(count, most[ngram])
        for n in range(MAX_N):
            guessed[n] += max(0, len(tokens) - n)
        prediction_length += len(tokens)
        reference_length += min((abs(len(ref) - len(tokens)), len(ref)) for ref in ref_tokens)[1]
    if min(correct) == 0:
        return 0.0
    log_precision = sum(math.log(c / g) for c, g in zip(correct, guessed)) / MAX_N
    brevity = 1.0 if prediction_length >= reference_length else math.exp(1.0 - reference_length / prediction_length)
    return brevity * math.exp(log_precision)


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
    """CIDEr-D as pycocoevalcap computes it, averaged over images.

    Per n = 1..4: tf-idf vectors, the idf from how many images' reference sets hold the
    n-gram (over this evaluated set, so one image alone scores 0); cosine similarity with
    the candidate's weights clipped by the reference's; a gaussian penalty on the length
    difference (sigma 6). Mean over n, mean over references, times 10.
    """
    _check(predictions, references)
    candidates = [_ngram_counts(caption_tokens(p)) for p in predictions]
    reference_counts = [[_ngram_counts(caption_tokens(r)) for r in refs] for refs in references]
    document_frequency: Counter = Counter()
    for refs in reference_counts:
        document_frequency.update(set().union(*refs))
    log_images = math.log(len(reference_counts))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        weights: list[dict] = [{} for _ in range(MAX_N)]
        for ngram, count in counts.items():
            weights[len(ngram) - 1][ngram] = count * (log_images - math.log(max(1, document_frequency[ngram])))
        norms = [math.sqrt(sum(w * w for w in by_ngram.values())) for by_ngram in weights]
        # pycocoevalcap measures length in bigrams (one less than words): kept for equal numbers.
        length = sum(count for ngram, count in counts.items() if len(ngram) == 2)
        return weights, norms, length

    scores = []
    for candidate, refs in zip(candidates, reference_counts):
        weights, norms, length = vector(candidate)
        total = 0.0
        for ref in refs:
            ref_weights, ref_norms, ref_length = vector(ref)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
            for n in range(MAX_N):
                ref_n = ref_weights[n]
                value = sum(min(w, ref_n.get(g, 0.0)) * ref_n.get(g, 0.0) for g, w in weights[n].items())
                if norms[n] and ref_norms[n]:
                    value /= norms[n] * ref_norms[n]
                total += value * penalty
        scores.append(10.0 * total / MAX_N / len(refs))
    return sum(scores) / len(scores)
