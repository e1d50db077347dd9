"""``vledge quickstart``: the whole toolkit on the built-in data, from nothing to a benchmarked edge model.

Steps, each a plain call into the library: generate synthetic data, pretrain the
vision encoder and projector on the scenes' own per-cell labels, train the
language side (both stages), evaluate on the held-out split, export with quantized
variants behind the parity gate, benchmark against the PyTorch original, caption
a few held-out images with the torch-free runtime, and render an annotated demo
video from the synthetic source. Every artifact lands under one folder and the
summary says where.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vledge.config import MAX_STEPS, PRESETS
from vledge.errors import ConfigError
from vledge.files import check_output_dir, write_json, write_text
from vledge.threads import default_threads
from vledge.training.budget import cut_short_lines, finish_minutes, resume_command

log = logging.getLogger(__name__)

STRUCTURED_TASKS = ("count", "color", "shape", "position")


@dataclass(frozen=True)
class QuickstartConfig:
    out: Path = Path("quickstart")
    preset: str = "small"
    size: int = 20000  # synthetic images
    minutes: float | None = 12.0  # training wall-time budget (None: the preset's steps)
    max_steps: int | None = None
    # Per-cell supervised pretraining of the vision encoder + projector on the synthetic scenes
    # (vledge.training.vision_pretrain); both are then frozen while the language model trains. 0: skip.
    vision_pretrain_steps: int = 300
    # Learning rate when only the language model trains (frozen pretrained vision): it tolerates a
    # higher rate than end-to-end training (measured: 1.5e-3 beats 5e-4 and 3e-3 at equal steps).
    language_lr: float = 1.5e-3
    seed: int = 0
    threads: int | None = None  # torch and runtime threads; None: all cores
    eval_limit: int | None = None  # held-out questions (None: all)
    parity_samples: int = 256
    bench_repeats: int = 10
    bench_parity_samples: int = 200
    captions: int = 6
    demo_frames: int = 90
    force: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:  # now, not after minutes of generating data
            raise ConfigError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        if self.size < 50:
            raise ConfigError(f"quickstart needs at least 50 synthetic images, got {self.size}")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise ConfigError(f"minutes must be a positive finite number, got {self.minutes}")
        if self.max_steps is not None and not 1 <= self.max_steps <= MAX_STEPS:
            raise ConfigError(f"max_steps must be in 1..{MAX_STEPS:,}, got {self.max_steps}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")


@dataclass
class QuickstartSummary:
    out: Path
    seconds: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)  # PyTorch, held-out test split
    structured_accuracy: float = 0.0
    parity: dict[str, dict] = field(default_factory=dict)  # export parity per variant (short form)
    latency: list[dict] = field(default_factory=list)  # bench rows: engine, threads, caption ms, ratio
    captions: list[dict] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)
    train_steps: int = 0  # optimizer steps reached
    planned_steps: int = 0  # the preset's (or --max-steps) steps
    budget_minutes: float | None = None
    # Commands that finish a run the time budget cut short (train on, then evaluate and export again).
    finish_commands: list[str] = field(default_factory=list)

    @property
    def cut_short(self) -> bool:
        return 0 < self.train_steps < self.planned_steps

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        data["cut_short"] = self.cut_short
        return data

    def cut_short_warning(self, where: str = "below") -> list[str]:
        """The loud lines that say the numbers are not the product's, and how to get those; ``where``
        the accuracy stands from them ("below" at the top of the summary, "above" at its end)."""
        return cut_short_lines(self.train_steps, self.planned_steps, self.budget_minutes,
                               f"The accuracy {where} is that of an undertrained model, not what this preset "
                               "reaches (a busy or slow machine trains fewer steps in the same minutes).",
                               self.finish_commands)

    def describe(self) -> str:
        lines = self.cut_short_warning()
        lines += [f"held-out accuracy (PyTorch, exact match): structured {100 * self.structured_accuracy:.1f}% — "
                 + ", ".join(f"{t} {100 * self.accuracy[t]:.1f}%" for t in STRUCTURED_TASKS if t in self.accuracy)]
        if self.parity:
            lines.append("export parity (token agreement with PyTorch, accuracy Δ points):")
            lines += [f"  {label:<28} {p['token_agreement']:6.1%}  {p['accuracy_delta']:+.1f}"
                      for label, p in self.parity.items()]
        if self.latency:
            lines.append("caption latency (median ms, speed-up vs PyTorch at equal threads):")
            lines += [f"  {row['engine']:<16} {row['threads']} thread(s)  {row['caption_ms']:8.2f} ms  "
                      f"{row['ratio']:.2f}×" for row in self.latency]
        if self.captions:
            lines.append("captions of held-out images (runtime):")
            lines += [f"  {Path(c['image']).name}: {c['caption']!r} (truth: {c['reference']!r})" for c in self.captions]
        lines.append("artifacts:")
        lines += [f"  {name:<10} {path}" for name, path in self.artifacts.items()]
        lines.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()))
        lines += self.cut_short_warning("above")  # again at the end, where the eye lands
        return "\n".join(lines)


Progress = Callable[[str], None]


def run_quickstart(config: QuickstartConfig, progress: Progress | None = None,
                   on_train_event: Callable | None = None) -> QuickstartSummary:
    say = progress or (lambda message: log.info("%s", message))
    out = Path(config.out)
    check_output_dir(out, "quickstart folder")
    if out.exists() and any(out.iterdir()) and not config.force:
        raise ConfigError(f"{out} already exists and is not empty; pass --force to reuse it")
    out.mkdir(parents=True, exist_ok=True)
    threads = config.threads or default_threads()
    if not config.threads:
        say(f"using {threads} thread(s) of {os.cpu_count() or 1} cores (the ones other processes leave free)")
    summary = QuickstartSummary(out=out)
    started = time.perf_counter()

    def timed(name: str, call):
        tick = time.perf_counter()
        value = call()
        summary.seconds[name] = time.perf_counter() - tick
        return value

    data = out / "data"
    say(f"1/8 generating {config.size} synthetic scenes -> {data}")
    timed("data", lambda: _synth(config, data))
    summary.artifacts["data"] = str(data)

    vision_weights = None
    if config.vision_pretrain_steps:
        vision_weights = out / "vision.pt"
        say(f"2/8 pretraining the vision encoder on per-cell scene labels -> {vision_weights}")
        timed("vision", lambda: _pretrain_vision(config, data, vision_weights, threads))
        summary.artifacts["vision"] = str(vision_weights)
    else:
        say("2/8 vision pretraining skipped")

    run_dir = out / "run"
    say(f"3/8 training the {config.preset} preset -> {run_dir}")
    result, planned = timed("train", lambda: _train(config, data, run_dir, threads, on_train_event, vision_weights))
    ckpt = result.best_checkpoint
    summary.artifacts["checkpoint"] = str(ckpt)
    summary.train_steps, summary.planned_steps, summary.budget_minutes = result.steps, planned, config.minutes
    if summary.cut_short:
        summary.finish_commands = finish_commands(result, planned, data, run_dir, out / "model")
        for line in summary.cut_short_warning():
            say(line)

    say("4/8 evaluating on the held-out test split")
    report = timed("eval", lambda: _evaluate(config, ckpt, data, threads))
    summary.accuracy = report.accuracy
    summary.structured_accuracy = structured_accuracy(report.accuracy, report.counts)
    write_json(out / "eval.json", report.to_dict(examples=20), indent=2)
    summary.artifacts["eval"] = str(out / "eval.json")

    model_dir = out / "model"
    say(f"5/8 exporting to ONNX with quantized variants -> {model_dir}")
    exported = timed("export", lambda: _export(config, ckpt, data, model_dir, say))
    summary.parity = {label: {"token_agreement": p.generation.token_agreement, "accuracy_delta": p.accuracy_delta,
                              "logits_max_abs": p.prefill_logits.max_abs}
                      for label, p in exported.parity.items()}
    summary.artifacts["model"] = str(model_dir)

    bench_dir = out / "bench"
    say(f"6/8 benchmarking against the PyTorch original -> {bench_dir}")
    bench = timed("bench", lambda: _bench(config, ckpt, model_dir, data, bench_dir, threads))
    summary.latency = [{"engine": row["engine"], "threads": row["threads"],
                        "caption_ms": row["stages"]["caption_ms"]["median"],
                        "ratio": row["ratio_to_pytorch"]["caption_ms"]} for row in bench["latency"]]
    summary.artifacts["bench"] = str(bench_dir / "bench.md")

    say("7/8 captioning held-out images with the torch-free runtime")
    summary.captions = timed("captions", lambda: _captions(config, model_dir, data, threads))
    write_text(out / "captions.jsonl", "".join(json.dumps(c) + "\n" for c in summary.captions))
    summary.artifacts["captions"] = str(out / "captions.jsonl")

    video = out / "demo.mp4"
    say(f"8/8 rendering an annotated demo video from the synthetic source -> {video}")
    timed("demo", lambda: _demo(config, model_dir, video, out / "demo.jsonl", threads))
    summary.artifacts["demo"] = str(video)

    summary.seconds["total"] = time.perf_counter() - started
    write_json(out / "summary.json", summary.to_dict(), indent=2)
    write_text(out / "summary.md", "```\n" + summary.describe() + "\n```\n")
    summary.artifacts["summary"] = str(out / "summary.md")
    return summary


def structured_accuracy(accuracy: dict[str, float], counts: dict[str, int]) -> float:
    """Exact match pooled over the structured tasks (questions with one short, checkable answer)."""
    tasks = [t for t in STRUCTURED_TASKS if t in accuracy and counts.get(t)]
    total = sum(counts[t] for t in tasks)
    return sum(accuracy[t] * counts[t] for t in tasks) / total if total else 0.0


def _synth(config: QuickstartConfig, data: Path) -> None:
    from vledge.data.synth import SynthOptions, generate_dataset

    generate_dataset(data, SynthOptions(size=config.size, seed=config.seed), overwrite=True)


def _pretrain_vision(config: QuickstartConfig, data: Path, weights: Path, threads: int) -> None:
    from vledge.config import preset
    from vledge.training.vision_pretrain import VisionPretrainConfig, pretrain_vision

    model_config, _ = preset(config.preset)
    pretrain_vision(data, weights, model_config,
                    VisionPretrainConfig(steps=config.vision_pretrain_steps, seed=config.seed, threads=threads))


def _train(config: QuickstartConfig, data: Path, run_dir: Path, threads: int, on_event, vision_weights=None):
    from vledge.config import preset
    from vledge.training.trainer import RunOptions, train

    model_config, train_config = preset(config.preset)
    overrides = {"seed": config.seed, "threads": threads}
    if config.max_steps is not None:
        overrides["max_steps"] = config.max_steps
    if vision_weights is not None:
        overrides["lr"] = config.language_lr
    train_config = dataclasses.replace(train_config, **overrides)
    frozen = ("vision", "projector") if vision_weights is not None else ()
    options = RunOptions(minutes=config.minutes, vision_weights=vision_weights, freeze=frozen)
    return train(data, run_dir, model_config, train_config, options, on_event=on_event), train_config.max_steps


def budget_eta(step: int, planned: int, elapsed_s: float, budget_s: float) -> str:
    """Progress against the time budget: when it ends, and where the steps will be by then at this pace."""
    left = max(0.0, budget_s - elapsed_s)
    reach = min(planned, int(step + left * step / max(elapsed_s, 1e-9)))
    text = f"budget left {int(left // 60)}:{int(left % 60):02d}, at this pace step ~{reach:,} of {planned:,}"
    return text + (" (cut short!)" if reach < planned else "")


def finish_commands(result, planned: int, data: Path, run_dir: Path, model_dir: Path) -> list[str]:
    """Resume with a budget that covers the missing steps at the pace measured (+25%), then re-evaluate."""
    minutes = finish_minutes(result.seconds, result.steps, planned)
    return [resume_command(data, run_dir, minutes),
            f"vledge eval --ckpt {run_dir / 'ckpt.pt'} --data {data} --split test",
            f"vledge export {run_dir / 'ckpt.pt'} -o {model_dir} --calibration-data {data} --force"]


def _evaluate(config: QuickstartConfig, ckpt: Path, data: Path, threads: int):
    import torch

    from vledge.checkpoint import load_checkpoint
    from vledge.data.loaders import load_records
    from vledge.evaluation import evaluate

    torch.set_num_threads(threads)
    checkpoint = load_checkpoint(ckpt)
    records, _ = load_records(data, split="test")
    return evaluate(checkpoint.build_model(), checkpoint.tokenizer(), checkpoint.model_config, records,
                    limit=config.eval_limit)


def _export(config: QuickstartConfig, ckpt: Path, data: Path, model_dir: Path, say: Progress):
    from vledge.export import ExportOptions, export

    options = ExportOptions(quantize=("auto",), data=data, parity_samples=config.parity_samples, force=True)
    return export(ckpt, model_dir, options, progress=lambda message: say(f"    export: {message}"))


def _bench(config: QuickstartConfig, ckpt: Path, model_dir: Path, data: Path, out: Path, threads: int) -> dict:
    from vledge.benchmark.report import write_outputs, write_progress
    from vledge.benchmark.run import BenchConfig, default_engines, run_benchmark

    thread_counts = (1,) if threads == 1 else (1, threads)
    engines = tuple(spec.name for spec in default_engines(model_dir, peers=False))  # the short table
    bench_config = BenchConfig(ckpt=ckpt, model_dir=model_dir, data=data, engines=engines, threads=thread_counts,
                               batches=(1, 8),
                               repeats=config.bench_repeats, parity_samples=config.bench_parity_samples)
    result = run_benchmark(bench_config, save=lambda partial: write_progress(partial, out))
    write_outputs(result, out)
    return result


def caption_questions(records, count: int) -> list[tuple]:
    """(record, question, answer) for the first ``count`` records that have a caption turn: the
    question the record itself asks for its caption, and the record's answer to it (the truth to
    compare with, never another turn's detailed description)."""
    chosen = []
    for record in records:
        turn = next((t for t in record.turns if t.task == "caption"), None)
        if turn is not None:
            chosen.append((record, turn.question, turn.answer))
        if len(chosen) == count:
            break
    return chosen


def _captions(config: QuickstartConfig, model_dir: Path, data: Path, threads: int) -> list[dict]:
    from vledge.data.loaders import load_records
    from vledge.runtime import load

    runtime = load(model_dir, threads=threads)
    records, _ = load_records(data, split="test")
    rows = []
    for record, question, answer in caption_questions(records, config.captions):
        result = runtime.ask(record.image, question)
        rows.append({"image": str(record.image), "question": question, "caption": result.text, "reference": answer,
                     "ms": result.timings.total_ms})
    return rows


def _demo(config: QuickstartConfig, model_dir: Path, video: Path, log_path: Path, threads: int) -> None:
    from vledge.webcam import DemoOptions, run_demo

    run_demo(model_dir, source="synthetic", threads=threads,
             options=DemoOptions(output=video, log=log_path, headless=True, max_frames=config.demo_frames))
