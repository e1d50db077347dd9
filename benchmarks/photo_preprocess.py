"""A 12-megapixel JPEG to 224 px: the runtime's exact and reduced-scale preprocessing against training's.

    python benchmarks/photo_preprocess.py [--photo PATH] [--repeats 5]

Writes a synthetic 4000 x 3000 JPEG (quality 90) to ``--photo`` if it does not exist. Times, one
thread each and interleaved: ``ImagePreprocessor(spec)`` (exact), ``ImagePreprocessor(spec,
reduced_jpeg=True)`` and training's ``vledge.data.images.preprocess``; prints the medians in ms and the
mean difference from training's pixels in grey levels for each libjpeg scale (1/2, 1/4, 1/8).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photo", type=Path, default=Path("photo12mp.jpg"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not args.photo.exists():
        rng = np.random.default_rng(0)
        coarse = (rng.random((300, 400, 3)) * 255).astype(np.uint8)
        big = cv2.GaussianBlur(cv2.resize(coarse, (4000, 3000), interpolation=cv2.INTER_CUBIC), (0, 0), 3)
        big = big + (rng.random(big.shape) * 20).astype(np.uint8)
        cv2.imwrite(str(args.photo), big, [cv2.IMWRITE_JPEG_QUALITY, 90])

    import torch

    from vledge.config import PreprocessSpec
    from vledge.data.images import preprocess as training_preprocess
    from vledge.runtime.preprocess import ImagePreprocessor

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    spec = PreprocessSpec(image_size=224, resize="shortest_edge_center_crop", interpolation="bilinear",
                          mean=(0.5,) * 3, std=(0.5,) * 3, channel_order="RGB")
    exact, reduced = ImagePreprocessor(spec), ImagePreprocessor(spec, reduced_jpeg=True)
    calls = {"exact": lambda: exact(args.photo), "reduced": lambda: reduced(args.photo),
             "training": lambda: training_preprocess(args.photo, spec).numpy()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for name, call in calls.items():
            tick = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - tick) * 1e3)
    reference = calls["training"]()
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    data = np.fromfile(str(args.photo), np.uint8)
    levels = {"exact": float((np.abs(calls["exact"]() - reference) * std * 255).mean())}
    for factor, flag in ((2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4),
                         (8, cv2.IMREAD_REDUCED_COLOR_8)):
        rgb = cv2.imdecode(data, flag)[:, :, ::-1].copy()
        pixels = exact.normalize(exact.resize_and_crop(rgb))
        levels[f"1/{factor}"] = float((np.abs(pixels - reference) * std * 255).mean())
    print(json.dumps({"loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                      "median_ms": {k: round(float(np.median(v)), 1) for k, v in times.items()},
                      "mean_grey_levels_from_training": {k: round(v, 3) for k, v in levels.items()}}, indent=1))


if __name__ == "__main__":
    main()
