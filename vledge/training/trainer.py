"""The training loop: two-stage visual instruction tuning (align, then instruct), exact resume, DDP.

The batch order and the dropout seed of every step are pure functions of the step
number, and the learning rate is a function of progress, so a run interrupted and
resumed from ``last.pt`` continues exactly where it stopped. ``setup`` prepares the run,
``stage`` each stage, ``run_files`` writes the run folder.
"""

from __future__ import annotations

import logging
import math
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

from vledge.config import ModelConfig, StageConfig, TrainConfig
from vledge.data.dataset import batch_pixels, collate
from vledge.errors import TrainingError
from vledge.evaluation import evaluate
from vledge.models.vlm import IGNORE_INDEX
from vledge.training.plot import plot_curves
from vledge.training.run_files import (
    append_metrics,
    read_metrics,
    rewrite_metrics,
    save_run_checkpoint,
    write_run_info,
)
from vledge.training.run_options import RunOptions, RunState, improves
from vledge.training.schedule import learning_rate
from vledge.training.setup import PreparedRun, prepare_run, stage_plan
from vledge.training.stage import (
    FrozenFeatures,
    StageSetup,
    frozen_features,
    length_pieces,
    pieces_loss,
    prepare_stage,
    project_images,
)

log = logging.getLogger(__name__)

__all__ = ["PreparedRun", "RunOptions", "RunState", "TrainEvent", "TrainResult", "Trainer", "length_pieces",
           "pieces_loss", "prepare_run", "project_images", "stage_plan", "train"]


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
    seconds: float  # training time of the whole run, earlier runs resumed from included
    final_eval: dict[str, Any]
    best_step: int = 0  # the step ckpt.pt holds
    planned_steps: int = 0  # the config's max_steps
    budget_minutes: float | None = None  # the wall-time budget it ran under
    start_step: int = 0  # where this call started (last.pt's step on resume)

    @property
    def cut_short(self) -> bool:
        """The budget stopped the run before its planned steps."""
        return 0 < self.steps < self.planned_steps


