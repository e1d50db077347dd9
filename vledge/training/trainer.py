"""Two-stage visual instruction tuning (align, then instruct) with exact resume and DDP.

The batch order and the dropout seed of every step are pure functions of the step
number, and the learning rate is a function of progress, so a run interrupted and
resumed from ``last.pt`` continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vledge.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from vledge.config import ModelConfig, StageConfig, TrainConfig, to_dict
from vledge.data.dataset import BatchOrder, ConversationDataset, cache_images, collate, collate_text, filter_tasks
from vledge.data.images import normalize
from vledge.data.loaders import load_records
from vledge.data.records import LoadReport, Record
from vledge.errors import CheckpointError, ConfigError, DataError, TrainingError
from vledge.evaluation import evaluate
from vledge.models.vision import load_vision_weights
from vledge.models.vlm import IGNORE_INDEX, VisionLanguageModel
from vledge.tokenizer import Tokenizer
from vledge.models.lora import LoRAOptions
from vledge.training import pretrained_lm
from vledge.training.plot import plot_curves
from vledge.training.schedule import learning_rate
from vledge.training.vision_pretrain import load_projector_weights

log = logging.getLogger(__name__)

VAL_LOSS_EXAMPLES = 128
FEATURE_CACHE_LIMIT_BYTES = 2 << 30


@dataclass
class TrainEvent:
    kind: str  # "start" | "step" | "eval" | "stage" | "end"
    step: int
    total_steps: int
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    steps: int
    seconds: float
    final_eval: dict[str, Any]


@dataclass
class RunState:
    """Everything that must survive a restart besides weights and optimizer moments."""

    step: int = 0
    stage_index: int = 0
    stage_start_step: int = 0
    elapsed: float = 0.0
    best_metric: float = -math.inf


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


def _stage_bounds(stages: tuple[StageConfig, ...]) -> list[tuple[float, float]]:
    total = sum(s.fraction for s in stages)
    bounds, start = [], 0.0
    for stage in stages:
        end = start + stage.fraction / total
        bounds.append((start, end))
        start = end
    bounds[-1] = (bounds[-1][0], 1.0)
    return bounds


class FrozenFeatures:
    """Projected visual tokens by image key: what a frozen encoder and projector would compute."""

    def __init__(self, keys: list[str], tokens: torch.Tensor) -> None:
        self.rows = {key: row for row, key in enumerate(keys)}
        self.tokens = tokens  # [images, visual tokens, hidden]

    def lookup(self, keys: list[str]) -> torch.Tensor:
        return self.tokens[torch.tensor([self.rows[key] for key in keys], device=self.tokens.device)]


class Trainer:
    def __init__(
        self,
        data: Path,
        run_dir: Path,
        model_config: ModelConfig,
        train_config: TrainConfig,
        stage: str | None = None,
        minutes: float | None = None,
        resume: bool = False,
        init: Path | None = None,
        vision_weights: Path | None = None,
        freeze: tuple[str, ...] = (),
        device: str = "auto",
        on_event: Callable[[TrainEvent], None] | None = None,
        language_model: Path | None = None,
        lora: LoRAOptions | None = None,
    ) -> None:
        self.data, self.run_dir = Path(data), Path(run_dir)
        self.budget = minutes * 60.0 if minutes else None
        self.on_event = on_event or (lambda event: None)
        self.rank, self.world = self._init_distributed(device)
        self.device = self._pick_device(device)
        self.state = RunState()
        resume_from = None
        self.loaded_lm = None
        if init is not None and vision_weights is not None:
            raise ConfigError("--init already holds vision weights; --vision-weights cannot be combined with it")
        if resume:
            resume_from = load_checkpoint(self.run_dir / "last.pt")
            if resume_from.train_state is None or resume_from.train_config is None:
                raise CheckpointError(f"{self.run_dir / 'last.pt'} holds no training state to resume")
            model_config, train_config = resume_from.model_config, resume_from.train_config
            self.state = RunState(**resume_from.train_state["run"])
            self.budget = resume_from.train_state.get("budget")
            stage = resume_from.train_state.get("only_stage")
            freeze = tuple(resume_from.train_state.get("freeze", ()))
            lora = pretrained_lm.lora_options(resume_from.train_state.get("lora"))
        else:
            model_config, self.loaded_lm = pretrained_lm.prepare_language(
                model_config, language_model, init, train_config.max_seq_len)
        self.model_config = model_config  # the stages read whether the LM is pretrained
        self.lora = lora
        self.freeze = freeze
        self.only_stage = stage
        self.train_config = train_config
        torch.set_num_threads(train_config.threads or max(1, (os.cpu_count() or 1) // self.world))

        self.train_records, train_report = load_records(self.data, split="train")
        self.stages = self._usable_stages(stage_plan(train_config, stage), freeze)
        self.bounds = _stage_bounds(self.stages)
        self.val_records = self._val_records(train_report)
        self.tokenizer = self._tokenizer(resume_from, init, model_config)
        # a pretrained LM may have more embedding rows than its tokenizer has tokens (Qwen2 pads them)
        vocab_size = max(self.tokenizer.vocab_size, model_config.language.vocab_size)
        model_config = replace(model_config, language=replace(model_config.language, vocab_size=vocab_size))
        self.model_config = model_config
        torch.manual_seed(train_config.seed)  # the same seed gives the same initial weights
        self.model = VisionLanguageModel(model_config, image_token_id=self.tokenizer.image_id)
        if resume_from is not None:
            self.model.load_state_dict(resume_from.state_dict)
        elif init is not None:
            self._load_init(init)
        else:
            if self.loaded_lm is not None:
                pretrained_lm.load_language_weights(self.model, self.loaded_lm)
            if vision_weights is not None or model_config.vision.pretrained:
                load_vision_weights(self.model.vision, vision_weights)
                if vision_weights is not None:  # a file from `vledge pretrain-vision` also holds the projector
                    load_projector_weights(self.model.projector, vision_weights)
        pretrained_lm.attach_lora(self.model, lora, resume_from.train_state.get("lora") if resume_from else None)
        self.loaded_lm = None  # its weights are in the model now; do not keep a second copy
        self.model.to(self.device)
        if model_config.language.has_kv_cache:
            limit = model_config.language.max_positions
            if train_config.max_seq_len > limit:
                raise ConfigError(f"max_seq_len {train_config.max_seq_len} exceeds the model's {limit} positions")

        self.train_report = train_report
        self.train_images = cache_images(self.train_records, model_config.preprocess, train_report)
        val_report = LoadReport(source="val")
        self.val_images = cache_images(self.val_records, model_config.preprocess, val_report)
        self.val_loss_set = ConversationDataset(
            self.val_records[:VAL_LOSS_EXAMPLES], self.val_images, self.tokenizer, model_config.prompt,
            self.model.num_image_tokens, train_config.max_seq_len, val_report, train_config.turns_per_example,
        )
        self.resume_from = resume_from
        self.autocast = self._autocast_context()
        self.features: FrozenFeatures | None = None

    # ------------------------------------------------------------------ setup helpers

    def _usable_stages(self, stages: tuple[StageConfig, ...], freeze: tuple[str, ...]) -> tuple[StageConfig, ...]:
        """Drop frozen parts from every stage, and stages whose tasks the data does not have."""
        usable = []
        for stage in stages:
            trainable = tuple(part for part in pretrained_lm.stage_trainable(stage, self.model_config)
                              if part not in freeze)
            if not trainable:
                log.warning("stage %s trains nothing once %s are frozen: skipped", stage.name, ", ".join(freeze))
                continue
            if not filter_tasks(self.train_records, stage.tasks):
                log.warning("stage %s: no %s turns in %s: skipped", stage.name, "/".join(stage.tasks or ()), self.data)
                continue
            usable.append(replace(stage, trainable=trainable))
        if not usable:
            raise DataError(f"no training stage has data in {self.data} (stages {[s.name for s in stages]})")
        return tuple(usable)

    @staticmethod
    def _init_distributed(device: str) -> tuple[int, int]:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            use_nccl = device != "cpu" and torch.cuda.is_available()
            dist.init_process_group(backend="nccl" if use_nccl else "gloo")
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def _pick_device(self, device: str) -> torch.device:
        if device == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            return torch.device("cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available on this machine")
        if device == "cuda":  # one GPU per process under torchrun
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device(device)

    def _autocast_context(self):
        precision = self.train_config.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if precision == "bf16":
            return lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext

    def _val_records(self, train_report: LoadReport) -> list[Record]:
        try:
            records, _ = load_records(self.data, split="val")
        except DataError:
            records = []
        train_images = {str(r.image) for r in self.train_records}
        if records and not {str(r.image) for r in records} <= train_images:
            return records
        if records:
            log.info("the val split of %s is the training data itself: holding out records instead", self.data)
        # No separate val split: hold out every 20th training image (all its records), deterministically.
        held_images = set(sorted(train_images)[::20])
        held = [r for r in self.train_records if str(r.image) in held_images]
        if held:
            self.train_records = [r for r in self.train_records if str(r.image) not in held_images]
            train_report.kept -= len(held)
        log.info("no val split in %s: held out %d training records", self.data, len(held))
        return held

    def _tokenizer(self, resume_from: Checkpoint | None, init: Path | None, config: ModelConfig) -> Tokenizer:
        if resume_from is not None:
            return resume_from.tokenizer()
        if init is not None:
            return load_checkpoint(init).tokenizer()
        if self.loaded_lm is not None:
            return self.loaded_lm.tokenizer
        template = config.prompt
        texts = [template.system, template.user, template.assistant]
        texts += [template.answer_prefix + t.answer for r in self.train_records for t in r.turns]
        texts += [t.question for r in self.train_records for t in r.turns]
        return Tokenizer.train(texts, vocab_size=config.tokenizer_vocab_size)

    def _load_init(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        try:
            self.model.load_state_dict(checkpoint.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(f"--init {path} does not fit this model config: {exc}") from None
        log.info("initialised weights from %s", path)

    # ------------------------------------------------------------------ the loop

    def progress(self, step: int, elapsed: float) -> float:
        by_steps = step / self.train_config.max_steps
        by_time = elapsed / self.budget if self.budget else 0.0
        return max(by_steps, by_time)

    def _stage_index(self, progress: float) -> int:
        for index, (_, end) in enumerate(self.bounds):
            if progress < end:
                return index
        return len(self.bounds) - 1

    def _prepare_stage(self, index: int):
        stage = self.stages[index]
        groups = self.model.parameter_groups()
        for name, params in groups.items():
            for p in params:
                p.requires_grad_(name in stage.trainable)
        records = filter_tasks(self.train_records, stage.tasks)
        if not records:
            raise DataError(f"stage {stage.name!r} has no training data for tasks {stage.tasks}")
        dataset = ConversationDataset(
            records, self.train_images, self.tokenizer, self.model_config.prompt, self.model.num_image_tokens,
            self.train_config.max_seq_len, self.train_report, self.train_config.turns_per_example,
        )
        base_lr = stage.lr or self.train_config.lr
        vision_scale = (self.train_config.vision_lr or base_lr) / self.train_config.lr if stage.lr is None else 1.0
        param_groups = []
        for names, scale in ((("vision", "projector"), vision_scale), (("language",), 1.0)):
            params = [p for name in names for p in groups[name] if p.requires_grad]
            for decay in (True, False):
                chosen = [p for p in params if (p.dim() >= 2) == decay]
                if chosen:
                    param_groups.append({"params": chosen, "lr_scale": scale,
                                         "weight_decay": self.train_config.weight_decay if decay else 0.0})
        optimizer = torch.optim.AdamW(param_groups, lr=base_lr, betas=self.train_config.betas)
        wrapped = self.model
        if self.world > 1:
            wrapped = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.features = self._frozen_features(stage)
        order = BatchOrder(len(dataset), self.train_config.batch_size, self.train_config.seed, self.world, self.rank)
        log.info("stage %s: %d examples, training %s", stage.name, len(dataset), ", ".join(stage.trainable))
        return stage, dataset, optimizer, wrapped, order

    def _frozen_features(self, stage: StageConfig) -> FrozenFeatures | None:
        """The projected visual tokens of every training image, when this stage trains neither the
        vision encoder nor the projector: computed once, they replace the encoder's work at every step.

        Kept across consecutive frozen stages and recomputed after a stage that trained the encoder
        (``self.features`` is None then). Not used under DDP (gradients are synchronised through the
        wrapped model's forward) or over the memory cap.
        """
        if self.world > 1 or {"vision", "projector"} & set(stage.trainable):
            return None
        if self.features is not None:
            return self.features  # nothing has trained the encoder since they were computed
        keys = sorted(self.train_images)
        needed = len(keys) * self.model.num_image_tokens * self.model_config.language.hidden * 4
        if needed > FEATURE_CACHE_LIMIT_BYTES:
            log.info("frozen visual tokens need %.1f GiB, over the %.0f GiB cap: encoding images at every step",
                     needed / 2**30, FEATURE_CACHE_LIMIT_BYTES / 2**30)
            return None
        started = time.monotonic()
        with self.autocast():
            tokens = project_images(self.model, self.train_images, keys, self.model_config.preprocess, self.device)
        log.info("stage %s: visual tokens of %d frozen-encoder images computed once in %.1f s", stage.name,
                 len(keys), time.monotonic() - started)
        return FrozenFeatures(keys, tokens)

    def run(self) -> TrainResult:
        config = self.train_config
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_run_info()
        metrics_path = self.run_dir / "metrics.jsonl"
        rows = self._read_metrics(metrics_path) if self.resume_from is not None else []
        if self.rank == 0:
            self._rewrite_metrics(metrics_path, rows)
        state = self.state
        started = time.monotonic() - state.elapsed
        stage_index = state.stage_index
        stage, dataset, optimizer, wrapped, order = self._prepare_stage(stage_index)
        if self.resume_from is not None and self.resume_from.train_state.get("optimizer"):
            optimizer.load_state_dict(self.resume_from.train_state["optimizer"])
        self.on_event(TrainEvent("start", state.step, config.max_steps, {"stage": stage.name, "examples": len(dataset)}))
        window_start, window_samples = time.monotonic(), 0
        last_eval: dict[str, Any] = {}
        between_steps = True
        with _deferred_interrupt() as interrupt:
            try:
                while self.progress(state.step, time.monotonic() - started) < 1.0:
                    if interrupt.requested:
                        raise KeyboardInterrupt
                    progress = self.progress(state.step, time.monotonic() - started)
                    wanted = self._stage_index(progress)
                    if wanted != stage_index:
                        stage_index, state.stage_index, state.stage_start_step = wanted, wanted, state.step
                        stage, dataset, optimizer, wrapped, order = self._prepare_stage(stage_index)
                        self.on_event(TrainEvent("stage", state.step, config.max_steps, {"stage": stage.name}))
                    start, end = self.bounds[stage_index]
                    local_progress = (progress - start) / (end - start)
                    lr = learning_rate(stage.lr or config.lr, state.step - state.stage_start_step,
                                       config.warmup_steps, local_progress, config.min_lr_ratio)
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group["lr_scale"]
                    between_steps = False
                    loss = self._train_step(wrapped, dataset, optimizer, order, state)
                    state.step += 1
                    between_steps = True
                    window_samples += config.batch_size * config.grad_accum * self.world
                    if state.step % config.log_every == 0 or state.step == 1:
                        now = time.monotonic()
                        row = {"kind": "train", "step": state.step, "stage": stage.name, "loss": loss, "lr": lr,
                               "epoch": round(order.epoch_of((state.step - state.stage_start_step) * config.grad_accum), 4),
                               "samples_per_s": window_samples / max(now - window_start, 1e-9),
                               "elapsed_s": now - started}
                        window_start, window_samples = now, 0
                        self._log_row(metrics_path, rows, row)
                        self.on_event(TrainEvent("step", state.step, config.max_steps, row))
                    finished = self.progress(state.step, time.monotonic() - started) >= 1.0
                    if state.step % config.eval_every == 0 or finished:
                        state.elapsed = time.monotonic() - started
                        last_eval = self._evaluate_and_save(metrics_path, rows, optimizer, stage)
                        self.on_event(TrainEvent("eval", state.step, config.max_steps, last_eval))
            except KeyboardInterrupt:
                state.elapsed = time.monotonic() - started
                if self.rank == 0 and between_steps:  # weights and optimizer agree: a clean point to resume from
                    self._save_last(optimizer)
                    plot_curves(rows, self.run_dir / "curves.png")
                    log.warning("interrupted at step %d; resume with --resume", state.step)
                raise
        state.elapsed = time.monotonic() - started
        if self.rank == 0:
            plot_curves(rows, self.run_dir / "curves.png")
        self.on_event(TrainEvent("end", state.step, config.max_steps, last_eval))
        if dist.is_initialized():
            dist.barrier()
        return TrainResult(self.run_dir, self.run_dir / "ckpt.pt", self.run_dir / "last.pt", state.step,
                           state.elapsed, last_eval)

    def _train_step(self, wrapped, dataset, optimizer, order: BatchOrder, state: RunState) -> float:
        config = self.train_config
        wrapped.train()
        frozen_vision = not any(p.requires_grad for p in self.model.vision.parameters())
        if frozen_vision:
            self.model.vision.eval()  # frozen pretrained BatchNorm keeps its statistics
        torch.manual_seed(config.seed * 1_000_003 + state.step * self.world + self.rank)
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        local_step = state.step - state.stage_start_step
        for micro in range(config.grad_accum):
            indices = order.indices(local_step * config.grad_accum + micro)
            examples = [dataset[i] for i in indices]
            sync = micro == config.grad_accum - 1 or self.world == 1
            context = nullcontext() if sync else wrapped.no_sync()
            with context, self.autocast():
                if self.world == 1:
                    loss = self._batch_loss(examples)
                else:
                    batch = collate(examples, self.model_config.preprocess, self.tokenizer.pad_id)
                    loss = wrapped(**{k: v.to(self.device) for k, v in batch.items()}).loss
            loss = loss / config.grad_accum
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss at step {state.step + 1}; stopped, the last good checkpoint is kept "
                    f"at {self.run_dir / 'last.pt'} (lower the learning rate or check the data)"
                )
            with context:
                loss.backward()
            total += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                   config.grad_clip)
        if not torch.isfinite(grad_norm):
            raise TrainingError(f"non-finite gradient at step {state.step + 1}; the last good checkpoint is kept")
        optimizer.step()
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        return float(total)

    def _batch_loss(self, examples: list) -> torch.Tensor:
        """The batch's loss (mean over its answer tokens), computed on pieces of similar length.

        A batch is padded to its longest example, so a few long answers (detailed descriptions)
        among short questions multiply the language model's work. The images are encoded as one
        batch (BatchNorm sees all of them), or read from the frozen-feature cache; the language
        model runs once per piece; each piece's token mean is weighted by its share of the batch's
        answer tokens, so the loss and its gradient are those of the whole padded batch.
        """
        spec, pad = self.model_config.preprocess, self.tokenizer.pad_id
        pieces = [list(range(len(examples)))]
        if self.train_config.split_by_length:
            pieces = length_pieces([len(e.input_ids) - 1 + self.model.num_image_tokens for e in examples])
        if len(pieces) == 1 and self.features is None:
            batch = collate(examples, spec, pad)
            return self.model(**{k: v.to(self.device) for k, v in batch.items()}).loss
        if self.features is not None:
            image_embeds = self.model.place_visual_tokens(self.features.lookup([e.image for e in examples]))
        else:
            pixels = torch.stack([e.pixels for e in examples])
            image_embeds = self.model.encode_images(normalize(pixels, spec).to(self.device))
        return pieces_loss(self.model, examples, image_embeds, pieces, pad)

    @torch.no_grad()
    def _val_loss(self) -> float:
        self.model.eval()
        losses, weights = [], []
        examples = self.val_loss_set.examples
        for start in range(0, len(examples), 32):
            batch = collate(examples[start:start + 32], self.model_config.preprocess, self.tokenizer.pad_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.autocast():
                out = self.model(**batch)
            count = int((out.labels[:, 1:] != -100).sum())
            losses.append(float(out.loss) * count)
            weights.append(count)
        self.model.train()
        return sum(losses) / max(sum(weights), 1)

    def _evaluate_and_save(self, metrics_path: Path, rows: list[dict], optimizer, stage: StageConfig) -> dict:
        result: dict[str, Any] = {}
        if self.rank == 0:
            result = {"kind": "eval", "step": self.state.step, "stage": stage.name, "val_loss": self._val_loss()}
            if not math.isfinite(result["val_loss"]):
                raise TrainingError(
                    f"non-finite validation loss at step {self.state.step}; stopped without saving, the last good "
                    f"checkpoint is kept at {self.run_dir / 'last.pt'} (lower the learning rate)"
                )
            if self.train_config.eval_samples > 0:
                report = evaluate(self.model, self.tokenizer, self.model_config, self.val_records,
                                  limit=self.train_config.eval_samples, images=self.val_images)
                result.update(accuracy=report.accuracy, bleu4=report.bleu4, cider=report.cider)
                metric = report.accuracy.get("overall", 0.0)
            else:
                metric = -result["val_loss"]
            self._log_row(metrics_path, rows, result)
            if metric > self.state.best_metric:
                self.state.best_metric = metric
                self._save(self.run_dir / "ckpt.pt", optimizer=None, metrics=result)
            self._save_last(optimizer, metrics=result)
        if dist.is_initialized():
            dist.barrier()
        return result

    # ------------------------------------------------------------------ files

    def _save(self, path: Path, optimizer, metrics: dict | None = None) -> None:
        train_state = {"run": vars(self.state).copy(), "budget": self.budget, "only_stage": self.only_stage,
                       "freeze": list(self.freeze), "lora": pretrained_lm.lora_record(self.model, self.lora)}
        if optimizer is not None:
            train_state["optimizer"] = optimizer.state_dict()
        save_checkpoint(path, Checkpoint(
            model_config=self.model_config,
            tokenizer_json=self.tokenizer.to_json(),
            state_dict=pretrained_lm.saved_weights(self.model),
            train_config=self.train_config,
            train_state=train_state,
            metrics=metrics or {},
        ))

    def _save_last(self, optimizer, metrics: dict | None = None) -> None:
        self._save(self.run_dir / "last.pt", optimizer, metrics)

    def _write_run_info(self) -> None:
        info = {
            "model_config": to_dict(self.model_config),
            "train_config": to_dict(self.train_config),
            "stages": [to_dict(s) for s in self.stages],
            "data": str(self.data),
            "train_records": len(self.train_records),
            "val_records": len(self.val_records),
            "data_report": self.train_report.summary(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "image_tokens": self.model.num_image_tokens,
            "world_size": self.world,
            "device": str(self.device),
        }
        (self.run_dir / "run.json").write_text(json.dumps(info, indent=2))

    def _read_metrics(self, path: Path) -> list[dict]:
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if r.get("step", 0) <= self.state.step]

    @staticmethod
    def _rewrite_metrics(path: Path, rows: list[dict]) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def _log_row(self, path: Path, rows: list[dict], row: dict) -> None:
        rows.append(row)
        if self.rank == 0:
            with path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


@torch.no_grad()
def project_images(model: VisionLanguageModel, images: dict[str, torch.Tensor], keys: list[str],
                   spec, device: torch.device | str = "cpu", chunk: int = 256) -> torch.Tensor:
    """Projected visual tokens [len(keys), tokens, hidden] of cached uint8 images, in eval mode
    (a frozen encoder's BatchNorm statistics, as at every frozen step)."""
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(keys), chunk):
        pixels = normalize(torch.stack([images[k] for k in keys[start:start + chunk]]), spec)
        chunks.append(model.projector(model.vision(pixels.to(device))).float())
    model.train(was_training)
    return torch.cat(chunks)


def pieces_loss(model: VisionLanguageModel, examples: list, image_embeds: torch.Tensor, pieces: list[list[int]],
                pad_id: int) -> torch.Tensor:
    """A batch's mean answer-token loss, the language model run once per piece of ``examples``.

    Each piece's token mean is weighted by its share of the batch's answer tokens, so the loss
    and its gradient are those of the whole padded batch.
    """
    device = image_embeds.device
    counts = [sum(sum(label != IGNORE_INDEX for label in examples[i].labels) for i in piece) for piece in pieces]
    total = torch.zeros((), device=device)
    for piece, count in zip(pieces, counts):
        if count == 0:
            continue
        batch = collate_text([examples[i] for i in piece], pad_id)
        merged = model.merge(batch["input_ids"].to(device), image_embeds[piece],
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


class _deferred_interrupt:
    """The first Ctrl-C asks training to stop after the current step (so last.pt is consistent);
    a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step (Ctrl-C again to stop now)")

    def __enter__(self) -> "_deferred_interrupt":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def train(data: Path, run_dir: Path, model_config: ModelConfig, train_config: TrainConfig, **kwargs) -> TrainResult:
    """Build a Trainer and run it; see Trainer for the options."""
    return Trainer(data, run_dir, model_config, train_config, **kwargs).run()
