"""Tokenised, image-cached training examples and a deterministic, resumable batch order."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from vledge.config import PreprocessSpec, PromptTemplate
from vledge.data.images import load_rgb, normalize, resize_and_crop
from vledge.data.records import LoadReport, Record, Turn
from vledge.errors import DataError, ImageError
from vledge.models.vlm import IGNORE_INDEX
from vledge.prompt import encode_conversation
from vledge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CACHE_LIMIT_BYTES = 4 << 30


@dataclass
class Example:
    record_id: str
    pixels: torch.Tensor  # uint8 [3, S, S]
    input_ids: list[int]
    labels: list[int]
    image: str = ""  # the image's cache key (its path)


def filter_tasks(records: Sequence[Record], tasks: Sequence[str] | None) -> list[Record]:
    """Keep only turns of the given tasks (a stage's data); records left with none are dropped."""
    if tasks is None:
        return list(records)
    wanted = set(tasks)
    kept = []
    for record in records:
        turns = tuple(t for t in record.turns if t.task in wanted)
        if turns:
            kept.append(Record(id=record.id, image=record.image, turns=turns))
    return kept


def cache_images(
    records: Sequence[Record], spec: PreprocessSpec, report: LoadReport, workers: int = 4
) -> dict[str, torch.Tensor]:
    """Decode, resize and crop each distinct image once (uint8), keyed by path.

    A bad image is skipped and counted once per record that needed it; those records leave ``kept``.
    """
    paths = sorted({str(r.image) for r in records})
    needed = len(paths) * 3 * spec.image_size**2
    if needed > CACHE_LIMIT_BYTES:
        raise DataError(f"{len(paths)} images need {needed / 2**30:.1f} GiB of cache, over the "
                        f"{CACHE_LIMIT_BYTES / 2**30:.0f} GiB limit; use fewer images or a smaller image size")

    def load(path: str) -> torch.Tensor | None:
        try:
            return resize_and_crop(load_rgb(path), spec)
        except ImageError as exc:
            log.warning("skipping %s", exc)
            return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        cache = {path: image for path, image in zip(paths, pool.map(load, paths)) if image is not None}
    for record in records:
        if str(record.image) not in cache:
            report.skip("image unreadable")
            report.kept -= 1
    return cache


class ConversationDataset(torch.utils.data.Dataset):
    """Tokenised conversations over cached images; a conversation too long for the model is cut or skipped.

    ``turns_per_example`` splits long conversations into shorter ones, each with the image: in a
    short sequence the visual tokens are a large share of what attention sees at first, which is
    what lets a model trained from scratch start using them.
    """

    def __init__(
        self,
        records: Sequence[Record],
        images: dict[str, torch.Tensor],
        tokenizer: Tokenizer,
        template: PromptTemplate,
        image_tokens: int,
        max_seq_len: int,
        report: LoadReport | None = None,
        turns_per_example: int | None = None,
    ) -> None:
        self.report = report or LoadReport(source="dataset")
        self.examples = []
        for record in records:
            pixels = images.get(str(record.image))
            if pixels is None:
                continue  # its image was unreadable, already counted
            step = turns_per_example or len(record.turns)
            for start in range(0, len(record.turns), step):
                turns = record.turns[start:start + step]
                ids, labels = self._encode(turns, tokenizer, template, image_tokens, max_seq_len)
                if ids is None:
                    self.report.skip("conversation too long")
                    continue
                self.examples.append(Example(record.id, pixels, ids, labels, str(record.image)))
        if not self.examples:
            raise DataError(f"no usable examples ({self.report.summary()})")

    @staticmethod
    def _encode(turns: tuple[Turn, ...], tokenizer, template, image_tokens: int, max_seq_len: int):
        """Ids and labels; trailing turns are dropped until the merged sequence fits."""
        for keep in range(len(turns), 0, -1):
            prompt = encode_conversation(tokenizer, template, turns[:keep])
            if len(prompt.ids) - 1 + image_tokens <= max_seq_len:
                labels = [i if t else IGNORE_INDEX for i, t in zip(prompt.ids, prompt.target)]
                return prompt.ids, labels
        return None, None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def collate(examples: Sequence[Example], spec: PreprocessSpec, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: padding after the answer never changes earlier positions."""
    pixels = normalize(torch.stack([e.pixels for e in examples]), spec)
    return {"pixel_values": pixels, **collate_text(examples, pad_id)}


def collate_text(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """The token side of ``collate``, for callers that already hold the image embeddings."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class BatchOrder:
    """Which examples micro-step ``k`` uses, a pure function of (seed, k): resuming repeats nothing.

    Epochs are fresh permutations laid end to end; each rank takes its slice of the global batch.
    """

    size: int
    batch_size: int
    seed: int
    world: int = 1
    rank: int = 0
    _epoch: tuple[int, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def indices(self, micro_step: int) -> list[int]:
        global_batch = self.batch_size * self.world
        start = micro_step * global_batch + self.rank * self.batch_size
        out = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, self.size)
            out.append(int(self._permutation(epoch)[offset]))
        return out

    def epoch_of(self, micro_step: int) -> float:
        return micro_step * self.batch_size * self.world / self.size

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size))
        return self._epoch[1]
