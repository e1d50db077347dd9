"""Fine-tuning a SmolVLM folder: convert it, ``vledge train --init`` with LoRA on LLaVA JSON, then export and run.

The data asks the colour of noisy single-colour pictures of several shapes (1 x 2, 2 x 1 and 2 x 2 tiles plus the
global view), so what the model learns is measurable: held-out answers go from never right to right.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from hf_idefics3_folders import make_idefics3_folder  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SHAPES = [(40, 80), (80, 40), (60, 60), (50, 100)]  # (height, width): 1 x 2, 2 x 1, 2 x 2, 1 x 2 tiles
QUESTION = "What color is it?"


def write_dataset(root: Path, train: int = 24, val: int = 6, seed: int = 0) -> Path:
    """LLaVA JSON (train.json, val.json on other images) over PNGs in ``root/images``."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    for split, count, offset in (("train", train, 0), ("val", val, train)):
        records = []
        for i in range(offset, offset + count):
            name = list(COLOURS)[i % 3]
            height, width = SHAPES[(i // 3) % len(SHAPES)]
            noise = rng.normal(0, 25, (height, width, 3))
            rgb = np.clip(np.array(COLOURS[name])[None, None] + noise, 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / "images" / f"{i}.png"), rgb[..., ::-1])
            records.append({"id": f"{split}-{i}", "image": f"images/{i}.png", "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": name}]})
        (root / f"{split}.json").write_text(json.dumps(records))
    return root


def val_records(data: Path):
    from vledge.data.loaders import load_records

    return load_records(data, split="val")[0]


def torch_answers(ckpt: Path, paths: list[str], max_new_tokens: int = 8):
    """The checkpoint's greedy answers to QUESTION about each image, through the PyTorch model."""
    from vledge.checkpoint import load_checkpoint
    from vledge.decoding import GenerationOptions
    from vledge.generation import generate_from_pixels
    from vledge.image_tiles import tiled_question, tiles_per_row
    from vledge.models.generate import TorchEngine
    from vledge.runtime.preprocess import ImagePreprocessor

    checkpoint = load_checkpoint(ckpt)
    config, tokenizer = checkpoint.model_config, checkpoint.tokenizer()
    tiles = [ImagePreprocessor(config.preprocess).tiles(path, "RGB") for path in paths]
    ids = [tiled_question(tokenizer, config.prompt, config.preprocess.tiles, QUESTION, [t]) for t in tiles]
    return generate_from_pixels(TorchEngine(checkpoint.build_model().eval(), tokenizer),
                                np.concatenate([t.pixel_values for t in tiles]), ids,
                                GenerationOptions(max_new_tokens=max_new_tokens),
                                tiles_per_row=tiles_per_row([[(t.rows, t.cols)] for t in tiles]))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    from click.testing import CliRunner

    from vledge.cli import main
    from vledge.hf.fusion_folders import convert_folder

    root = tmp_path_factory.mktemp("smolvlm-finetune")
    folder = make_idefics3_folder(root / "hf", kind="smolvlm", split=True)
    ckpt = convert_folder(folder, root / "ckpt.pt")
    data = write_dataset(root / "data")
    result = CliRunner().invoke(main, [
        "train", "--data", str(data), "--preset", "tiny", "--init", str(ckpt), "--lora", "4", "--max-steps", "30",
        "--eval-every", "30", "--threads", "2", "--device", "cpu", "--out", str(root / "run")])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(root=root, folder=folder, ckpt=ckpt, data=data, run=root / "run", rows=rows)


def test_a_lora_fine_tune_learns_the_colours_and_writes_a_plain_model(finetuned):
    from vledge.checkpoint import load_checkpoint
    from vledge.evaluation import evaluate

    losses = [row["loss"] for row in finetuned.rows if row["kind"] == "train"]
    assert losses[-1] < 0.5 * losses[0], losses

    before, after = load_checkpoint(finetuned.ckpt), load_checkpoint(finetuned.run / "ckpt.pt")
    records = val_records(finetuned.data)
    scores = [evaluate(ck.build_model(), ck.tokenizer(), ck.model_config, records).accuracy["overall"]
              for ck in (before, after)]
    assert scores[0] < 0.5 and scores[1] >= 5 / 6, scores  # held-out images, three colours
    eval_row = [row for row in finetuned.rows if row["kind"] == "eval"][-1]
    assert eval_row["accuracy"]["overall"] == scores[1]  # training's own evaluation saw the same

    # the adapters are merged: the same tensors as the converted folder, the language model's changed
    assert after.model_config == before.model_config
    assert after.state_dict.keys() == before.state_dict.keys()
    changed = {k for k in before.state_dict if not torch.equal(before.state_dict[k], after.state_dict[k])}
    assert any(k.startswith("language.") and k.endswith("q_proj.weight") for k in changed), sorted(changed)


