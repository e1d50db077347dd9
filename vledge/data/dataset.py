"""Tokenised, image-cached training examples and a deterministic, resumable batch order.

A tiled model (Idefics3 / SmolVLM, ``spec.tiles``) caches each image as its uint8 tiles and grid
(:class:`~vledge.data.images.TiledPixels`); its examples' ids hold the expanded image prompt (one image token
per visual token, ``vledge.image_tiles``), so their length is the sequence the LM sees, and a batch's pixels are
the tiles of its examples one example after the other (what ``VisionLanguageModel.merge`` fills in order).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from vledge.config import ImageTiles, PreprocessSpec, PromptTemplate
from vledge.data.images import TiledPixels, load_rgb, load_tiles, normalize, normalize_tiles, resize_and_crop
from vledge.data.records import LoadReport, Record, Turn
from vledge.errors import DataError, ImageError
from vledge.image_tiles import expand_image_ids
from vledge.models.vlm import IGNORE_INDEX
from vledge.prompt import encode_conversation
from vledge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CACHE_LIMIT_BYTES = 4 << 30


@dataclass
class Example:
    record_id: str
    pixels: torch.Tensor | TiledPixels  # uint8 [3, S, S]; a tiled model's: its TiledPixels
    input_ids: list[int]
    labels: list[int]
    image: str = ""  # the image's cache key (its path)
    grid: tuple[int, int] | None = None  # a tiled model's (rows, cols); its ids hold the expanded image prompt

    def positions(self, image_tokens: int) -> int:
        """Positions the LM sees: the image token becomes ``image_tokens`` visual tokens, or, for a tiled
        model, the ids already hold one image token per visual token."""
        return len(self.input_ids) if self.grid is not None else len(self.input_ids) - 1 + image_tokens


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
) -> dict[str, torch.Tensor] | dict[str, TiledPixels]:
    """Decode, resize and crop each distinct image once (uint8), keyed by path; a tiled model's as its tiles.

    A bad image is skipped and counted once per record that needed it; those records leave ``kept``.
    """
    paths = sorted({str(r.image) for r in records})
    if spec.tiles is not None:
        cache = _cache_tiles(paths, spec, workers)
        _count_unreadable(records, cache, report)
        return cache
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
    _count_unreadable(records, cache, report)
    return cache


def _count_unreadable(records: Sequence[Record], cache: dict, report: LoadReport) -> None:
    for record in records:
        if str(record.image) not in cache:
            report.skip("image unreadable")
            report.kept -= 1


def _cache_tiles(paths: list[str], spec: PreprocessSpec, workers: int) -> dict[str, TiledPixels]:
    """Each image's uint8 tiles and grid. An image's tile count is known once it is decoded, so the limit is
    checked as they arrive; past it only the grids are kept and a batch decodes its images again."""

    def load(path: str) -> TiledPixels | None:
        try:
            return load_tiles(path, spec)
        except ImageError as exc:
            log.warning("skipping %s", exc)
            return None

    cache: dict[str, TiledPixels] = {}
    used, held = 0, True
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path, image in zip(paths, pool.map(load, paths)):
            if image is None:
                continue
            used += image.tiles.numel()
            if held and used > CACHE_LIMIT_BYTES:
                held = False
                log.warning("the tiles of %d of %d images already need over %.0f GiB of cache: keeping only their "
                            "grids, each batch decodes and splits its images again (slower steps)", len(cache) + 1,
                            len(paths), CACHE_LIMIT_BYTES / 2**30)
                cache = {key: value.unloaded(key, spec) for key, value in cache.items()}
            cache[path] = image if held else image.unloaded(path, spec)
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
        tiles: ImageTiles | None = None,
    ) -> None:
        """``tiles``: a tiled model's ``spec.tiles``; then ``images`` holds ``TiledPixels`` and each example's
        image token is expanded for its image's grid."""
        self.report = report or LoadReport(source="dataset")
        self.examples = []
        for record in records:
            pixels = images.get(str(record.image))
            if pixels is None:
                continue  # its image was unreadable, already counted
            grid = None
            if tiles is not None:
                grid = pixels.grid
            step = turns_per_example or len(record.turns)
            for start in range(0, len(record.turns), step):
                turns = record.turns[start:start + step]
                if grid is None:
                    ids, labels = self._encode(turns, tokenizer, template, image_tokens, max_seq_len)
                else:
                    ids, labels = self._encode_tiled(turns, tokenizer, template, tiles, grid, max_seq_len)
                if ids is None:
                    self.report.skip("conversation too long")
                    continue
                self.examples.append(Example(record.id, pixels, ids, labels, str(record.image), grid))
        if not self.examples:
            hint = (f" (a tiled image takes {tiles.tokens_per_tile} positions per tile: raise max_seq_len, now "
                    f"{max_seq_len})" if tiles is not None and self.report.skipped.get("conversation too long") else "")
            raise DataError(f"no usable examples ({self.report.summary()}){hint}")

    @staticmethod
    def _encode(turns: tuple[Turn, ...], tokenizer, template, image_tokens: int, max_seq_len: int):
        """Ids and labels; trailing turns are dropped until the merged sequence fits."""
        for keep in range(len(turns), 0, -1):
            prompt = encode_conversation(tokenizer, template, turns[:keep])
            if len(prompt.ids) - 1 + image_tokens <= max_seq_len:
                labels = [i if t else IGNORE_INDEX for i, t in zip(prompt.ids, prompt.target)]
                return prompt.ids, labels
        return None, None

    @staticmethod
    def _encode_tiled(turns: tuple[Turn, ...], tokenizer, template, tiles: ImageTiles, grid: tuple[int, int],
                      max_seq_len: int):
        """A tiled model's ids (the image token expanded for ``grid``) and labels (the expansion is no target);
        trailing turns are dropped until they fit."""
        for keep in range(len(turns), 0, -1):
            prompt = encode_conversation(tokenizer, template, turns[:keep])
            ids = expand_image_ids(tokenizer, tiles, prompt.ids, [grid])
            if len(ids) <= max_seq_len:
                at = prompt.ids.index(tokenizer.image_id)
                grown = len(ids) - len(prompt.ids)
                labels = ([i if t else IGNORE_INDEX for i, t in zip(prompt.ids[:at], prompt.target[:at])]
                          + [IGNORE_INDEX] * (grown + 1)
                          + [i if t else IGNORE_INDEX for i, t in zip(prompt.ids[at + 1:], prompt.target[at + 1:])])
                return ids, labels
        return None, None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def collate(examples: Sequence[Example], spec: PreprocessSpec, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: padding after the answer never changes earlier positions."""
    return {"pixel_values": batch_pixels(examples, spec), **collate_text(examples, pad_id)}


def batch_pixels(examples: Sequence[Example], spec: PreprocessSpec) -> torch.Tensor:
    """The batch's normalised pixels: [B, 3, S, S], or a tiled model's tiles of every example in order
    [tiles, 3, S, S] (``tile_counts`` says how many are each example's)."""
    if spec.tiles is not None:
        return normalize_tiles(torch.cat([e.pixels.load() for e in examples]), spec)
    return normalize(torch.stack([e.pixels for e in examples]), spec)


def tile_counts(examples: Sequence[Example]) -> list[int]:
    """Tiles per example of a tiled model's batch, in ``batch_pixels`` order."""
    return [e.pixels.count for e in examples]


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
