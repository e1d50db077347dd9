"""Vision pretraining on the synthetic scenes' own labels, and its weights in a VLM run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import tiny_configs
from vledge.errors import DataError, WeightsError
from vledge.models.vision import VisionEncoder, load_vision_weights
from vledge.training.trainer import RunOptions, Trainer, length_pieces, prepare_run, train
from vledge.training.vision_pretrain import HEADS, VisionPretrainConfig, cell_targets, pretrain_vision


def test_cell_targets_follow_the_scene():
    scene = {"grid": 3, "word": "cat", "word_cell": [2, 2], "objects": [
        {"shape": "star", "color": "red", "size": "large", "row": 0, "col": 1},
        {"shape": "circle", "color": "blue", "size": "small", "row": 1, "col": 1},
    ]}
    t = cell_targets(scene, 3)
    empty = {name: len(classes) for name, classes in HEADS.items()}
    assert t["shape"].tolist() == [empty["shape"], HEADS["shape"].index("star")] + [empty["shape"]] * 2 + [
        HEADS["shape"].index("circle")] + [empty["shape"]] * 4
    assert t["color"][1] == HEADS["color"].index("red") and t["color"][4] == HEADS["color"].index("blue")
    assert t["size"][1] == HEADS["size"].index("large") and t["size"][4] == HEADS["size"].index("small")
    assert t["word"][8] == HEADS["word"].index("cat") and (t["word"][:8] == empty["word"]).all()
    with pytest.raises(DataError):
        cell_targets({"objects": [{"row": 0}]}, 3)


@pytest.mark.slow
def test_pretrained_weights_load_into_the_encoder_and_a_run(synth_data, tmp_path):
    model_config, train_config = tiny_configs(max_steps=4, eval_every=100, eval_samples=0)
    out = tmp_path / "vision.pt"
    seen = []
    result = pretrain_vision(synth_data, out, model_config, VisionPretrainConfig(steps=30, batch_size=16, threads=1, log_every=10),
                             on_progress=lambda step, total, row: seen.append(step))
    assert result.steps == 30 and seen == [1, 10, 20, 30] and out.is_file()
    assert set(result.accuracy) >= {"color", "shape", "size"}
    payload = torch.load(out, weights_only=True)
    assert payload["steps"] == 30 and payload["vision_config"]["widths"] == list(model_config.vision.widths)

    encoder = VisionEncoder(model_config.vision)
    load_vision_weights(encoder, out)
    for key, value in encoder.backbone.state_dict().items():
        assert torch.equal(value, payload["state_dict"][key]), key

    trainer = Trainer(prepare_run(synth_data, tmp_path / "run", model_config, train_config,
                                  RunOptions(vision_weights=out, freeze=("vision", "projector"))))
    for key, value in trainer.model.projector.state_dict().items():
        assert torch.equal(value, payload["projector_state_dict"][key]), key
    frozen = {k: v.clone() for k, v in trainer.model.state_dict().items() if k.startswith(("vision.", "projector."))}
    assert trainer.run().steps == 4
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # BatchNorm statistics included

    other = dataclasses.replace(model_config, language=dataclasses.replace(model_config.language, hidden=64))
    with pytest.raises(WeightsError, match="projector"):
        prepare_run(synth_data, tmp_path / "run2", other, train_config, RunOptions(vision_weights=out))


def test_pretraining_needs_scene_labels(tmp_path):
    model_config, _ = tiny_configs()
    (tmp_path / "train.json").write_text(json.dumps([{"id": "1", "image": "a.jpg", "conversations": []}]))
    with pytest.raises(DataError, match="scene labels"):
        pretrain_vision(tmp_path, tmp_path / "w.pt", model_config)
    with pytest.raises(DataError, match="synthetic"):
        pretrain_vision(tmp_path / "missing", tmp_path / "w.pt", model_config)


def test_length_pieces_cut_only_when_padding_is_saved():
    assert length_pieces([20] * 32) == [list(range(32))]
    lengths = [20] * 28 + [80] * 4
    pieces = length_pieces(lengths)
    assert sorted(pieces[0]) == list(range(28)) and sorted(pieces[1]) == list(range(28, 32))
    assert length_pieces([20, 21, 22, 25]) == [[0, 1, 2, 3]]


@pytest.mark.slow
def test_split_batches_give_the_whole_batch_loss(synth_data, tmp_path):
    from vledge.data.dataset import collate

    model_config, train_config = tiny_configs(max_steps=2, eval_every=100, eval_samples=0, batch_size=24)
    trainer = Trainer(prepare_run(synth_data, tmp_path / "run", model_config, train_config))
    dataset = trainer._prepare_stage(len(trainer.prepared.stages) - 1).dataset
    long = sorted(range(len(dataset)), key=lambda i: -len(dataset[i].input_ids))[:3]
    examples = [dataset[i] for i in long] + [dataset[i] for i in range(21)]
    assert len(length_pieces([len(e.input_ids) - 1 + trainer.model.num_image_tokens for e in examples])) == 2
    trainer.model.eval()  # no dropout, BatchNorm in inference mode: both paths see the same function
    whole = trainer.model(**collate(examples, model_config.preprocess, trainer.tokenizer.pad_id)).loss
    split = trainer._batch_loss(examples)
    assert torch.allclose(whole, split, atol=1e-5), (whole, split)

    # training takes the same steps either way (BatchNorm sees the whole batch in both)
    no_split = dataclasses.replace(train_config, split_by_length=False, log_every=1)
    with_split = dataclasses.replace(train_config, log_every=1)
    losses = []
    for name, config in (("a", with_split), ("b", no_split)):
        run = train(synth_data, tmp_path / name, model_config, config)
        rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in rows if r["kind"] == "train"])
    assert len(losses[0]) == 2 and all(abs(x - y) < 1e-4 for x, y in zip(*losses)), losses


@pytest.mark.slow
def test_frozen_encoder_features_are_cached_and_train_like_encoding_every_step(synth_data, tmp_path, monkeypatch):
    import vledge.training.stage as stage_module

    model_config, train_config = tiny_configs(max_steps=3, eval_every=100, eval_samples=0, log_every=1)
    frozen = ("vision", "projector")
    trainer = Trainer(prepare_run(synth_data, tmp_path / "probe", model_config, train_config,
                                  RunOptions(freeze=frozen)))
    assert len(trainer.prepared.stages) == 2  # align, then instruct: both frozen
    trainer._prepare_stage(0)
    first = trainer.features
    dataset = trainer._prepare_stage(1).dataset
    assert trainer.features is first, "consecutive frozen stages share one computation"
    assert trainer.features is not None and trainer.features.tokens.shape[0] == len(trainer.prepared.train_images)
    trainer.model.eval()
    examples = [dataset[i] for i in range(12)]
    cached = trainer._batch_loss(examples)
    trainer.features = None
    encoded = trainer._batch_loss(examples)
    assert torch.allclose(cached, encoded, atol=1e-5), (cached, encoded)

    losses = []
    for name, cap in (("cached", stage_module.FEATURE_CACHE_LIMIT_BYTES), ("encoded", 0)):
        monkeypatch.setattr(stage_module, "FEATURE_CACHE_LIMIT_BYTES", cap)
        run = train(synth_data, tmp_path / name, model_config, train_config, RunOptions(freeze=frozen))
        rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in rows if r["kind"] == "train"])
    assert len(losses[0]) == 3 and all(abs(x - y) < 1e-4 for x, y in zip(*losses)), losses
    # a stage that trains the encoder never reads stale features
    trainer = Trainer(prepare_run(synth_data, tmp_path / "probe2", model_config, train_config))
    trainer._prepare_stage(len(trainer.prepared.stages) - 1)
    assert trainer.features is None