def test_tiled_examples_expand_the_image_prompt_and_every_loss_path_agrees(finetuned, monkeypatch, caplog):
    """The training ids hold the image prompt the runtime asks with, no expanded token is a target, and the
    frozen-feature cache, the length pieces and tiles decoded again (a dataset over the cache limit) give the
    loss of one plain forward pass."""
    from vledge.checkpoint import load_checkpoint
    from vledge.data.dataset import ConversationDataset, cache_images, collate
    from vledge.data.loaders import load_records
    from vledge.data.records import LoadReport
    from vledge.image_tiles import tiled_question
    from vledge.models.vlm import IGNORE_INDEX
    from vledge.runtime.preprocess import ImagePreprocessor
    from vledge.training.stage import FrozenFeatures, pieces_loss, project_images

    checkpoint = load_checkpoint(finetuned.ckpt)
    config, tokenizer = checkpoint.model_config, checkpoint.tokenizer()
    model = checkpoint.build_model().eval()
    records = load_records(finetuned.data, split="train")[0][:8]
    images = cache_images(records, config.preprocess, LoadReport(source="test"))
    dataset = ConversationDataset(records, images, tokenizer, config.prompt, model.num_image_tokens, 512,
                                  tiles=config.preprocess.tiles)
    examples = dataset.examples
    assert {e.grid for e in examples} == {(1, 2), (2, 1), (2, 2)}
    for example, record in zip(examples, records):
        tiles = ImagePreprocessor(config.preprocess).tiles(str(record.image), "RGB")
        question = tiled_question(tokenizer, config.prompt, config.preprocess.tiles, QUESTION, [tiles])
        assert example.input_ids[:len(question)] == question
        assert all(label == IGNORE_INDEX for label in example.labels[:len(question)])
        answer = [label for label in example.labels if label != IGNORE_INDEX]
        assert tokenizer.decode(answer).strip() == record.turns[0].answer
        assert example.pixels.count == len(example.pixels.load()) == tiles.rows * tiles.cols + 1
        assert sum(1 for t in example.input_ids if t == tokenizer.image_id) == 4 * example.pixels.count

    with torch.no_grad():
        whole = model(**collate(examples, config.preprocess, tokenizer.pad_id)).loss
        keys = sorted(images)
        cached = FrozenFeatures(keys, project_images(model, images, keys, config.preprocess),
                                [images[k].count for k in keys])
        embeds = model.place_visual_tokens(cached.lookup([e.image for e in examples]))
        pieces = [[0, 2, 4, 6], [1, 3, 5, 7]]
        split = pieces_loss(model, examples, embeds, pieces, tokenizer.pad_id)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)

    import vledge.data.dataset

    monkeypatch.setattr(vledge.data.dataset, "CACHE_LIMIT_BYTES", 3 * 3 * 32 * 32 * 4)  # room for 4 tiles
    unheld = cache_images(records, config.preprocess, LoadReport(source="test"))
    assert "keeping only their grids" in caplog.text
    assert all(unheld[k].tiles is None and unheld[k].grid == images[k].grid for k in keys)
    again = ConversationDataset(records, unheld, tokenizer, config.prompt, model.num_image_tokens, 512,
                                tiles=config.preprocess.tiles).examples
    assert [e.input_ids for e in again] == [e.input_ids for e in examples]
    with torch.no_grad():
        assert torch.equal(model(**collate(again, config.preprocess, tokenizer.pad_id)).loss, whole)


def test_a_frozen_tower_run_trains_the_language_model_only(finetuned, tmp_path):
    from click.testing import CliRunner

    from vledge.checkpoint import load_checkpoint
    from vledge.cli import main

    result = CliRunner().invoke(main, [
        "train", "--data", str(finetuned.data), "--preset", "tiny", "--init", str(finetuned.ckpt), "--lora", "4",
        "--freeze", "vision", "--freeze", "projector", "--max-steps", "6", "--eval-every", "6", "--threads", "2",
        "--device", "cpu", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    before, after = load_checkpoint(finetuned.ckpt).state_dict, load_checkpoint(tmp_path / "run" / "ckpt.pt").state_dict
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"language"}, changed


def test_caption_ckpt_answers_with_the_fine_tuned_checkpoint(finetuned):
    from click.testing import CliRunner

    from vledge.cli import main

    paths = [str(r.image) for r in val_records(finetuned.data)]
    expected = torch_answers(finetuned.run / "ckpt.pt", paths)
    result = CliRunner().invoke(main, ["caption", "--ckpt", str(finetuned.run / "ckpt.pt"), "--question", QUESTION,
                                       "--max-new-tokens", "8", "--batch-size", "4", "--jsonl", *paths])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [r["image"] for r in records] == paths
    assert [r["text"] for r in records] == [e.text for e in expected]


def test_the_fine_tuned_model_exports_and_the_runtime_answers_as_pytorch(finetuned):
    """Needs an exporter that traces tiled models (the pixel-shuffle connector, tiled parity samples)."""
    import vledge.runtime
    from vledge.decoding import GenerationOptions
    from vledge.export import ExportOptions, export

    paths = [str(r.image) for r in val_records(finetuned.data)]
    expected = torch_answers(finetuned.run / "ckpt.pt", paths)
    assert [r.text.strip() for r in expected] == [list(COLOURS)[i % 3] for i in range(24, 30)]

    model_dir = finetuned.root / "model"
    export(finetuned.run / "ckpt.pt", model_dir, ExportOptions(quantize=("none",), data=finetuned.data,
                                                                parity_samples=6, calibration_samples=4))
    model = vledge.runtime.load(model_dir)
    answers = model.generate(paths, [QUESTION] * len(paths), GenerationOptions(max_new_tokens=8),
                             channel_order="RGB")
    assert [a.token_ids for a in answers] == [e.token_ids for e in expected]
    assert [a.text for a in answers] == [e.text for e in expected]
