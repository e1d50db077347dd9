"""The benchmark: every engine, the same inputs and thread counts, interleaved, with parity next to speed.

Method: each engine is loaded once per thread count and warmed up; then, for each
repetition, every engine measures every stage once, in a rotating order, so a
noisy neighbour slows all engines alike. Medians and ratios to the PyTorch
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

from vledge.benchmark.engines import EngineSpec, make_engine
from vledge.benchmark.machine import describe_machine
from vledge.errors import ConfigError

log = logging.getLogger(__name__)

STAGES = ("preprocess_ms", "vision_ms", "prefill_ms", "decode_token_ms", "caption_ms")


@dataclass(frozen=True)
class BenchConfig:
    ckpt: Path
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


def default_engines(model_dir: Path) -> list[EngineSpec]:
    """PyTorch fp32 and int8, then every ONNX Runtime CPU variant the directory has; CUDA ones if CUDA works."""
    from vledge.manifest import read_manifest

    manifest = read_manifest(model_dir, verify=False)
    decoder = set(manifest.precisions("decoder_model_merged"))
    specs = [EngineSpec("pytorch", "fp32"), EngineSpec("pytorch", "int8"), EngineSpec("onnxruntime", "fp32")]
    specs += [EngineSpec("onnxruntime", p) for p in ("int8", "q4") if p in decoder]
    if manifest.selected.get("cpu") and any(v != "fp32" for v in manifest.selected["cpu"].values()):
        specs.append(EngineSpec("onnxruntime", "auto"))
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


def run_benchmark(config: BenchConfig, progress: Callable[[str], None] | None = None) -> dict:
    from vledge.checkpoint import load_checkpoint
    from vledge.export.export import ExportOptions, _held_out_data
    from vledge.export.parity import measure_engine, torch_reference
    from vledge.prompt import CAPTION_PROMPT, question_ids

    say = progress or (lambda message: log.info("%s", message))
    started = time.perf_counter()
    specs = [EngineSpec.parse(name) for name in config.engines] if config.engines else default_engines(config.model_dir)
    if not any(s.kind == "pytorch" and s.precision == "fp32" for s in specs):
        specs.insert(0, EngineSpec("pytorch", "fp32"))  # every ratio is against the original
    checkpoint = load_checkpoint(config.ckpt)
    tokenizer = checkpoint.tokenizer()
    model = checkpoint.build_model()

    say("loading held-out data")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vledge-bench-") as work:
        _, samples = _held_out_data(ExportOptions(data=config.data, parity_samples=config.parity_samples,
                                                  calibration_samples=1), model, tokenizer, Path(work))
        image_paths = _image_paths(config, Path(work), max(config.batches))
        caption_prompt = question_ids(tokenizer, checkpoint.model_config.prompt, CAPTION_PROMPT)

        say(f"PyTorch reference answers for {len(samples)} questions")
        import torch

        torch.set_num_threads(max(config.threads))
        reference = torch_reference(model, tokenizer, samples)

        results: list[EngineResult] = []
        parity: dict[str, dict] = {}
        for threads in config.threads:
            engines = [make_engine(spec, config.ckpt, config.model_dir, threads) for spec in specs]
            for engine in engines:
                engine.load()
            say(f"{threads} thread(s): timing {', '.join(e.name for e in engines)}")
            results += _time_engines(engines, threads, image_paths, caption_prompt, config)
            if threads == config.threads[0]:
                for engine in engines:
                    say(f"parity of {engine.name}")
                    measured = measure_engine(engine, samples, reference,
                                              precisions=getattr(engine, "precisions", {"all": engine.spec.precision}))
                    parity[engine.name] = measured.to_dict()
                    parity[engine.name]["size_bytes"] = engine.size_bytes()
            del engines

        cold: dict[str, dict] = {}
        if config.cold_start:
            for spec in specs:
                say(f"cold start and peak memory of {spec.name}")
                cold[spec.name] = _cold_start(spec, config, image_paths[0], caption_prompt, config.threads[0])

    return {
        "machine": describe_machine(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "engines": [s.name for s in specs],
        "reference": {"engine": "pytorch", "accuracy": reference.accuracy, "questions": len(samples)},
        "latency": [asdict(r) for r in results],
        "parity": parity,
        "cold_start": cold,
        "seconds": time.perf_counter() - started,
    }


def _image_paths(config: BenchConfig, work: Path, count: int) -> list[Path]:
    from vledge.export.export import _split

    data = config.data or work / "synthetic"
    records = _split(data, ("test", "val", "train"))
    paths = [Path(r.image) for r in records[: max(count, 8)]]
    return paths


def _time_engines(engines, threads: int, images: list[Path], prompt: list[int], config: BenchConfig) -> list[EngineResult]:
    samples: dict[str, dict[str, list[float]]] = {e.name: {s: [] for s in STAGES} for e in engines}
    throughput: dict[str, dict[int, list[float]]] = {e.name: {b: [] for b in config.batches} for e in engines}
    tokens: dict[str, list[int]] = {e.name: [] for e in engines}

    def clock(call) -> tuple[float, object]:
        tick = time.perf_counter()
        value = call()
        return (time.perf_counter() - tick) * 1e3, value

    for engine in engines:  # warm-up: first calls allocate, JIT and fill caches
        embeds = engine.encode_images(engine.preprocess(images[:1]))
        engine.caption(images[:1], [prompt], config.caption_tokens)
        engine.start(embeds, [prompt])
    for rep in range(config.repeats):
        order = engines[rep % len(engines):] + engines[: rep % len(engines)]
        image = images[rep % len(images)]
        for engine in order:
            times = samples[engine.name]
            ms, pixels = clock(lambda: engine.preprocess([image]))
            times["preprocess_ms"].append(ms)
            ms, embeds = clock(lambda: engine.encode_images(pixels))
            times["vision_ms"].append(ms)
            ms, steps = clock(lambda: engine.start(embeds, [prompt]))
            times["prefill_ms"].append(ms)
            token = np.argmax(steps.first_logits, axis=-1)
            for _ in range(config.decode_tokens):  # the cost of a step does not depend on the token: never stop
                ms, logits = clock(lambda: steps.step(token))
                times["decode_token_ms"].append(ms)
                token = np.argmax(logits, axis=-1)
            ms, out = clock(lambda: engine.caption([image], [prompt], config.caption_tokens))
            times["caption_ms"].append(ms)
            tokens[engine.name].append(len(out[0]))
        if rep % 4 == 0:
            for batch in config.batches:
                chosen = [images[(rep + i) % len(images)] for i in range(batch)]
                for engine in order:
                    ms, _ = clock(lambda: engine.caption(chosen, [prompt] * batch, config.caption_tokens))
                    throughput[engine.name][batch].append(batch / (ms / 1e3))
    results = []
    for engine in engines:
        result = EngineResult(engine=engine.name, threads=threads,
                              stages={s: summarize(v) for s, v in samples[engine.name].items()},
                              throughput={str(b): float(np.median(v)) for b, v in throughput[engine.name].items()},
                              tokens_per_caption=float(np.mean(tokens[engine.name])))
        results.append(result)
    base = next(r for r in results if r.engine == "pytorch")
    for result in results:
        result.ratio_to_pytorch = {s: base.stages[s]["median"] / max(result.stages[s]["median"], 1e-9) for s in STAGES}
    return results


def _cold_start(spec: EngineSpec, config: BenchConfig, image: Path, prompt: list[int], threads: int) -> dict:
    command = [sys.executable, "-m", "vledge.benchmark.coldstart", spec.name, str(config.ckpt), str(config.model_dir),
               str(image), json.dumps(prompt), str(threads), str(config.caption_tokens)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if completed.returncode != 0:
        log.warning("cold start of %s failed: %s", spec.name, completed.stderr.strip()[-500:])
        return {"error": completed.stderr.strip()[-500:]}
    return json.loads(completed.stdout.strip().splitlines()[-1])
