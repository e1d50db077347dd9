"""Accuracy of a PyTorch model on held-out conversations: exact match per task, BLEU-4/CIDEr on captions.

Every question is asked on its own (image + question, as ``ask`` does at run time);
questions of one task are batched together so short answers do not wait for long ones.
A tiled model (Idefics3 / SmolVLM) sees each image as its tiles and the question with its image
prompt expanded for the image's grid, as the runtime asks it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vledge.config import ModelConfig
from vledge.data.images import normalize, normalize_tiles, preprocess, preprocess_tiles
from vledge.data.records import Record
from vledge.decoding import GenerationOptions
from vledge.errors import ImageError
from vledge.image_tiles import expand_image_ids
from vledge.metrics import AccuracyByTask, bleu4, cider_d, exact_match
from vledge.models.generate import generate
from vledge.prompt import question_ids
from vledge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CAPTION_TASKS = ("caption",)
LONG_ANSWER_TASKS = ("describe", "list")


@dataclass
class Prediction:
    record_id: str
    image: str
    task: str
    question: str
    reference: str
    prediction: str
    correct: bool


@dataclass
class EvalReport:
    accuracy: dict[str, float]  # per task, plus "overall"
    counts: dict[str, int]
    bleu4: float | None
    cider: float | None
    skipped_unreadable: int = 0  # questions whose image could not be read
    predictions: list[Prediction] = field(default_factory=list)

    def to_dict(self, examples: int = 0) -> dict:
        out = {"accuracy": self.accuracy, "counts": self.counts, "bleu4": self.bleu4, "cider": self.cider,
               "skipped_unreadable": self.skipped_unreadable}
        if examples:
            out["examples"] = [vars(p) for p in self.predictions[:examples]]
        return out

    def describe(self) -> str:
        lines = [f"{task:<10} {self.accuracy[task] * 100:6.2f}%  ({self.counts[task]} questions)"
                 for task in sorted(t for t in self.accuracy if t != "overall")]
        lines.append(f"{'overall':<10} {self.accuracy.get('overall', 0.0) * 100:6.2f}%  ({self.counts.get('overall', 0)})")
        if self.skipped_unreadable:
            lines.append(f"skipped    {self.skipped_unreadable} questions whose image could not be read")
        if self.bleu4 is not None:
            lines.append(f"captions   BLEU-4 {self.bleu4:.3f}  CIDEr {self.cider:.3f}")
        return "\n".join(lines)


def questions_of(records: Sequence[Record], limit: int | None = None) -> list[tuple[Record, int]]:
    """(record, turn index) pairs, spread over records first so a limit samples many images."""
    pairs = [(record, index) for record in records for index in range(len(record.turns))]
    pairs.sort(key=lambda pair: (pair[1], pair[0].id))
    return pairs[:limit] if limit else pairs


@torch.inference_mode()
def evaluate(
    model,
    tokenizer: Tokenizer,
    config: ModelConfig,
    records: Sequence[Record],
    limit: int | None = None,
    batch_size: int = 32,
    images: dict[str, torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Greedy answers to held-out questions, scored by exact match; ``images`` reuses cached uint8 pixels
    (a tiled model's: ``TiledPixels``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    by_task: dict[str, list[tuple[Record, int]]] = defaultdict(list)
    for record, index in questions_of(records, limit):
        by_task[record.turns[index].task].append((record, index))

    cache: dict[str, torch.Tensor | None] = {}
    spec = config.preprocess
    tiled = spec.tiles is not None
    grids: dict[str, tuple[int, int]] = {}  # a tiled model's image grids, by key

    def pixels(record: Record) -> torch.Tensor | None:
        """[3, S, S], or a tiled model's tiles [n, 3, S, S] (their grid in ``grids``)."""
        key = str(record.image)
        if images is not None and key in images:
            if tiled:
                grids[key] = images[key].grid
                return normalize_tiles(images[key].load(), spec)
            return normalize(images[key], spec)
        if key not in cache:
            try:
                if tiled:
                    tiles = preprocess_tiles(record.image, spec)
                    cache[key], grids[key] = torch.from_numpy(tiles.pixel_values), (tiles.rows, tiles.cols)
                else:
                    cache[key] = preprocess(record.image, spec)
            except ImageError as exc:
                log.warning("evaluation skips %s", exc)
                cache[key] = None
        return cache[key]

    def prompt(record: Record, index: int) -> list[int]:
        ids = question_ids(tokenizer, config.prompt, record.turns[index].question)
        return expand_image_ids(tokenizer, spec.tiles, ids, [grids[str(record.image)]]) if tiled else ids

    scores = AccuracyByTask()
    predictions: list[Prediction] = []
    skipped = 0
    for task, pairs in sorted(by_task.items()):
        max_new = 96 if task in LONG_ANSWER_TASKS else 48
        options = GenerationOptions(max_new_tokens=max_new)
        for start in range(0, len(pairs), batch_size):
            window = pairs[start:start + batch_size]
            chunk = [(r, i, px) for r, i in window if (px := pixels(r)) is not None]
            skipped += len(window) - len(chunk)
            if not chunk:
                if progress is not None:
                    progress(len(window))
                continue
            prompts = [prompt(r, i) for r, i, _ in chunk]
            if tiled:
                batch = torch.cat([px for _, _, px in chunk]).to(device)
                outputs = generate(model, batch, prompts, options, tokenizer.eos_id, tokenizer.pad_id,
                                   tiles_per_row=[px.shape[0] for _, _, px in chunk])
            else:
                batch = torch.stack([px for _, _, px in chunk]).to(device)
                outputs = generate(model, batch, prompts, options, tokenizer.eos_id, tokenizer.pad_id)
            for (record, index, _), tokens in zip(chunk, outputs):
                turn = record.turns[index]
                text = tokenizer.decode(tokens).strip()
                correct = exact_match(text, turn.answer)
                scores.add(turn.task, correct)
                predictions.append(Prediction(record.id, str(record.image), turn.task, turn.question, turn.answer, text, correct))
            if progress is not None:  # once answered, so the bar says what is done
                progress(len(window))
    caption_bleu, caption_cider = _caption_scores(predictions)
    model.train(was_training)
    accuracy = {task: scores.accuracy(task) for task in scores.tasks}
    counts = {task: scores.total[task] for task in scores.tasks}
    accuracy["overall"], counts["overall"] = scores.accuracy(), len(scores)
    return EvalReport(
        accuracy=accuracy, counts=counts, bleu4=caption_bleu, cider=caption_cider,
        predictions=predictions, skipped_unreadable=skipped,
    )


def _caption_scores(predictions: list[Prediction]) -> tuple[float | None, float | None]:
    """Corpus BLEU-4 and CIDEr-D over caption answers, one prediction per image against all its references."""
    references: dict[str, list[str]] = defaultdict(list)
    predicted: dict[str, str] = {}
    for p in predictions:
        if p.task in CAPTION_TASKS:
            references[p.image].append(p.reference)
            predicted.setdefault(p.image, p.prediction)
    if not predicted:
        return None, None
    keys = sorted(predicted)
    hyps = [predicted[k] for k in keys]
    refs = [references[k] for k in keys]
    return bleu4(hyps, refs), cider_d(hyps, refs)
