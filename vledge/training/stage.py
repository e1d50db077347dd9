"""One training stage's setup (trainable parts, data, optimizer, batch order) and the batch-loss helpers.

Also the frozen-feature cache: when a stage trains neither the vision encoder nor the
projector, the projected visual tokens of every training image are computed once (for a tiled
model, of every tile of every image).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from vledge.config import StageConfig
from vledge.data.dataset import BatchOrder, ConversationDataset, collate_text, filter_tasks, tile_counts
from vledge.data.images import normalize, normalize_tiles
from vledge.errors import DataError
from vledge.models.vlm import IGNORE_INDEX, VisionLanguageModel
from vledge.training.setup import PreparedRun

log = logging.getLogger(__name__)

FEATURE_CACHE_LIMIT_BYTES = 2 << 30


@dataclass(frozen=True)
class StageSetup:
    """What the loop steps with during one stage."""

    stage: StageConfig
    dataset: ConversationDataset
    optimizer: torch.optim.AdamW
    model: torch.nn.Module  # the model, or its DDP wrapper under several processes
    order: BatchOrder


class FrozenFeatures:
    """Projected visual tokens by image key: what a frozen encoder and projector would compute.

    ``counts`` (a tiled model's tiles per image, in ``keys`` order) makes each image's rows a run of
    ``tokens``; ``lookup`` then returns the tiles of every key one key after the other.
    """

    def __init__(self, keys: list[str], tokens: torch.Tensor, counts: list[int] | None = None) -> None:
        self.rows = {key: row for row, key in enumerate(keys)}
        self.tokens = tokens  # [images (tiles), visual tokens, hidden]
        self.spans = None
        if counts is not None:
            starts = [0]
            for count in counts[:-1]:
                starts.append(starts[-1] + count)
            self.spans = {key: range(start, start + count) for key, start, count in zip(keys, starts, counts)}

    def lookup(self, keys: list[str]) -> torch.Tensor:
        if self.spans is not None:
            rows = [row for key in keys for row in self.spans[key]]
            return self.tokens[torch.tensor(rows, device=self.tokens.device)]
        return self.tokens[torch.tensor([self.rows[key] for key in keys], device=self.tokens.device)]


def prepare_stage(run: PreparedRun, index: int) -> StageSetup:
    """Set the trainable parts of stage ``index`` and build its dataset, AdamW and batch order."""
    stage = run.stages[index]
    model, config = run.model, run.train_config
    groups = model.parameter_groups()
    for name, params in groups.items():
        for p in params:
            p.requires_grad_(name in stage.trainable)
    records = filter_tasks(list(run.train_records), stage.tasks)
    if not records:
        raise DataError(f"stage {stage.name!r} has no training data for tasks {stage.tasks}")
    dataset = ConversationDataset(
        records, run.train_images, run.tokenizer, run.model_config.prompt, model.num_image_tokens,
        config.max_seq_len, run.train_report, config.turns_per_example, run.model_config.preprocess.tiles,
    )
    base_lr = stage.lr or config.lr
    vision_scale = (config.vision_lr or base_lr) / config.lr if stage.lr is None else 1.0
    param_groups = []
    for names, scale in ((("vision", "projector"), vision_scale), (("language",), 1.0)):
        params = [p for name in names for p in groups[name] if p.requires_grad]
        for decay in (True, False):
            chosen = [p for p in params if (p.dim() >= 2) == decay]
            if chosen:
                param_groups.append({"params": chosen, "lr_scale": scale,
                                     "weight_decay": config.weight_decay if decay else 0.0})
    optimizer = torch.optim.AdamW(param_groups, lr=base_lr, betas=config.betas)
    wrapped = model
    if run.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
    order = BatchOrder(len(dataset), config.batch_size, config.seed, run.world, run.rank)
    log.info("stage %s: %d examples, training %s", stage.name, len(dataset), ", ".join(stage.trainable))
    return StageSetup(stage, dataset, optimizer, wrapped, order)


def frozen_features(run: PreparedRun, stage: StageConfig, previous: FrozenFeatures | None) -> FrozenFeatures | None:
    """The projected visual tokens of every training image, when ``stage`` trains neither the
    vision encoder nor the projector: computed once, they replace the encoder's work at every step.

    ``previous`` (the cache of the stage before, or None) is kept across consecutive frozen stages;
    pass None after a stage that trained the encoder. Not used under DDP (gradients are
    synchronised through the wrapped model's forward) or over the memory cap.
    """
    if run.world > 1 or {"vision", "projector"} & set(stage.trainable):
        return None
    if previous is not None:
        return previous  # nothing has trained the encoder since they were computed
    keys = sorted(run.train_images)
    tiled = run.model_config.preprocess.tiles is not None
    counts = [run.train_images[key].count for key in keys] if tiled else None
    needed = (sum(counts) if tiled else len(keys)) * run.model.num_image_tokens * run.model_config.language.hidden * 4
    if needed > FEATURE_CACHE_LIMIT_BYTES:
        log.info("frozen visual tokens need %.1f GiB, over the %.0f GiB cap: encoding images at every step",
                 needed / 2**30, FEATURE_CACHE_LIMIT_BYTES / 2**30)
        return None
    started = time.monotonic()
    with run.autocast():
        tokens = project_images(run.model, run.train_images, keys, run.model_config.preprocess, run.device)
    log.info("stage %s: visual tokens of %d frozen-encoder images computed once in %.1f s", stage.name,
             len(keys), time.monotonic() - started)
    return FrozenFeatures(keys, tokens, counts)


@torch.no_grad()
def project_images(model: VisionLanguageModel, images: dict[str, torch.Tensor], keys: list[str],
                   spec, device: torch.device | str = "cpu", chunk: int = 256) -> torch.Tensor:
    """Projected visual tokens [len(keys), tokens, hidden] of cached uint8 images, in eval mode
    (a frozen encoder's BatchNorm statistics, as at every frozen step); for a tiled model (``TiledPixels``
    images) [their tiles, tokens, hidden], the tiles of each key in ``keys`` order."""
    was_training = model.training
    model.eval()
    chunks = []
    tiled = spec.tiles is not None
    step = max(1, chunk // 16) if tiled else chunk  # an image is up to a few dozen tiles
    for start in range(0, len(keys), step):
        if tiled:
            pixels = normalize_tiles(torch.cat([images[k].load() for k in keys[start:start + step]]), spec)
        else:
            pixels = normalize(torch.stack([images[k] for k in keys[start:start + chunk]]), spec)
        chunks.append(model.projector(model.vision(pixels.to(device))).float())
    model.train(was_training)
    return torch.cat(chunks)


def pieces_loss(model: VisionLanguageModel, examples: list, image_embeds: torch.Tensor, pieces: list[list[int]],
                pad_id: int) -> torch.Tensor:
    """A batch's mean answer-token loss, the language model run once per piece of ``examples``.

    Each piece's token mean is weighted by its share of the batch's answer tokens, so the loss
    and its gradient are those of the whole padded batch. A tiled model's ``image_embeds`` are the tiles
    of every example in order (``tile_counts``).
    """
    device = image_embeds.device
    spans = None
    if model.fills_image_tokens:
        ends = torch.tensor(tile_counts(examples)).cumsum(0).tolist()
        spans = [range(end - count, end) for count, end in zip(tile_counts(examples), ends)]
    counts = [sum(sum(label != IGNORE_INDEX for label in examples[i].labels) for i in piece) for piece in pieces]
    total = torch.zeros((), device=device)
    for piece, count in zip(pieces, counts):
        if count == 0:
            continue
        batch = collate_text([examples[i] for i in piece], pad_id)
        rows = piece if spans is None else [row for i in piece for row in spans[i]]
        merged = model.merge(batch["input_ids"].to(device), image_embeds[rows],
                             batch["attention_mask"].to(device), batch["labels"].to(device))
        total = total + model.loss(model.decode(merged), merged.labels) * (count / sum(counts))
    return total


def length_pieces(lengths: list[int], min_piece: int = 2, min_saving: float = 0.15) -> list[list[int]]:
    """Indices of a batch cut in two pieces (short, long) that minimise the padded tokens.

    One piece (the whole batch) unless cutting saves at least ``min_saving`` of them.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n, longest = len(order), sorted_lengths[-1]
    whole = n * longest
    best, cut = whole, n
    for k in range(min_piece, n - min_piece + 1):
        cost = k * sorted_lengths[k - 1] + (n - k) * longest
        if cost < best:
            best, cut = cost, k
    if cut == n or best > (1 - min_saving) * whole:
        return [list(range(n))]
    return [order[:cut], order[cut:]]