class Trainer:
    """Runs a prepared run: the loop, evaluation and checkpoints. Its own state is where the run
    stands (``state``) and the frozen-feature cache of the current stage (``features``)."""

    def __init__(self, prepared: PreparedRun, on_event: Callable[[TrainEvent], None] | None = None) -> None:
        self.prepared = prepared
        self.on_event = on_event or (lambda event: None)
        self.state = replace(prepared.start)
        self.features: FrozenFeatures | None = None
        # Read at every step; named here for brevity.
        self.model, self.tokenizer = prepared.model, prepared.tokenizer
        self.model_config, self.train_config = prepared.model_config, prepared.train_config
        self.rank, self.world, self.device = prepared.rank, prepared.world, prepared.device
        self.autocast = prepared.autocast

    # ------------------------------------------------------------------ the loop

    def progress(self, step: int, elapsed: float) -> float:
        by_steps = step / self.train_config.max_steps
        budget = self.prepared.budget_seconds
        by_time = elapsed / budget if budget else 0.0
        return max(by_steps, by_time)

    def _stage_index(self, progress: float) -> int:
        for index, (_, end) in enumerate(self.prepared.bounds):
            if progress < end:
                return index
        return len(self.prepared.bounds) - 1

    def _prepare_stage(self, index: int) -> StageSetup:
        """Stage ``index``'s setup; the frozen-feature cache follows (kept, computed or dropped)."""
        setup = prepare_stage(self.prepared, index)
        self.features = frozen_features(self.prepared, setup.stage, self.features)
        return setup

    def run(self) -> TrainResult:
        config = self.train_config
        run_dir = self.prepared.run_dir
        if self.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_run_info(self.prepared)
        metrics_path = run_dir / "metrics.jsonl"
        rows = read_metrics(metrics_path, self.state.step) if self.prepared.resumed else []
        if self.rank == 0:
            rewrite_metrics(metrics_path, rows)
        state = self.state
        stage_index = state.stage_index
        setup = self._prepare_stage(stage_index)
        if self.prepared.optimizer_state:
            setup.optimizer.load_state_dict(self.prepared.optimizer_state)
        started = time.monotonic() - state.elapsed  # the clock starts now: setting a stage up is not training
        self.on_event(TrainEvent("start", state.step, config.max_steps,
                                 {"stage": setup.stage.name, "examples": len(setup.dataset)}))
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
                        paused = time.monotonic()
                        setup = self._prepare_stage(stage_index)
                        started += time.monotonic() - paused  # its dataset and feature cache: off the clock
                        self.on_event(TrainEvent("stage", state.step, config.max_steps, {"stage": setup.stage.name}))
                    start, end = self.prepared.bounds[stage_index]
                    local_progress = (progress - start) / (end - start)
                    lr = learning_rate(setup.stage.lr or config.lr, state.step - state.stage_start_step,
                                       config.warmup_steps, local_progress, config.min_lr_ratio)
                    for group in setup.optimizer.param_groups:
                        group["lr"] = lr * group["lr_scale"]
                    between_steps = False
                    loss = self._train_step(setup, state)
                    state.step += 1
                    between_steps = True
                    window_samples += config.batch_size * config.grad_accum * self.world
                    if state.step % config.log_every == 0 or state.step == 1:
                        now = time.monotonic()
                        local_micro_steps = (state.step - state.stage_start_step) * config.grad_accum
                        row = {"kind": "train", "step": state.step, "stage": setup.stage.name, "loss": loss, "lr": lr,
                               "epoch": round(setup.order.epoch_of(local_micro_steps), 4),
                               "samples_per_s": window_samples / max(now - window_start, 1e-9),
                               "elapsed_s": now - started}
                        window_start, window_samples = now, 0
                        self._log_row(metrics_path, rows, row)
                        self.on_event(TrainEvent("step", state.step, config.max_steps, row))
                    finished = self.progress(state.step, time.monotonic() - started) >= 1.0
                    if state.step % config.eval_every == 0 or finished:
                        state.elapsed = time.monotonic() - started
                        last_eval = self._evaluate_and_save(metrics_path, rows, setup.optimizer, setup.stage)
                        self.on_event(TrainEvent("eval", state.step, config.max_steps, last_eval))
            except KeyboardInterrupt:
                state.elapsed = time.monotonic() - started
                if self.rank == 0 and between_steps:  # weights and optimizer agree: a clean point to resume from
                    save_run_checkpoint(run_dir / "last.pt", self.prepared, state, setup.optimizer)
                    plot_curves(rows, run_dir / "curves.png")
                    log.warning("interrupted at step %d; resume with --resume", state.step)
                raise
        state.elapsed = time.monotonic() - started
        if self.rank == 0:
            plot_curves(rows, run_dir / "curves.png")
        self.on_event(TrainEvent("end", state.step, config.max_steps, last_eval))
        if dist.is_initialized():
            dist.barrier()
        return TrainResult(run_dir, run_dir / "ckpt.pt", run_dir / "last.pt", state.step,
                           state.elapsed, last_eval, state.best_step, config.max_steps,
                           self.prepared.options.minutes, self.prepared.start.step)

    def _train_step(self, setup: StageSetup, state: RunState) -> float:
        config, wrapped, optimizer = self.train_config, setup.model, setup.optimizer
        wrapped.train()
        frozen_vision = not any(p.requires_grad for p in self.model.vision.parameters())
        if frozen_vision:
            self.model.vision.eval()  # frozen pretrained BatchNorm keeps its statistics
        torch.manual_seed(config.seed * 1_000_003 + state.step * self.world + self.rank)
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        local_step = state.step - state.stage_start_step
        for micro in range(config.grad_accum):
            indices = setup.order.indices(local_step * config.grad_accum + micro)
            examples = [setup.dataset[i] for i in indices]
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
                    f"at {self.prepared.run_dir / 'last.pt'} (lower the learning rate or check the data)"
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
            pieces = length_pieces([e.positions(self.model.num_image_tokens) for e in examples])
        if len(pieces) == 1 and self.features is None:
            batch = collate(examples, spec, pad)
            return self.model(**{k: v.to(self.device) for k, v in batch.items()}).loss
        if self.features is not None:
            image_embeds = self.model.place_visual_tokens(self.features.lookup([e.image for e in examples]))
        else:
            image_embeds = self.model.encode_images(batch_pixels(examples, spec).to(self.device))
        return pieces_loss(self.model, examples, image_embeds, pieces, pad)

    @torch.no_grad()
    def _val_loss(self) -> float:
        self.model.eval()
        losses, weights = [], []
        examples = self.prepared.val_loss_set.examples
        for start in range(0, len(examples), 32):
            batch = collate(examples[start:start + 32], self.model_config.preprocess, self.tokenizer.pad_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.autocast():
                out = self.model(**batch)
            count = int((out.labels[:, 1:] != IGNORE_INDEX).sum())
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
                    f"checkpoint is kept at {self.prepared.run_dir / 'last.pt'} (lower the learning rate)"
                )
            if self.train_config.eval_samples > 0:
                report = evaluate(self.model, self.tokenizer, self.model_config, list(self.prepared.val_records),
                                  limit=self.train_config.eval_samples, images=self.prepared.val_images)
                result.update(accuracy=report.accuracy, bleu4=report.bleu4, cider=report.cider)
                metric = report.accuracy.get("overall", 0.0)
            else:
                metric = -result["val_loss"]
            if improves(self.state, metric, result["val_loss"]):
                self.state.best_metric, self.state.best_val_loss = metric, result["val_loss"]
                self.state.best_step = self.state.step
                save_run_checkpoint(self.prepared.run_dir / "ckpt.pt", self.prepared, self.state, metrics=result)
            result["ckpt_step"] = self.state.best_step
            log.info("ckpt.pt holds step %d", self.state.best_step)
            self._log_row(metrics_path, rows, result)
            save_run_checkpoint(self.prepared.run_dir / "last.pt", self.prepared, self.state, optimizer, result)
        if dist.is_initialized():
            dist.barrier()
        return result

    def _log_row(self, path: Path, rows: list[dict], row: dict) -> None:
        rows.append(row)
        if self.rank == 0:
            append_metrics(path, row)


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


def train(data: Path, run_dir: Path, model_config: ModelConfig, train_config: TrainConfig,
          options: RunOptions = RunOptions(), resume: bool = False,
          on_event: Callable[[TrainEvent], None] | None = None) -> TrainResult:
    """Prepare a run (``resume``: from ``run_dir/last.pt``) and train it."""
    return Trainer(prepare_run(data, run_dir, model_config, train_config, options, resume), on_event).run()
