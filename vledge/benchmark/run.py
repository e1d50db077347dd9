"""The benchmark: every engine, the same inputs and thread counts, interleaved, with parity next to speed.

Method: each engine is loaded once per thread count in a worker process of its own
(``vledge.benchmark.worker``: thread pools of different engines never share a process) and
warmed up; then, for each repetition, every worker in turn measures every stage once, in a
rotating order, so a noisy neighbour slows all engines alike. The machine's load (load
average before and after, other processes' CPU) is reported with the numbers. Medians and ratios to the PyTorch
original are reported next to p90/p99 and the run counts. Cold start and peak
resident memory come from a fresh process per engine (``vledge.benchmark.coldstart``).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vledge.benchmark.engines import EngineSpec
from vledge.benchmark.machine import describe_machine
from vledge.benchmark.resume import resumable, settings_of
from vledge.errors import ConfigError

log = logging.getLogger(__name__)

STAGES = ("preprocess_ms", "vision_ms", "vision_tile_ms", "prefill_ms", "decode_token_ms", "caption_ms")


@dataclass(frozen=True)
class BenchConfig:
    ckpt: Path | None  # None: the exported model alone (no PyTorch engines, ratios or accuracy parity)
    model_dir: Path
    data: Path | None = None  # held-out images and questions; None: fresh built-in synthetic scenes
    engines: tuple[str, ...] | None = None  # None: every engine this machine and model directory offer
    threads: tuple[int, ...] = (1, 2)
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 20
    decode_tokens: int = 24
    caption_tokens: int = 24
    parity_samples: int = 200
    cold_start: bool = True

    def __post_init__(self) -> None:
        if not self.threads or min(self.threads) < 1:
            raise ConfigError("threads must be a non-empty list of positive counts")
        if not self.batches or min(self.batches) < 1:
            raise ConfigError("batches must be a non-empty list of positive sizes")
        if self.repeats < 3:
            raise ConfigError("repeats must be at least 3 for a median and percentiles to mean anything")


def summarize(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(array)), "p90": float(np.percentile(array, 90)),
            "p99": float(np.percentile(array, 99)), "mean": float(array.mean()), "runs": int(array.size)}


def default_engines(model_dir: Path, peers: bool = True) -> list[EngineSpec]:
    """PyTorch fp32, int8 and compiled, every ONNX Runtime CPU variant the directory has, OpenVINO on the
    same files, and CUDA variants if CUDA works; ``peers`` False leaves out pytorch-compile and OpenVINO.
    Engines whose optional package is missing are kept here and skipped with a note by :func:`run_benchmark`."""
    from vledge.manifest import read_manifest

    manifest = read_manifest(model_dir, verify=False)
    decoder = set(manifest.precisions("decoder_model_merged"))
    specs = [EngineSpec("pytorch", "fp32"), EngineSpec("pytorch", "int8")]
    peer_engines = manifest.model_config.language.family.bench_peers  # what torch.compile and OpenVINO serve
    if peers and peer_engines:
        specs.append(EngineSpec("pytorch", "compile"))
    specs.append(EngineSpec("onnxruntime", "fp32"))
    specs += [EngineSpec("onnxruntime", p) for p in ("int8", "q4") if p in decoder]
    if manifest.selected.get("cpu") and any(v != "fp32" for v in manifest.selected["cpu"].values()):
        specs.append(EngineSpec("onnxruntime", "auto"))
    if peers and peer_engines:
        specs += [EngineSpec("openvino", p) for p in ("fp32", "int8", "q4") if p == "fp32" or p in decoder]
    if _cuda_works(model_dir, manifest):
        specs += [EngineSpec("onnxruntime", "fp32", "cuda")]
        if "fp16" in decoder:
            specs.append(EngineSpec("onnxruntime", "fp16", "cuda"))
    return specs


def _cuda_works(model_dir: Path, manifest) -> bool:
    """Whether a CUDA session really starts here (ONNX Runtime lists CUDA even without a GPU).

    Asked through the runtime's quiet probe: ONNX Runtime's complaints go to the debug log, not the terminal.
    """
    from vledge.runtime.providers import gpu_status

    return gpu_status("cuda").usable


@dataclass
class EngineResult:
    engine: str
    threads: int
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)  # batch size -> images/s (median)
    ratio_to_pytorch: dict[str, float] = field(default_factory=dict)  # stage -> pytorch median / ours
    tokens_per_caption: float = 0.0
    tiles_per_image: float = 1.0  # images the vision encoder sees per picture (a tiled model's tiles + global view)
    load_ms: float = 0.0  # in its own process, before the warm-up
    warmup_ms: float = 0.0  # the first calls (for pytorch-compile: the compilation)
    pid: int = 0  # the worker process that measured this engine


def run_benchmark(config: BenchConfig, progress: Callable[[str], None] | None = None,
                  save: Callable[[dict], None] | None = None, previous: dict | None = None,
                  advance: Callable[[int, int], None] | None = None) -> dict:
    """Every engine in a worker process of its own (``vledge.benchmark.worker``), interleaved per repetition.

    ``save`` gets the result so far (``"complete": false``) as soon as each thread count's latency, each
    engine's parity and each engine's cold start is measured, so a stopped benchmark keeps what it has.
    ``previous`` is such a result to continue (``vledge bench --resume``): what it measured under the
    same settings is kept, not measured again; other settings are a ConfigError. ``advance(done, total)``
    counts the units of work (repetitions, parity runs, cold starts).
    """
    import pickle
    import tempfile

    from vledge.benchmark.machine import LoadMonitor
    from vledge.checkpoint import load_checkpoint
    from vledge.export.export import ExportOptions, _held_out_data
    from vledge.export.parity import torch_reference
    from vledge.prompt import CAPTION_PROMPT, question_ids

    say = progress or (lambda message: log.info("%s", message))
    monitor = LoadMonitor()
    started = time.perf_counter()
    specs = [EngineSpec.parse(name) for name in config.engines] if config.engines else default_engines(config.model_dir)
    alone = exported_only(config)
    if alone:
        say(alone)
        skipped = {s.name: alone for s in specs if s.kind == "pytorch"}
        skipped.update({s.name: "OpenVINO does not run tiled models here" for s in specs
                        if s.kind == "openvino" and _tiled(config.model_dir)})
        specs = [s for s in specs if s.name not in skipped]
    elif not any(s.kind == "pytorch" and s.precision == "fp32" for s in specs):
        specs.insert(0, EngineSpec("pytorch", "fp32"))  # every ratio is against the original
        skipped = {}
    else:
        skipped = {}
    if not specs:
        raise ConfigError("no engine left to measure: name ONNX Runtime engines (ort-cpu-fp32 ...) with --engines")
    skipped.update({s.name: s.missing for s in specs if s.missing})
    for name, reason in skipped.items():
        say(f"skipping {name}: {reason}")
    specs = [s for s in specs if not s.missing]
    settings = settings_of(config)
    done = resumable(previous, settings, [s.name for s in specs]) if previous is not None else {}
    results: list[dict] = [row for row in done.get("latency", []) if row["threads"] in config.threads]
    parity: dict[str, dict] = dict(done.get("parity", {}))
    cold: dict[str, dict] = {k: v for k, v in done.get("cold_start", {}).items() if "error" not in v}
    measured_threads = {row["threads"] for row in results}
    if done:
        say(f"resuming: {len(measured_threads)} thread count(s), {len(parity)} parity and {len(cold)} cold-start "
            "measurement(s) kept")
    todo = [t for t in config.threads if t not in measured_threads]
    first_parity = [] if alone else [s.name for s in specs if s.name not in parity]
    total = (len(todo) * config.repeats + len(first_parity)
             + (len([s for s in specs if s.name not in cold]) if config.cold_start else 0))
    count = 0

    def step(units: int = 1) -> None:
        nonlocal count
        count += units
        if advance is not None:
            advance(count, total)

    result = {
        "complete": False,
        "pytorch_skipped": alone or None,
        "tiled": _tiled(config.model_dir),  # each image is split into tiles (Idefics3 / SmolVLM)
        "machine": describe_machine(),
        "load": None,
        "config": settings,
        "engines": [s.name for s in specs],
        "skipped": skipped,
        "isolation": "process per engine",
        "reference": None,
        "latency": results,
        "parity": parity,
        "cold_start": cold,
        "seconds": 0.0,
        "resumed": int(done.get("resumed", 0)) + 1 if done else 0,
    }
    earlier_seconds = float(done.get("seconds", 0.0)) if done else 0.0

    def keep() -> None:
        result["seconds"] = earlier_seconds + time.perf_counter() - started
        if save is not None:
            save(result)

    if advance is not None:
        advance(0, total)
    if total == 0 and (done.get("reference") or alone):  # all measured already: nothing to load
        result.update(reference=done["reference"], load=monitor.stop(), complete=True,
                      seconds=earlier_seconds + time.perf_counter() - started)
        return result
    with tempfile.TemporaryDirectory(prefix="vledge-bench-") as work:
        if alone:
            say("loading the images")
            image_paths, caption_prompt = _exported_inputs(config, Path(work), max(config.batches))
            first_parity = []
        else:
            checkpoint = load_checkpoint(config.ckpt)
            tokenizer = checkpoint.tokenizer()
            model = checkpoint.build_model()
            say("loading held-out data")
            _, samples = _held_out_data(ExportOptions(data=config.data, parity_samples=config.parity_samples,
                                                      calibration_samples=1), model, tokenizer, Path(work))
            image_paths = _image_paths(config, Path(work), max(config.batches))
            caption_prompt = question_ids(tokenizer, checkpoint.model_config.prompt, CAPTION_PROMPT)

            say(f"PyTorch reference answers for {len(samples)} questions")
            import torch

            torch.set_num_threads(max(config.threads))
            reference = torch_reference(model, tokenizer, samples)
            del model
            result["reference"] = {"engine": "pytorch", "accuracy": reference.accuracy, "questions": len(samples)}
            samples_file = Path(work) / "parity.pickle"
            with open(samples_file, "wb") as handle:
                pickle.dump((samples, reference), handle)

        for threads in config.threads:
            needs_latency = threads in todo
            needs_parity = [name for name in first_parity if name not in parity] if threads == config.threads[0] else []
            if not needs_latency and not needs_parity:
                continue
            workers = _start_workers(specs, config, threads, say)
            try:
                if needs_latency:
                    say(f"{threads} thread(s): timing {', '.join(w.name for w in workers)}, each in its own process")
                    rows = _time_engines(workers, threads, image_paths, caption_prompt, config, on_repetition=step)
                    results += [asdict(r) for r in rows]
                    results.sort(key=lambda row: config.threads.index(row["threads"]))
                    keep()
                for worker in workers:
                    if worker.name in needs_parity:
                        say(f"parity of {worker.name}")
                        parity[worker.name] = worker.call("parity", samples=str(samples_file))
                        step()
                        keep()
            finally:
                for worker in workers:
                    worker.close()

        if config.cold_start:
            for spec in specs:
                if spec.name in cold:
                    continue
                say(f"cold start and peak memory of {spec.name}")
                cold[spec.name] = _cold_start(spec, config, image_paths[0], caption_prompt, config.threads[0])
                step()
                keep()

    result["parity"] = {s.name: parity[s.name] for s in specs if s.name in parity}  # in engine order
    result["cold_start"] = {s.name: cold[s.name] for s in specs if s.name in cold}
    result["load"] = monitor.stop()
    result["complete"] = True
    result["seconds"] = earlier_seconds + time.perf_counter() - started
    return result


def _start_workers(specs: Sequence[EngineSpec], config: BenchConfig, threads: int, say) -> list:
    from vledge.benchmark.worker import EngineWorker

    workers = [EngineWorker(spec.name, threads) for spec in specs]
    try:
        for worker in workers:
            say(f"{threads} thread(s): loading {worker.name}")
            worker.loaded = worker.call("load", engine=worker.name, ckpt=str(config.ckpt or ""),
                                        model_dir=str(config.model_dir), threads=threads)
    except BaseException:
        for worker in workers:
            worker.close()
        raise
    return workers


def _tiled(model_dir: Path) -> bool:
    from vledge.manifest import read_manifest

    return read_manifest(model_dir, verify=False).preprocess.tiles is not None


def exported_only(config: BenchConfig) -> str:
    """Why the PyTorch side (its engines, the ratios to it, accuracy parity) is left out, or "" when it runs."""
    if config.ckpt is None:
        return "no --ckpt: the PyTorch engines, the ratios to PyTorch and the accuracy parity are skipped"
    if _tiled(config.model_dir):
        return ("a tiled model (Idefics3 / SmolVLM): the PyTorch engines, the ratios to PyTorch and the accuracy "
                "parity are skipped (the exporter's parity gate compared it with PyTorch: the model directory's "
                "parity.md)")
    return ""


def _exported_inputs(config: BenchConfig, work: Path, count: int) -> tuple[list[Path], list[int]]:
    """Images (``--data``, else fresh synthetic scenes as large as the model's largest input) and the caption
    prompt's ids, from the model directory alone."""
    from vledge.manifest import TOKENIZER_NAME, read_manifest, resolve_inside
    from vledge.prompt import CAPTION_PROMPT, question_ids
    from vledge.tokenizer import Tokenizer

    manifest = read_manifest(config.model_dir, verify=False)
    if config.data is None:
        from vledge.data.synth import SynthOptions, generate_dataset

        spec = manifest.preprocess
        size = max(48, spec.tiles.longest_edge if spec.tiles is not None else spec.image_size)
        generate_dataset(work / "synthetic", SynthOptions(size=2 * max(count, 8), seed=90_210, image_size=size,
                                                          splits=(0.5, 0.0, 0.5)), workers=1)
    tokenizer = Tokenizer.from_file(resolve_inside(config.model_dir, TOKENIZER_NAME),
                                    manifest.model_config.special_tokens)
    prompt = manifest.generation.get("caption_prompt", CAPTION_PROMPT)
    return _image_paths(config, work, count), question_ids(tokenizer, manifest.prompt, prompt)


def _image_paths(config: BenchConfig, work: Path, count: int) -> list[Path]:
    from vledge.export.export import _split

    data = config.data or work / "synthetic"
    records = _split(data, ("test", "val", "train"))
    paths = [Path(r.image) for r in records[: max(count, 8)]]
    return paths


def _time_engines(workers, threads: int, images: list[Path], prompt: list[int], config: BenchConfig,
                  on_repetition: Callable[[], None] | None = None) -> list[EngineResult]:
    """Each repetition asks every worker in turn (rotating order) for one round of every stage, so a noisy
    neighbour slows all engines alike, and only one engine computes at a time."""
    samples: dict[str, dict[str, list[float]]] = {w.name: {s: [] for s in STAGES} for w in workers}
    throughput: dict[str, dict[int, list[float]]] = {w.name: {b: [] for b in config.batches} for w in workers}
    tokens: dict[str, list[int]] = {w.name: [] for w in workers}
    tiles: dict[str, list[int]] = {w.name: [] for w in workers}
    warmup = {w.name: w.call("warmup", images=[str(p) for p in images[:1]], prompt=prompt,
                             caption_tokens=config.caption_tokens)["warmup_ms"] for w in workers}
    for rep in range(config.repeats):
        order = workers[rep % len(workers):] + workers[: rep % len(workers)]
        image = images[rep % len(images)]
        batches = []
        if rep % 4 == 0:
            batches = [[str(images[(rep + i) % len(images)]) for i in range(batch)] for batch in config.batches]
        for worker in order:
            reply = worker.call("repetition", image=str(image), prompt=prompt, decode_tokens=config.decode_tokens,
                                caption_tokens=config.caption_tokens, batches=batches)
            for stage, value in reply["times"].items():
                samples[worker.name][stage] += value if isinstance(value, list) else [value]
            for batch, rate in zip(config.batches, reply["throughput"]):
                throughput[worker.name][batch].append(rate)
            tokens[worker.name].append(reply["tokens"])
            tiles[worker.name].append(reply.get("tiles", 1))
        if on_repetition is not None:
            on_repetition()
    results = []
    for worker in workers:
        result = EngineResult(engine=worker.name, threads=threads,
                              stages={s: summarize(v) for s, v in samples[worker.name].items()},
                              throughput={str(b): float(np.median(v)) for b, v in throughput[worker.name].items()},
                              tokens_per_caption=float(np.mean(tokens[worker.name])),
                              tiles_per_image=float(np.mean(tiles[worker.name])),
                              load_ms=worker.loaded["load_ms"], warmup_ms=warmup[worker.name],
                              pid=worker.loaded["pid"])
        results.append(result)
    base = next((r for r in results if r.engine == "pytorch"), None)
    if base is None:  # the exported model alone: no ratios
        return results
    for result in results:
        result.ratio_to_pytorch = {s: base.stages[s]["median"] / max(result.stages[s]["median"], 1e-9) for s in STAGES}
    return results


def _cold_start(spec: EngineSpec, config: BenchConfig, image: Path, prompt: list[int], threads: int) -> dict:
    command = [sys.executable, "-m", "vledge.benchmark.coldstart", spec.name, str(config.ckpt or ""), str(config.model_dir),
               str(image), json.dumps(prompt), str(threads), str(config.caption_tokens)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if completed.returncode != 0:
        log.warning("cold start of %s failed: %s", spec.name, completed.stderr.strip()[-500:])
        return {"error": completed.stderr.strip()[-500:]}
    return json.loads(completed.stdout.strip().splitlines()[-1])
