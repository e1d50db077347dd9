"""What do a trained model's visual tokens know? A linear probe per grid cell.

    python benchmarks/probe_visual_tokens.py RUN/ckpt.pt DATA_DIR [--records 3000]

On vledge's synthetic data (3x3 scenes), fits a linear classifier on the frozen
visual tokens (before and after the projector) to predict each cell's colour and
shape, and reports accuracy on held-out images, over all cells and over occupied
cells only. Chance on occupied cells is 1/8 for colour and 1/5 for shape. Needs a
model whose visual tokens form the scene's 3x3 grid (the `small` preset).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vledge.checkpoint import load_checkpoint
from vledge.data.dataset import cache_images
from vledge.data.images import normalize
from vledge.data.loaders import load_records
from vledge.data.records import LoadReport
from vledge.data.synth import COLORS, SHAPES


def cell_labels(scene: dict, attribute: str, names: list[str]) -> np.ndarray:
    labels = np.full(9, len(names))  # the last class is "empty cell"
    for obj in scene["objects"]:
        labels[obj["row"] * 3 + obj["col"]] = names.index(obj[attribute])
    return labels


def probe(features: torch.Tensor, labels: torch.Tensor, classes: int, train: int) -> tuple[float, float]:
    torch.manual_seed(0)
    head = torch.nn.Linear(features.shape[-1], classes)
    optimizer = torch.optim.Adam(head.parameters(), 1e-2)
    for _ in range(400):
        index = torch.randint(0, train, (256,))
        loss = torch.nn.functional.cross_entropy(head(features[index]).reshape(-1, classes), labels[index].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        right = head(features[train:]).argmax(-1) == labels[train:]
    occupied = labels[train:] != classes - 1
    return float(right.float().mean()), float(right[occupied].float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--records", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoint = load_checkpoint(args.ckpt)
    model, spec = checkpoint.build_model(), checkpoint.model_config.preprocess
    records = load_records(args.data, "train")[0][: args.records]
    scenes = {r["id"]: r["scene"] for r in json.loads((args.data / "train.json").read_text())}
    cache = cache_images(records, spec, LoadReport("probe"))
    records = [r for r in records if str(r.image) in cache]
    with torch.no_grad():
        pixels = [normalize(torch.stack([cache[str(r.image)] for r in records[i:i + 200]]), spec)
                  for i in range(0, len(records), 200)]
        tokens = {"vision": torch.cat([model.vision(p) for p in pixels]),
                  "projected": torch.cat([model.encode_images(p) for p in pixels])}
    if tokens["vision"].shape[1] != 9:
        raise SystemExit(f"the model has {tokens['vision'].shape[1]} visual tokens, not the 3x3 grid this probe needs")
    train = int(len(records) * 0.8)
    for attribute, names in (("color", list(COLORS)), ("shape", list(SHAPES))):
        labels = torch.tensor(np.array([cell_labels(scenes[r.id], attribute, names) for r in records]))
        for where, features in tokens.items():
            overall, occupied = probe(features, labels, len(names) + 1, train)
            print(f"{attribute:<6} {where:<9} all cells {overall * 100:5.1f}%   occupied cells {occupied * 100:5.1f}%")


if __name__ == "__main__":
    main()
