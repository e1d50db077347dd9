"""Which question forms the `small` language model learns, on frozen or oracle visual tokens.

Trains only the language side (token embeddings + transformer) of the `small` preset for a
fixed number of steps on the built-in synthetic data, reading the visual tokens from a cache
(a pretrained vision encoder + projector from `vledge pretrain-vision`, frozen) or, with
``--oracle``, from the scene labels themselves: one fixed random vector per colour, shape and
size, summed per cell. Then it answers validation questions by greedy generation and prints the
exact match per question form ("what colour is the S?", "how many S are there?", ...).

Oracle tokens carry every fact perfectly, so a question form that stays low with them is a
limit of the language model's learning, not of the vision encoder.

    vledge data synth --out data --size 20000
    vledge pretrain-vision --data data --out vision.pt
    python benchmarks/lookup_breakdown.py --data data --vision vision.pt --steps 2000 [--oracle]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from vledge.config import preset
from vledge.data.dataset import ConversationDataset, cache_images
from vledge.data.images import normalize
from vledge.data.loaders import load_records
from vledge.data.records import LoadReport
from vledge.data.synth import COLORS, SHAPES, SIZES
from vledge.evaluation import evaluate
from vledge.models.vision import load_vision_weights
from vledge.models.vlm import VisionLanguageModel
from vledge.tokenizer import Tokenizer
from vledge.training.schedule import learning_rate
from vledge.training.trainer import length_pieces, pieces_loss, project_images
from vledge.training.vision_pretrain import load_projector_weights

STRUCTURED = ("count", "color", "shape", "position")


def question_form(question: str) -> str:
    form = re.sub(r"\b(" + "|".join(COLORS) + r")\b", "C", question)
    form = re.sub(r"\b(circles|squares|triangles|diamonds|stars|" + "|".join(SHAPES) + r")\b", "S", form)
    return re.sub(r"(at the|on the|in) (?!the image)[a-z ]+\?$", "<place>?", form)


class OracleTokens:
    """Per-cell sums of fixed random vectors for colour, shape and size (plus "nothing here")."""

    def __init__(self, hidden: int, seed: int = 123) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.vocab = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}
        self.tables = {name: torch.randn(len(values) + 1, hidden, generator=generator)
                       for name, values in self.vocab.items()}

    def __call__(self, scene: dict) -> torch.Tensor:
        grid = int(scene.get("grid", 3))
        index = {name: [len(values)] * grid * grid for name, values in self.vocab.items()}
        for obj in scene["objects"]:
            cell = int(obj["row"]) * grid + int(obj["col"])
            for name, values in self.vocab.items():
                index[name][cell] = values.index(obj[name])
        return sum(self.tables[name][torch.tensor(index[name])] for name in self.tables) / len(self.tables) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--vision", type=Path, help="vledge pretrain-vision output (not needed with --oracle)")
    parser.add_argument("--oracle", action="store_true")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--questions", type=int, default=600, help="validation questions answered")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.oracle and args.vision is None:
        parser.error("--vision is required without --oracle")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model_config, train_config = preset("small")
    records, report = load_records(args.data, split="train")
    val_records, _ = load_records(args.data, split="val")
    template = model_config.prompt
    texts = [template.system, template.user, template.assistant]
    texts += [template.answer_prefix + t.answer for r in records for t in r.turns] + [t.question for r in records for t in r.turns]
    tokenizer = Tokenizer.train(texts, vocab_size=model_config.tokenizer_vocab_size)
    model_config = replace(model_config, language=replace(model_config.language, vocab_size=tokenizer.vocab_size))
    model = VisionLanguageModel(model_config, image_token_id=tokenizer.image_id)
    if not args.oracle:
        load_vision_weights(model.vision, args.vision)
        load_projector_weights(model.projector, args.vision)
    images = cache_images(records, model_config.preprocess, report)
    val_images = cache_images(val_records, model_config.preprocess, LoadReport(source="val"))
    keys = sorted(images)
    rows = {key: row for row, key in enumerate(keys)}
    model.eval()
    if args.oracle:
        oracle = OracleTokens(model_config.language.hidden)
        scenes = {}
        for split in ("train", "val"):
            for item in json.loads((args.data / f"{split}.json").read_text()):
                scenes[str(args.data / item["image"])] = item["scene"]
        tokens = torch.stack([oracle(scenes[key]) for key in keys])
        # evaluation encodes pixels: answer them with the oracle tokens of the same image
        by_pixels = {hashlib.sha1(normalize(px, model_config.preprocess).numpy().tobytes()).hexdigest():
                     oracle(scenes[key]) for key, px in val_images.items()}
        model.encode_images = lambda pixels: model.place_visual_tokens(torch.stack(
            [by_pixels[hashlib.sha1(p.numpy().tobytes()).hexdigest()] for p in pixels]))
    else:
        tokens = project_images(model, images, keys, model_config.preprocess)
    dataset = ConversationDataset(records, images, tokenizer, template, model.num_image_tokens,
                                  train_config.max_seq_len, report, train_config.turns_per_example)
    for p in list(model.vision.parameters()) + list(model.projector.parameters()):
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.05},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98))

    def loss_of(examples) -> torch.Tensor:
        image_embeds = model.place_visual_tokens(tokens[[rows[e.image] for e in examples]])
        pieces = length_pieces([len(e.input_ids) - 1 + model.num_image_tokens for e in examples])
        return pieces_loss(model, examples, image_embeds, pieces, tokenizer.pad_id)

    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(dataset))
    model.train()
    started = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.lr, step, train_config.warmup_steps, step / args.steps, 0.05)
        start = (step * args.batch_size) % (len(order) - args.batch_size)
        loss = loss_of([dataset[int(i)] for i in order[start:start + args.batch_size]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % 250 == 0:
            print(f"step {step + 1}: loss {float(loss.detach()):.4f}", flush=True)
    print(f"{args.steps} steps in {time.perf_counter() - started:.0f} s ({'oracle' if args.oracle else 'pretrained'} tokens)")

    result = evaluate(model, tokenizer, model_config, val_records, limit=args.questions, images=val_images)
    total, right = collections.Counter(), collections.Counter()
    for prediction in result.predictions:
        if prediction.task in STRUCTURED:
            form = question_form(prediction.question)
            total[form] += 1
            right[form] += prediction.correct
    pooled = sum(right.values()) / max(sum(total.values()), 1)
    print(f"structured exact match {100 * pooled:.1f}% over {sum(total.values())} questions")
    for form in sorted(total, key=lambda f: -total[f]):
        print(f"  {form:40s} {total[form]:4d}  {100 * right[form] / total[form]:5.1f}%")


if __name__ == "__main__":
    main()
