"""Setting a training run up: devices and processes, data, stages, tokenizer, model and caches.

``prepare_run`` does it once and returns a frozen ``PreparedRun``, fresh or from ``last.pt``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vledge.checkpoint import Checkpoint, load_checkpoint
from vledge.config import ModelConfig, StageConfig, TrainConfig
from vledge.data.dataset import ConversationDataset, cache_images, filter_tasks
from vledge.data.loaders import load_records
from vledge.data.records import LoadReport, Record
from vledge.errors import CheckpointError, ConfigError, DataError
from vledge.files import check_output_dir
from vledge.models.vision import load_vision_weights
from vledge.models.vlm import VisionLanguageModel
from vledge.threads import default_threads
from vledge.tokenizer import Tokenizer
from vledge.training import pretrained_lm
from vledge.training.memory import prepare_memory
from vledge.training.budget import check_resumable
from vledge.training.run_options import RunOptions, RunState, decode_train_state
from vledge.training.vision_pretrain import load_projector_weights

log = logging.getLogger(__name__)

VAL_LOSS_EXAMPLES = 128


@dataclass(frozen=True)
class PreparedRun:
    """What a run needs before its first step. The record is fixed for the run's life; the model's
    weights and the training records' order of use are what training changes."""

    data: Path
    run_dir: Path
    options: RunOptions  # as given, or last.pt's on resume (with this call's device)
    model_config: ModelConfig  # its vocab size set to the tokenizer's
    train_config: TrainConfig
    rank: int
    world: int
    device: torch.device
    start: RunState  # where the run starts: step 0, or where last.pt stopped
    stages: tuple[StageConfig, ...]  # the stages that have data and train something, frozen parts removed
    bounds: tuple[tuple[float, float], ...]  # each stage's share of progress, [start, end)
    train_records: tuple[Record, ...]
    val_records: tuple[Record, ...]
    train_report: LoadReport
    tokenizer: Tokenizer
    model: VisionLanguageModel
    train_images: dict[str, torch.Tensor]  # uint8 images by key
    val_images: dict[str, torch.Tensor]
    val_loss_set: ConversationDataset
    resumed: bool
    optimizer_state: dict[str, Any] | None  # last.pt's AdamW state on resume
    autocast: Callable[[], AbstractContextManager]

    @property
    def budget_seconds(self) -> float | None:
        return self.options.budget_seconds


