"""Per-token decode latency: the runtime's KV-cached decode step vs the PyTorch original's, single thread.

    python benchmarks/decode_latency.py --ckpt RUN/ckpt.pt --model MODEL_DIR [--steps 32] [--repeats 20]

Each engine prefills the caption prompt for one image (batch 1, untimed), then runs ``--steps``
decode steps, each timed on its own, feeding the same token sequence to every engine (the cost
of a step does not depend on which token it is). Engines are interleaved repetition by repetition
in a shuffled order, after warm-up repetitions. Engines:

* ``pytorch``: ``vledge.models.generate.TorchTransformerSteps.step`` (eager, KV cache, inference mode);
* ``ort-<precision>``: ``vledge.runtime``'s ``OrtTransformerSteps.step`` for each decoder variant in the
  model directory (what ``generate()`` calls per token: token embedding, mask and positions, IO binding,
  the merged decoder graph, logits back as float32);
* ``graph-<precision>``: the bare decoder run with inputs prebuilt once (IO binding, KV as OrtValues):
  the floor under the runtime's step, so ``ort - graph`` is the Python loop's own cost.

Both sides run with one thread (``torch.set_num_threads(1)``, ONNX Runtime ``intra_op_num_threads=1``).
Prints a table (median / p90 / p99 ms per step, speed-up over PyTorch) and writes JSON with the
environment (versions, CPU, threads, spinning, model bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma") if f in flags)
    except OSError:
        pass
    return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _stats(values_ms: list[float]) -> dict[str, float]:
    array = np.asarray(values_ms)
    return {"median_ms": float(np.median(array)), "p90_ms": float(np.percentile(array, 90)),
            "p99_ms": float(np.percentile(array, 99)), "mean_ms": float(array.mean()), "runs": int(array.size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="the PyTorch checkpoint (ckpt.pt)")
    parser.add_argument("--model", type=Path, required=True, help="its exported model directory")
    parser.add_argument("--image", type=Path, default=None, help="image to prefill with (default: synthetic noise)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per repetition")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per engine")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions per engine first")
    parser.add_argument("--precisions", default="fp32,int8,q4", help="decoder variants to time (where present)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-spin", action="store_true", help="turn ONNX Runtime's thread spinning off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("decode_latency.json"))
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from vledge.checkpoint import load_checkpoint
    from vledge.decoding import GenerationOptions, left_pad
    from vledge.manifest import read_manifest
    from vledge.models.generate import TorchTransformerSteps as TorchSteps
    from vledge.prompt import question_ids
    from vledge.runtime import load

    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    checkpoint = load_checkpoint(args.ckpt)
    model, tokenizer = checkpoint.build_model().eval(), checkpoint.tokenizer()
    if not model.is_transformer:
        sys.exit("decode_latency.py times transformer decoders (KV cache); this checkpoint has an LSTM")
    size = model.config.preprocess.image_size
    manifest = read_manifest(args.model)
    available = manifest.precisions("decoder_model_merged")
    precisions = [p for p in args.precisions.split(",") if p in available]
    missing = [p for p in args.precisions.split(",") if p not in available]

    runtimes = {p: load(args.model, precision={"decoder_model_merged": p, "vision_encoder": "fp32",
                                               "embed_tokens": "fp32"},
                        providers="cpu", threads=args.threads, spin=not args.no_spin) for p in precisions}
    reference = runtimes.get("fp32") or next(iter(runtimes.values()))
    if args.image is not None:
        pixels = reference.preprocessor.batch([args.image])
    else:
        pixels = np.random.default_rng(args.seed).uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
    prompt = [question_ids(tokenizer, model.config.prompt, reference.caption_prompt)]
    with torch.inference_mode():
        image_embeds = model.encode_images(torch.from_numpy(pixels))
        ids, mask = left_pad(prompt, tokenizer.pad_id)
        merged = model.merge(torch.as_tensor(ids), image_embeds, torch.as_tensor(mask))
        prompt_positions = merged.inputs_embeds.shape[1]
        # One token sequence for every engine: PyTorch's greedy choice, continued past any stop token.
        steps = TorchSteps(model, merged.inputs_embeds, merged.attention_mask)
        tokens, logits = [], steps.first_logits
        for _ in range(args.steps):
            tokens.append(int(np.argmax(logits[0])))
            logits = steps.step(np.array([tokens[-1]]))
    if prompt_positions + args.steps > model.config.language.max_positions:
        sys.exit(f"{args.steps} steps after a {prompt_positions}-position prompt exceed the model's positions")
    token_arrays = [np.array([t], dtype=np.int64) for t in tokens]
    embeds_np = image_embeds.numpy()
    options = GenerationOptions(max_new_tokens=args.steps + 1)

    def time_steps(steps) -> list[float]:
        times = []
        for token in token_arrays:
            tick = time.perf_counter()
            steps.step(token)
            times.append(time.perf_counter() - tick)
        return times

    def time_torch() -> list[float]:
        with torch.inference_mode():
            return time_steps(TorchSteps(model, merged.inputs_embeds, merged.attention_mask))

    def time_runtime(runtime) -> list[float]:
        return time_steps(runtime.prefill(embeds_np, prompt, options)[0])

    def time_graph(runtime) -> list[float]:
        """The decoder graph alone: every input built before the clock starts, KV bound as OrtValues."""
        graphs = runtime.graphs
        steps, _ = runtime.prefill(embeds_np, prompt, options)
        past = steps.past_values
        length = past[0].shape()[2]
        names_in = [f"past_key_values.{i}.{k}" for i in range(graphs.layers) for k in ("key", "value")]
        names_out = [f"present.{i}.{k}" for i in range(graphs.layers) for k in ("key", "value")]
        embeds = [graphs.lookup_ids(t.reshape(1, 1)).astype(np.float32) for t in token_arrays]
        masks = [np.ones((1, length + 1 + i), np.int64) for i in range(len(token_arrays))]
        positions = [np.array([[length + i]], np.int64) for i in range(len(token_arrays))]
        times = []
        for step in range(len(token_arrays)):
            binding = graphs.decoder.io_binding()
            binding.bind_cpu_input("inputs_embeds", embeds[step])
            binding.bind_cpu_input("attention_mask", masks[step])
            binding.bind_cpu_input("position_ids", positions[step])
            for name, value in zip(names_in, past):
                binding.bind_ortvalue_input(name, value)
            binding.bind_output("logits", "cpu")
            for name in names_out:
                binding.bind_output(name, "cpu")
            tick = time.perf_counter()
            graphs.decoder.run_with_iobinding(binding)
            times.append(time.perf_counter() - tick)
            past = binding.get_outputs()[1:]
        return times

    engines = {"pytorch": time_torch}
    for precision, runtime in runtimes.items():
        engines[f"ort-{precision}"] = lambda runtime=runtime: time_runtime(runtime)
        engines[f"graph-{precision}"] = lambda runtime=runtime: time_graph(runtime)
    samples: dict[str, list[float]] = {name: [] for name in engines}
    for repetition in range(args.warmup + args.repeats):
        order = list(engines)
        rng.shuffle(order)
        for name in order:
            times = engines[name]()
            if repetition >= args.warmup:
                samples[name].extend(t * 1e3 for t in times)

    results = {name: _stats(values) for name, values in samples.items()}
    torch_median = results["pytorch"]["median_ms"]
    for name, stats in results.items():
        stats["speedup_vs_pytorch"] = torch_median / stats["median_ms"]
    files = {p: str(manifest.variants["decoder_model_merged"][p]) for p in precisions}
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "checkpoint": str(args.ckpt),
        "model_dir": str(args.model),
        "architecture": manifest.architecture(),
        "prompt_positions": prompt_positions,
        "steps_per_repetition": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "ort_spinning": not args.no_spin,
        "decoder_bytes": {p: (args.model / f).stat().st_size for p, f in files.items()},
        "missing_precisions": missing,
        "machine": {"cpu": _cpu_model(), "flags": _cpu_flags(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": ort.__version__, "numpy": np.__version__},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"decode step latency, batch 1, {args.threads} thread(s), past {prompt_positions}..."
          f"{prompt_positions + args.steps}, {args.repeats} x {args.steps} steps per engine")
    print(f"{'engine':<14} {'median ms':>10} {'p90 ms':>9} {'p99 ms':>9} {'vs pytorch':>11}")
    for name, stats in results.items():
        print(f"{name:<14} {stats['median_ms']:>10.3f} {stats['p90_ms']:>9.3f} {stats['p99_ms']:>9.3f} "
              f"{stats['speedup_vs_pytorch']:>10.2f}x")
    if missing:
        print(f"not in the model directory: {', '.join(missing)}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
