"""Fusion model behaviour: the loss mask, KV-cached generation, batching, decoding strategies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vledge.config import VisionConfig, preset
from vledge.data.records import Turn
from vledge.decoding import GenerationOptions, TopK, TopP, RepetitionPenalty
from vledge.errors import ConfigError, WeightsError
from vledge.models.generate import generate
from vledge.models.vision import VisionEncoder, load_vision_weights
from vledge.models.vlm import IGNORE_INDEX, VisionLanguageModel
from vledge.prompt import encode_conversation, question_ids
from vledge.tokenizer import Tokenizer

torch.set_num_threads(1)
QUESTIONS = ["How many objects are there?", "What color is the circle?", "Where is the red square?"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = QUESTIONS + [" 3", " red", " top left", " a red circle and a blue square"]
    return Tokenizer.train(texts * 10, vocab_size=300)


def build(kind: str, tokenizer: Tokenizer, seed: int = 0) -> VisionLanguageModel:
    model_config, _ = preset(kind)
    model_config = dataclasses.replace(
        model_config, language=dataclasses.replace(model_config.language, vocab_size=tokenizer.vocab_size)
    )
    torch.manual_seed(seed)
    model = VisionLanguageModel(model_config, tokenizer.image_id)
    # random init gives near-uniform logits; scale the head so greedy choices are well separated
    with torch.no_grad():
        model.language.lm_head.weight.mul_(25)
    return model.eval()


def prompts_for(tokenizer, model, questions=QUESTIONS):
    return [question_ids(tokenizer, model.config.prompt, q) for q in questions]


@pytest.mark.parametrize("kind", ["tiny", "tiny-lstm"])
def test_loss_counts_answer_tokens_only(kind, tokenizer):
    model = build(kind, tokenizer).train()
    turns = [Turn("How many objects are there?", "3"), Turn("What color is the circle?", "red")]
    encoded = encode_conversation(tokenizer, model.config.prompt, turns)
    ids = torch.tensor([encoded.ids])
    labels = torch.tensor([[i if t else IGNORE_INDEX for i, t in zip(encoded.ids, encoded.target)]])
    pixels = torch.randn(1, 3, 32, 32)
    model.eval()
    out = model(pixels, ids, labels=labels)
    # recompute by hand: the merged sequence has the image token replaced by the visual tokens
    n_img = model.num_image_tokens
    image_at = encoded.ids.index(tokenizer.image_id)
    targets = [(k + n_img - 1, token) for k, (token, is_target) in enumerate(zip(encoded.ids, encoded.target))
               if is_target and k > image_at]
    manual = torch.stack([F.cross_entropy(out.logits[0, pos - 1], torch.tensor(tok)) for pos, tok in targets]).mean()
    torch.testing.assert_close(out.loss, manual)
    assert int((out.labels != IGNORE_INDEX).sum()) == sum(encoded.target)
    # changing a question token's label has no effect once it is masked
    poisoned = labels.clone()
    poisoned[0, 2] = 7
    assert not torch.equal(poisoned, labels)
    poisoned[0, 2] = IGNORE_INDEX
    torch.testing.assert_close(model(pixels, ids, labels=poisoned).loss, out.loss)


def test_merge_splices_each_rows_visual_tokens_where_its_image_token_is(tokenizer):
    model = build("tiny", tokenizer)
    n_img, hidden = model.num_image_tokens, model.config.language.hidden
    pad, image = tokenizer.pad_id, tokenizer.image_id
    # image token at different places; left padding, right padding, none
    rows = [[pad, pad, 5, image, 6, 7], [5, 6, image, 7, pad, pad], [image, 5, 6, 7, 8, 9]]
    masks = [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1] * 6]
    labels = [[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6, 7], [5, 6, IGNORE_INDEX, 7, 8, 9],
              [IGNORE_INDEX, 5, 6, 7, 8, 9]]
    image_embeds = torch.randn(3, n_img, hidden, requires_grad=True)
    merged = model.merge(torch.tensor(rows), image_embeds, torch.tensor(masks), torch.tensor(labels))
    text = model.embed_tokens(torch.tensor(rows))
    for r, ids in enumerate(rows):
        at = ids.index(image)
        want = torch.cat([text[r, :at], image_embeds[r], text[r, at + 1:]])
        torch.testing.assert_close(merged.inputs_embeds[r], want)
        assert merged.attention_mask[r].tolist() == masks[r][:at] + [1] * n_img + masks[r][at + 1:]
        assert merged.labels[r].tolist() == labels[r][:at] + [IGNORE_INDEX] * n_img + labels[r][at + 1:]
        real = [p for p, m in zip(merged.position_ids[r].tolist(), merged.attention_mask[r].tolist()) if m]
        assert real == list(range(len(real)))
    merged.inputs_embeds[1, 2:2 + n_img].sum().backward()  # row 1's visual tokens get their own gradient only
    assert torch.equal(image_embeds.grad[1], torch.ones(n_img, hidden))
    assert not image_embeds.grad[[0, 2]].any()
    with pytest.raises(ValueError, match="exactly one image token"):
        model.merge(torch.tensor([[5, 6, 7]]), image_embeds[:1])


def test_kv_cached_generation_equals_full_recomputation(tokenizer):
    model = build("tiny", tokenizer)
    pixels = torch.randn(3, 3, 32, 32)
    prompts = prompts_for(tokenizer, model)
    options = GenerationOptions(max_new_tokens=12)
    cached = generate(model, pixels, prompts, options, tokenizer.eos_id, tokenizer.pad_id)
    uncached = generate(model, pixels, prompts, options, tokenizer.eos_id, tokenizer.pad_id, use_cache=False)
    assert cached == uncached
    assert all(len(tokens) > 0 for tokens in cached)


@pytest.mark.parametrize("kind", ["tiny", "tiny-lstm"])
def test_padded_batch_equals_one_by_one(kind, tokenizer):
    model = build(kind, tokenizer)
    pixels = torch.randn(3, 3, 32, 32)
    prompts = prompts_for(tokenizer, model)
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths exercise the padding"
    options = GenerationOptions(max_new_tokens=10)
    batched = generate(model, pixels, prompts, options, tokenizer.eos_id, tokenizer.pad_id)
    single = [generate(model, pixels[i:i + 1], [prompts[i]], options, tokenizer.eos_id, tokenizer.pad_id)[0]
              for i in range(3)]
    assert batched == single


def test_sampling_is_reproducible_for_a_seed_and_top_k_1_is_greedy(tokenizer):
    model = build("tiny", tokenizer)
    pixels = torch.randn(2, 3, 32, 32)
    prompts = prompts_for(tokenizer, model)[:2]
    run = lambda **kw: generate(model, pixels, prompts, GenerationOptions(max_new_tokens=10, **kw),
                                tokenizer.eos_id, tokenizer.pad_id)
    hot = dict(temperature=5.0, top_p=0.95)
    assert run(seed=1, **hot) == run(seed=1, **hot)
    assert any(run(seed=s, **hot) != run(seed=1, **hot) for s in range(2, 6))
    assert run(temperature=1.0, top_k=1, seed=3) == run()


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(tokenizer):
    model = build("tiny", tokenizer)
    pixels = torch.randn(2, 3, 32, 32)
    prompts = prompts_for(tokenizer, model)[:2]

    def log_prob(row: int, tokens: list[int]) -> float:
        ids = torch.tensor([prompts[row] + tokens + [tokenizer.eos_id]])
        logits = model(pixels[row:row + 1], ids).logits[0].log_softmax(-1)
        start = len(prompts[row]) - 1 + model.num_image_tokens - 1
        return float(sum(logits[start + k, t] for k, t in enumerate(tokens + [tokenizer.eos_id])))

    options = dict(max_new_tokens=6)
    greedy = generate(model, pixels, prompts, GenerationOptions(**options), tokenizer.eos_id, tokenizer.pad_id)
    beams = generate(model, pixels, prompts, GenerationOptions(num_beams=4, length_penalty=0.0, **options),
                     tokenizer.eos_id, tokenizer.pad_id)
    one_beam = generate(model, pixels, prompts, GenerationOptions(num_beams=1, **options),
                        tokenizer.eos_id, tokenizer.pad_id)
    assert one_beam == greedy
    for row in range(2):
        if len(greedy[row]) < options["max_new_tokens"]:  # greedy finished with eos: comparable
            assert log_prob(row, beams[row]) >= log_prob(row, greedy[row]) - 1e-4


def test_logit_filters():
    logits = np.array([[1.0, 3.0, 2.0, 0.5]], dtype=np.float32)
    assert np.isfinite(TopK(2).apply(logits.copy(), [[]])).tolist() == [[False, True, True, False]]
    # probabilities ~ [0.086, 0.636, 0.234, 0.052]: p=0.7 keeps the two most likely
    assert np.isfinite(TopP(0.7).apply(logits.copy(), [[]])).tolist() == [[False, True, True, False]]
    assert np.isfinite(TopP(0.5).apply(logits.copy(), [[]])).tolist() == [[False, True, False, False]]
    penalised = RepetitionPenalty(2.0).apply(np.array([[2.0, -2.0, 1.0]]), [[0, 1]])
    assert penalised.tolist() == [[1.0, -4.0, 1.0]]
    with pytest.raises(ConfigError):
        GenerationOptions(top_p=0)
    with pytest.raises(ConfigError):
        GenerationOptions(num_beams=2, temperature=1.0)


@pytest.mark.parametrize("backbone,channels", [("resnet18", 512), ("mobilenet_v3_small", 576), ("efficientnet_b0", 1280)])
def test_torchvision_backbones_give_visual_tokens(backbone, channels):
    encoder = VisionEncoder(VisionConfig(backbone=backbone, token_grid=(2, 2))).eval()
    tokens = encoder(torch.randn(1, 3, 64, 64))
    assert tokens.shape == (1, 4, channels)
    assert encoder.num_tokens(64) == 4


def test_vision_weights_load_from_a_local_file_and_never_download(tmp_path, monkeypatch):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    encoder = VisionEncoder(VisionConfig(backbone="resnet18"))
    load_vision_weights(encoder, path)
    torch.testing.assert_close(encoder.backbone[0].weight, reference.conv1.weight)
    torch.testing.assert_close(encoder.backbone[7][1].conv2.weight, reference.layer4[1].conv2.weight)

    with pytest.raises(WeightsError, match="not found"):
        load_vision_weights(encoder, tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="cannot read"):
        load_vision_weights(encoder, tmp_path / "junk.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    named = VisionEncoder(VisionConfig(backbone="resnet18", pretrained="IMAGENET1K_V1"))
    with pytest.raises(WeightsError, match="not in the torch cache"):
        load_vision_weights(named)


def test_patch_shortcut_is_a_linear_path_from_each_patch_to_its_token():
    """The shortcut is linear in the pixels: a colour change inside one patch changes that token only."""
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(backbone="convnet", widths=(8, 16), patch_shortcut=True)).eval()
    assert encoder.num_tokens(16) == 16  # 16 px / stride 4 = 4x4 tokens
    image = torch.zeros(1, 3, 16, 16)
    recoloured = image.clone()
    recoloured[0, 0, 0:4, 0:4] = 1.0  # the top-left patch turns red
    with torch.no_grad():
        delta = encoder.backbone.patch(recoloured) - encoder.backbone.patch(image)
    changed = delta.abs().amax(dim=1)[0] > 1e-6
    assert changed[0, 0] and changed.sum() == 1
    plain = VisionEncoder(VisionConfig(backbone="convnet", widths=(8, 16)))
    assert plain.backbone.patch is None
    assert sum(p.numel() for p in encoder.parameters()) > sum(p.numel() for p in plain.parameters())