def prepare_run(data: Path, run_dir: Path, model_config: ModelConfig, train_config: TrainConfig,
                options: RunOptions = RunOptions(), resume: bool = False) -> PreparedRun:
    """Set a run up; with ``resume`` the configs, options and state come from ``run_dir/last.pt``
    (only ``options.device`` is this call's)."""
    data, run_dir = Path(data), Path(run_dir)
    check_output_dir(run_dir, "run folder")  # before minutes of loading data and building the model
    rank, world = _init_distributed(options.device)
    device = _pick_device(options.device)
    start = RunState()
    resume_from: Checkpoint | None = None
    if resume:
        resume_from = load_checkpoint(run_dir / "last.pt")
        if resume_from.train_state is None or resume_from.train_config is None:
            raise CheckpointError(f"{run_dir / 'last.pt'} holds no training state to resume")
        model_config, train_config = resume_from.model_config, resume_from.train_config
        start, saved = decode_train_state(resume_from.train_state, run_dir / "last.pt")
        # this call's device, and its budget when it gives one (to finish a run a budget cut short)
        options = replace(saved, device=options.device,
                          minutes=options.minutes if options.minutes is not None else saved.minutes)
        check_resumable(start.step, train_config.max_steps, start.elapsed, options.minutes, run_dir / "last.pt")
    loaded_lm = None
    if resume_from is None and options.init is not None and options.language_model is None:
        model_config = load_checkpoint(options.init).model_config  # its weights define the architecture
    if resume_from is None:
        model_config, loaded_lm = pretrained_lm.prepare_language(model_config, options.language_model, options.init,
                                                                 train_config.max_seq_len)
    torch.set_num_threads(train_config.threads or max(1, default_threads() // world))

    all_train_records, train_report = load_records(data, split="train",
                                                   allow_outside_paths=options.allow_outside_paths)
    stages = usable_stages(stage_plan(train_config, options.stage), options.freeze, all_train_records, data,
                           model_config)
    train_records, val_records = split_validation(data, all_train_records, options.allow_outside_paths)
    train_report.kept -= len(all_train_records) - len(train_records)  # held out for validation
    tokenizer = loaded_lm.tokenizer if loaded_lm is not None and options.init is None else _tokenizer(
        resume_from, options.init, model_config, train_records)
    # a pretrained LM may have more embedding rows than its tokenizer has tokens (Qwen2 pads them)
    vocab_size = max(tokenizer.vocab_size, model_config.language.vocab_size)
    model_config = replace(model_config, language=replace(model_config.language, vocab_size=vocab_size))
    torch.manual_seed(train_config.seed)  # the same seed gives the same initial weights
    model = VisionLanguageModel(model_config, image_token_id=tokenizer.image_id)
    if resume_from is not None:
        model.load_state_dict(resume_from.state_dict)
    elif options.init is not None:
        _load_init(model, options.init)
    else:
        if loaded_lm is not None:
            pretrained_lm.load_language_weights(model, loaded_lm)
        if options.vision_weights is not None or model_config.vision.pretrained:
            load_vision_weights(model.vision, options.vision_weights)
            if options.vision_weights is not None:  # a file from `vledge pretrain-vision` also holds the projector
                load_projector_weights(model.projector, options.vision_weights)
    del loaded_lm  # its weights are in the model now
    pretrained_lm.attach_lora(model, options.lora,
                              resume_from.train_state.get("lora_adapters") if resume_from is not None else None)
    model.to(device)
    if model_config.language.has_kv_cache:
        limit = model_config.language.max_positions
        if train_config.max_seq_len > limit:
            raise ConfigError(f"max_seq_len {train_config.max_seq_len} exceeds the model's {limit} positions")

    train_images = cache_images(train_records, model_config.preprocess, train_report)
    val_report = LoadReport(source="val")
    val_images = cache_images(val_records, model_config.preprocess, val_report)
    val_loss_set = ConversationDataset(
        val_records[:VAL_LOSS_EXAMPLES], val_images, tokenizer, model_config.prompt,
        model.num_image_tokens, train_config.max_seq_len, val_report, train_config.turns_per_example,
        model_config.preprocess.tiles,
    )
    train_config = prepare_memory(model, train_config, options, val_loss_set.examples, device, resume_from is not None)
    return PreparedRun(
        data=data, run_dir=run_dir, options=options, model_config=model_config, train_config=train_config,
        rank=rank, world=world, device=device, start=start, stages=stages, bounds=stage_bounds(stages),
        train_records=tuple(train_records), val_records=tuple(val_records), train_report=train_report,
        tokenizer=tokenizer, model=model, train_images=train_images, val_images=val_images,
        val_loss_set=val_loss_set, resumed=resume_from is not None,
        optimizer_state=resume_from.train_state.get("optimizer") if resume_from is not None else None,
        autocast=_autocast_context(train_config.precision, device),
    )


def stage_plan(config: TrainConfig, only: str | None) -> tuple[StageConfig, ...]:
    """The stages to run; ``only`` picks one stage by name and gives it the whole run."""
    if only is None:
        return config.stages
    for stage in config.stages:
        if stage.name == only:
            return (replace(stage, fraction=1.0),)
    defaults = {"align": StageConfig(name="align", tasks=("caption",)), "instruct": StageConfig(name="instruct")}
    if only in defaults:
        return (defaults[only],)
    raise ConfigError(f"unknown stage {only!r}; this config has {[s.name for s in config.stages]}")


def stage_bounds(stages: tuple[StageConfig, ...]) -> tuple[tuple[float, float], ...]:
    total = sum(s.fraction for s in stages)
    bounds, start = [], 0.0
    for stage in stages:
        end = start + stage.fraction / total
        bounds.append((start, end))
        start = end
    bounds[-1] = (bounds[-1][0], 1.0)
    return tuple(bounds)


def usable_stages(stages: tuple[StageConfig, ...], freeze: tuple[str, ...], records: list[Record],
                  data: Path, model_config: ModelConfig | None = None) -> tuple[StageConfig, ...]:
    """Drop frozen parts from every stage (a pretrained LM in ``align`` too), and stages whose tasks
    the data does not have."""
    usable = []
    for stage in stages:
        parts = pretrained_lm.stage_trainable(stage, model_config) if model_config is not None else stage.trainable
        trainable = tuple(part for part in parts if part not in freeze)
        if not trainable:
            log.warning("stage %s trains nothing once %s are frozen: skipped", stage.name, ", ".join(freeze))
            continue
        if not filter_tasks(records, stage.tasks):
            log.warning("stage %s: no %s turns in %s: skipped", stage.name, "/".join(stage.tasks or ()), data)
            continue
        usable.append(replace(stage, trainable=trainable))
    if not usable:
        raise DataError(f"no training stage has data in {data} (stages {[s.name for s in stages]})")
    return tuple(usable)


def split_validation(data: Path, train_records: list[Record],
                     allow_outside_paths: bool = False) -> tuple[list[Record], list[Record]]:
    """(training records, validation records): the val split when it is separate data, else every
    20th training image (all its records) held out, deterministically."""
    try:
        records, _ = load_records(data, split="val", allow_outside_paths=allow_outside_paths)
    except DataError:
        records = []
    train_images = {str(r.image) for r in train_records}
    if records and not {str(r.image) for r in records} <= train_images:
        return list(train_records), records
    if records:
        log.info("the val split of %s is the training data itself: holding out records instead", data)
    held_images = set(sorted(train_images)[::20])
    held = [r for r in train_records if str(r.image) in held_images]
    kept = [r for r in train_records if str(r.image) not in held_images] if held else list(train_records)
    log.info("no val split in %s: held out %d training records", data, len(held))
    return kept, held


def _init_distributed(device: str) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        use_nccl = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available on this machine")
    if device == "cuda":  # one GPU per process under torchrun
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def _autocast_context(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def _tokenizer(resume_from: Checkpoint | None, init: Path | None, config: ModelConfig,
               train_records: list[Record]) -> Tokenizer:
    if resume_from is not None:
        return resume_from.tokenizer()
    if init is not None:
        return load_checkpoint(init).tokenizer()
    template = config.prompt
    texts = [template.system, template.user, template.assistant]
    texts += [template.answer_prefix + t.answer for r in train_records for t in r.turns]
    texts += [t.question for r in train_records for t in r.turns]
    return Tokenizer.train(texts, vocab_size=config.tokenizer_vocab_size)


def _load_init(model: VisionLanguageModel, path: Path) -> None:
    checkpoint = load_checkpoint(path)
    try:
        model.load_state_dict(checkpoint.state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"--init {path} does not fit this model config: {exc}") from None
    log.info("initialised weights from %s", path)
