"""SmolVLM-256M-shaped model: time to first token (one 512x512 tile, and 4 tiles + the global view) and decode.

    python benchmarks/smolvlm_latency.py [--cache DIR] [--rounds 3] [--steps 32] [--threads 1] [--json OUT]

1. A random ``SmolVLMForConditionalGeneration`` folder with SmolVLM-256M-Instruct's shapes is built once into
   ``--cache``: SigLIP-B/16 at 512 px (12 layers, width 768: 86M), pixel shuffle by 4 (64 tokens a tile), and
   SmolLM2-135M's shape (30 layers, width 576, 9 heads, 3 key-value heads, vocabulary 49,280). Its processor
   resizes to a longest edge of 1024 and splits into 512 px tiles, so a square photo becomes 2 x 2 tiles plus the
   global view (5 tiles, 320 image tokens); the unsplit case squashes it to one 512 px tile (64 tokens). The
   tokenizer is a word-level one with the SmolVLM special tokens (only the shapes matter here; weights are random).
2. ``vledge export FOLDER --quantize int8,q4`` (cached). The parity gate's decision is reported, not enforced:
   every variant is timed.
3. Each engine runs in its own process (so its peak RSS is its own), engines interleaved round by round, at
   ``--threads`` threads: time to first token for both image cases (preprocessing included: the same PIL-exact
   tiles for every engine), the vision tower's time per tile, and decode ms/token over ``--steps`` greedy steps
   after the 5-tile prompt. vledge fp32 / int8 / q4 (vision graph fp32 for fp32, int8 otherwise) run
   ``vledge.runtime``; PyTorch eager runs transformers' ``SmolVLMForConditionalGeneration`` from the same folder
   with its own (Pillow) processor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ENGINES = ("vledge-fp32", "vledge-int8", "vledge-q4", "pytorch-eager")
QUESTION = "Describe this image."
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>",
            "<image>", "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
VOCAB = 49280
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] "
    "== 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def build_folder(folder: Path) -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers.models.smolvlm import processing_smolvlm
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    if (folder / "model.safetensors").is_file():
        return folder
    words = SPECIALS + [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(SPECIALS)
    named = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
             "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>", extra_special_tokens=named)
    vision = transformers.SmolVLMVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, image_size=512, patch_size=16)
    text = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=False,
                                    bos_token_id=1, eos_token_id=3, pad_token_id=2)
    config = transformers.SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=4, image_token_id=5,
                                        pad_token_id=2)
    torch.manual_seed(0)
    model = transformers.SmolVLMForConditionalGeneration(config).eval()
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=3, pad_token_id=2)
    model.save_pretrained(folder)
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": 1024}, max_image_size={"longest_edge": 512},
                                               do_image_splitting=True, resample=1)
    if processing_smolvlm.num2words is None:  # video prompts only; not installed here
        processing_smolvlm.num2words = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no num2words"))
    video = transformers.SmolVLMVideoProcessor(size={"longest_edge": 1024}, max_image_size={"longest_edge": 512})
    processor = processing_smolvlm.SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                    video_processor=video, image_seq_len=64,
                                                    chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": 64,
                                                              "processor_class": "SmolVLMProcessor"}))
    return folder


def export(folder: Path, model_dir: Path) -> dict:
    if not (model_dir / "vledge.json").is_file():
        subprocess.run([sys.executable, "-m", "vledge", "export", str(folder), "-o", str(model_dir), "--quantize",
                        "int8,q4", "--parity-samples", "8", "--threads", "2"], check=True)
    return json.loads((model_dir / "vledge.json").read_text())


def photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # 512 x 512 RGB


def file_sizes(model_dir: Path) -> dict[str, float]:
    return {p.name: round(p.stat().st_size / 1e6, 1) for p in sorted((model_dir / "onnx").glob("*.onnx"))}


# --------------------------------------------------------------------------- workers (one engine per process)


def vledge_worker(model_dir: Path, precision: str, threads: int, steps: int, repeats: int) -> dict:
    import dataclasses

    from vledge.decoding import GenerationOptions
    from vledge.runtime import load
    from vledge.runtime.preprocess import ImagePreprocessor

    decoder = precision
    vision = "fp32" if precision == "fp32" else "int8"
    rt = load(model_dir, precision={"vision_encoder": vision, "embed_tokens": "fp32", "decoder_model_merged": decoder},
              threads=threads)
    spec = rt.manifest.preprocess
    unsplit = ImagePreprocessor(dataclasses.replace(spec, tiles=dataclasses.replace(spec.tiles, split=False)))
    image = photo()
    cases = {"unsplit": unsplit, "tiles": rt.preprocessor}
    out: dict = {}
    first = GenerationOptions(max_new_tokens=1)
    for name, preprocessor in cases.items():
        times, vision_ms, tiles = [], [], 0
        for _ in range(repeats + 1):
            tick = time.perf_counter()
            tiled = preprocessor.tiles(image, "RGB")
            result = rt.generate_from_tiles([[tiled]], [QUESTION], first)[0]
            times.append((time.perf_counter() - tick) * 1e3)
            vision_ms.append(result.timings.vision_ms)
            tiles = len(tiled.pixel_values)
        out[name] = {"ttft_ms": float(np.median(times[1:])), "vision_ms": float(np.median(vision_ms[1:])),
                     "tiles": tiles, "vision_ms_per_tile": float(np.median(vision_ms[1:])) / tiles}
    tiled = rt.preprocessor.tiles(image, "RGB")
    result = rt.generate_from_tiles([[tiled]], [QUESTION], GenerationOptions(max_new_tokens=steps + 1))[0]
    out["decode_ms_per_token"] = result.timings.per_token_ms
    out["decoded_tokens"] = len(result.token_ids)
    return out


def torch_worker(folder: Path, threads: int, steps: int, repeats: int) -> dict:
    import torch
    import transformers
    from transformers.models.smolvlm import processing_smolvlm
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    torch.set_num_threads(threads)
    if processing_smolvlm.num2words is None:
        processing_smolvlm.num2words = lambda *a, **k: None
    model = transformers.SmolVLMForConditionalGeneration.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    processor.image_processor = SmolVLMImageProcessorPil.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = photo()
    out: dict = {}
    for name, split in (("unsplit", False), ("tiles", True)):
        times, vision_ms, tiles = [], [], 0
        for _ in range(repeats + 1):
            tick = time.perf_counter()
            inputs = processor(text=text, images=[[image]], return_tensors="pt", do_image_splitting=split)
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=1, do_sample=False)
            times.append((time.perf_counter() - tick) * 1e3)
            pixels = inputs["pixel_values"]
            tiles = int(pixels.shape[1])
            tick = time.perf_counter()
            with torch.inference_mode():
                model.get_image_features(pixel_values=pixels)
            vision_ms.append((time.perf_counter() - tick) * 1e3)
        out[name] = {"ttft_ms": float(np.median(times[1:])), "vision_ms": float(np.median(vision_ms[1:])),
                     "tiles": tiles, "vision_ms_per_tile": float(np.median(vision_ms[1:])) / tiles}
    inputs = processor(text=text, images=[[image]], return_tensors="pt")
    with torch.inference_mode():
        tick = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        one = time.perf_counter() - tick
        tick = time.perf_counter()
        generated = model.generate(**inputs, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False)
        many = time.perf_counter() - tick
    out["decode_ms_per_token"] = (many - one) * 1e3 / steps
    out["decoded_tokens"] = int(generated.shape[1] - inputs["input_ids"].shape[1])
    return out


def worker(args) -> None:
    if args.engine == "pytorch-eager":
        result = torch_worker(args.folder, args.threads, args.steps, args.repeats)
    else:
        result = vledge_worker(args.model_dir, args.engine.split("-", 1)[1], args.threads, args.steps, args.repeats)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vledge-bench" / "smolvlm256")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case inside each process")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", dest="engine", choices=ENGINES)
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--model-dir", type=Path)
    args = parser.parse_args()
    if args.engine:
        worker(args)
        return
    folder = build_folder(args.cache / "hf")
    model_dir = args.cache / "model"
    manifest = export(folder, model_dir)
    runs: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for round_index in range(args.rounds):
        for engine in ENGINES:
            command = [sys.executable, __file__, "--worker", engine, "--folder", str(folder), "--model-dir",
                       str(model_dir), "--threads", str(args.threads), "--steps", str(args.steps), "--repeats",
                       str(args.repeats)]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                print(f"{engine} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            runs[engine].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_index + 1} {engine}: {runs[engine][-1]}", file=sys.stderr)
    report = {"threads": args.threads, "load_average": os.getloadavg(), "files_mb": file_sizes(model_dir),
              "gate": manifest.get("parity", {}).get("gate"), "engines": {}}
    for engine, results in runs.items():
        if not results:
            continue
        median = lambda path: float(np.median([path(r) for r in results]))  # noqa: E731
        report["engines"][engine] = {
            "ttft_unsplit_ms": median(lambda r: r["unsplit"]["ttft_ms"]),
            "ttft_5_tiles_ms": median(lambda r: r["tiles"]["ttft_ms"]),
            "vision_ms_per_tile": median(lambda r: r["tiles"]["vision_ms_per_tile"]),
            "vision_ms_5_tiles": median(lambda r: r["tiles"]["vision_ms"]),
            "decode_ms_per_token": median(lambda r: r["decode_ms_per_token"]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
