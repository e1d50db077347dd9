"""Static int8 QDQ of a CLIP vision tower + LLaVA projector: drift and speed against fp32.

Builds a random-weight CLIP tower (default ViT-B/16 at 224 px, features of layer -2, the
default select strategy, a projector to 2048) with vledge's own modules, exports it as
`vledge export` does (TorchScript exporter, basic optimisation), makes the int8 variant the
export makes (static QDQ, per-channel, calibrated on preprocessed photos), then compares the two
on held-out photos (scikit-image's samples, cropped differently) and times one image at 1 and 2
threads. Random weights are not a trained tower's activations: read the drift as a lower bound
of what a real tower sees, and measure a real fine-tune with `vledge export` itself.

    python benchmarks/vit_int8.py [--hidden 768 --layers 12 --heads 12 --image-size 224 --patch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def photos(size: int) -> np.ndarray:
    """Preprocessed crops of scikit-image's sample photos ([N, 3, S, S], CLIP's spec)."""
    from skimage import data

    from vledge.hf.image_processor import preprocess_spec_from_hf
    from vledge.runtime.preprocess import ImagePreprocessor

    spec = preprocess_spec_from_hf({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size},
                                    "crop_size": {"height": size, "width": size}})
    pre = ImagePreprocessor(spec)
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field",
                 "colorwheel"):
        image = getattr(data, name)()
        h, w = image.shape[:2]
        for top, left in ((0, 0), (h // 4, w // 4), (h // 3, 0), (0, w // 3)):
            crop = np.ascontiguousarray(image[top:, left:])
            out.append(pre.preprocess(crop, channel_order="RGB"))
    return np.stack(out)


def median_ms(session, feed: dict, runs: int) -> tuple[float, float]:
    session.run(None, feed)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times)), float(np.percentile(times, 90))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--lm-hidden", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from torch import nn

    from vledge.config import ProjectorConfig, ViTConfig
    from vledge.export import optimize, quantize
    from vledge.export.graphs import _export
    from vledge.models.projector import build_projector
    from vledge.models.vit import VisionTransformer

    torch.manual_seed(0)
    vit = ViTConfig(family="clip", hidden=args.hidden, layers=args.layers, heads=args.heads,
                    intermediate=4 * args.hidden, patch_size=args.patch, image_size=args.image_size)
    tower = nn.Sequential(VisionTransformer(vit), build_projector(ProjectorConfig("mlp2x_gelu"), vit.out_features,
                                                                  args.lm_hidden)).eval()
    pixels = photos(args.image_size)
    calibration, held_out = pixels[::2], pixels[1::2]
    with tempfile.TemporaryDirectory() as work:
        raw, fp32, int8 = (Path(work) / f"{name}.onnx" for name in ("raw", "fp32", "int8"))
        with torch.no_grad():
            _export(tower, (torch.randn(2, 3, args.image_size, args.image_size),), raw, ["pixel_values"],
                    ["image_embeds"], {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}, opset=17)
        optimize.optimize_component("vision_encoder", raw, fp32)
        quantize.quantize_component("vision_encoder", "int8", fp32, int8, calibration=calibration,
                                    options=quantize.QuantizeOptions())
        sizes = {name: path.stat().st_size for name, path in (("fp32", fp32), ("int8", int8))}
        outputs, timing = {}, {}
        for name, path in (("fp32", fp32), ("int8", int8)):
            for threads in (1, 2):
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                if threads == 1:
                    outputs[name] = np.concatenate([session.run(None, {"pixel_values": held_out[i:i + 1]})[0]
                                                    for i in range(len(held_out))])
                timing[f"{name}_{threads}t"] = median_ms(session, {"pixel_values": held_out[:1]}, args.runs)
    with torch.no_grad():
        torch_out = tower(torch.from_numpy(held_out)).numpy()
    ref, q = outputs["fp32"], outputs["int8"]
    cosine = (ref * q).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(q, axis=-1))
    report = {
        "tower": f"CLIP hidden {args.hidden}, {args.layers} layers (feature layer -2: {args.layers - 1} run), "
                 f"{args.image_size} px / {args.patch}: {vit.num_tokens} tokens, projector to {args.lm_hidden}",
        "held_out_images": len(held_out), "calibration_images": len(calibration),
        "fp32_vs_torch_max_abs": float(np.abs(ref - torch_out).max()),
        "int8_vs_fp32": {"max_abs": float(np.abs(q - ref).max()), "mean_abs": float(np.abs(q - ref).mean()),
                         "mean_abs_ref": float(np.abs(ref).mean()), "cosine_min": float(cosine.min()),
                         "cosine_mean": float(cosine.mean())},
        "latency_ms_median_p90": timing, "file_bytes": sizes, "loadavg": os.getloadavg(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
