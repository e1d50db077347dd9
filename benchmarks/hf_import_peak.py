"""Peak memory and disk of bringing a Hugging Face LLaVA folder into the exporter: in memory vs via a ckpt.pt.

`vledge export HF_DIR` hands the folder's tensors to the exporter as a checkpoint held in memory; the path it
replaced converted the folder to a float32 ``ckpt.pt`` next to the output first and read that back. This script
builds a random LLaVA folder of a chosen size (default: TinyLlama-1.1B's LM shape behind a small CLIP tower,
bfloat16 safetensors as checkpoints ship), then runs each path in its own process up to the built PyTorch model
the graphs are traced from, and reports peak RSS (ru_maxrss), bytes written and seconds:

    python benchmarks/hf_import_peak.py --out /tmp/hf_peak
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

HERE = Path(__file__).resolve().parent
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5)
TOWER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
             patch_size=16)


def build_folder(folder: Path) -> None:
    """A random LLaVA folder: names and shapes from transformers on the meta device, random bfloat16 values."""
    import torch
    import transformers
    from safetensors.torch import save_file

    sys.path.insert(0, str(HERE.parent / "tests"))
    from hf_llava_folders import make_llava_folder

    small = make_llava_folder(folder / "_small", "clip", "llama", image_size=224, patch_size=16)
    config = json.loads((small / "config.json").read_text())
    config["text_config"].update(TINYLLAMA)
    config["vision_config"].update(TOWER)
    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig.from_dict(config))
    generator = torch.Generator().manual_seed(0)
    shard, shards, index, size = {}, [], {}, 0

    def flush() -> None:
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, str(folder / name))
        index.update({key: name for key in shard})
        shards.append(name)
        shard.clear()

    for name, tensor in model.state_dict().items():
        shard[name] = (torch.randn(tensor.shape, generator=generator) * 0.02).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if sum(t.numel() for t in shard.values()) * 2 > 1 << 30:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                     "weight_map": index}))
    (folder / "config.json").write_text(json.dumps(config))
    for item in small.iterdir():
        if item.name not in ("config.json", "model.safetensors"):
            (folder / item.name).write_bytes(item.read_bytes())


def run_path(path: str, folder: Path, work: Path) -> dict:
    """One path in this process: the model the exporter traces, built from the folder."""
    started = time.perf_counter()
    if path == "memory":
        from vledge.hf.llava import llava_checkpoint

        checkpoint = llava_checkpoint(folder)
    else:
        from vledge.checkpoint import load_checkpoint
        from vledge.hf.llava import convert_llava

        convert_llava(folder, work / "ckpt.pt")
        checkpoint = load_checkpoint(work / "ckpt.pt")
    model = checkpoint.build_model()
    parameters = sum(p.numel() for p in model.parameters())
    written = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
    return {"path": path, "parameters": parameters, "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "disk_written_gib": round(written / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--path", choices=["memory", "checkpoint"])
    args = parser.parse_args()
    folder = args.out / "folder"
    if args.path:
        work = args.out / f"work-{args.path}"
        work.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run_path(args.path, folder, work)))
        return
    if not (folder / "model.safetensors.index.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        build_folder(folder)
    on_disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"folder {folder}: {on_disk / 2**30:.2f} GiB of bfloat16 safetensors; load {os.getloadavg()}")
    for path in ("memory", "checkpoint"):
        done = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--path", path],
                              capture_output=True, text=True)
        print(done.stdout.strip() or done.stderr[-2000:])


if __name__ == "__main__":
    main()
