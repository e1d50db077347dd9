"""Gradient checkpointing in the torch LMs, and a batch that fits the memory a pretrained-LM run finds."""

from __future__ import annotations

import logging

import pytest
import torch

from vledge.config import TrainConfig, language_config
from vledge.errors import TrainingError
from vledge.training.memory import HEADROOM, available_bytes, fit_batch, plan_batch, training_bytes


def _lm(kind: str):
    from vledge.models.llama import LlamaLM
    from vledge.models.transformer import TransformerLM

    if kind == "llama":
        config = language_config("llama", hidden=32, layers=3, heads=4, kv_heads=2, intermediate=48,
                                max_positions=64, vocab_size=50)
        return LlamaLM(config)
    return TransformerLM(language_config("transformer", hidden=32, layers=3, heads=4, max_positions=64,
                                        vocab_size=50, dropout=0.1))


def _loss_and_grads(lm, embeds, checkpointing: bool):
    lm.gradient_checkpointing = checkpointing
    lm.zero_grad(set_to_none=True)
    embeds = embeds.clone().requires_grad_(True)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    positions = torch.arange(embeds.shape[1])[None].expand(embeds.shape[0], -1)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    torch.manual_seed(3)  # the same dropout masks both times
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits, _ = lm(embeds, mask, positions)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.arange(logits.shape[:2].numel()) % 50)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in lm.named_parameters()}
    return float(loss.detach()), grads, embeds.grad.clone(), sum(saved)


@pytest.mark.parametrize("kind", ["llama", "transformer"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients_with_less_kept(kind):
    torch.manual_seed(0)
    lm = _lm(kind).train()
    embeds = torch.randn(2, 12, 32)
    loss, grads, input_grad, kept = _loss_and_grads(lm, embeds, checkpointing=False)
    loss_c, grads_c, input_grad_c, kept_c = _loss_and_grads(lm, embeds, checkpointing=True)
    assert loss_c == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(input_grad_c, input_grad, rtol=1e-5, atol=1e-6)
    assert kept_c < kept / 2  # only each layer's inputs stay for the backward pass


def test_the_memory_the_machine_has_is_read_from_meminfo(tmp_path):
    assert available_bytes(torch.device("cpu")) > 0
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8000000 kB\nMemFree:         100 kB\nMemAvailable:    2000000 kB\n")
    assert available_bytes(torch.device("cpu"), meminfo) == 2000000 * 1024
    meminfo.write_text("garbage")
    assert available_bytes(torch.device("cpu"), meminfo) is None


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from conftest import tiny_configs
    from hf_folders import make_lm_folder
    from vledge.hf.language_model import load_pretrained_lm
    from vledge.models.vlm import VisionLanguageModel
    from vledge.training.pretrained_lm import with_language_model

    lm = load_pretrained_lm(make_lm_folder(tmp_path_factory.mktemp("lm") / "lm", "llama"))
    model_config = with_language_model(tiny_configs()[0], lm)
    return VisionLanguageModel(model_config, image_token_id=lm.tokenizer.image_id), model_config.language


def test_a_batch_that_does_not_fit_is_lowered_with_the_same_examples_per_step(pretrained, caplog):
    model, language = pretrained
    config = TrainConfig(batch_size=32, grad_accum=1)
    assert fit_batch(model, language, config, 80, False, True, torch.device("cpu"), available=10 ** 15) == config
    fits_8 = training_bytes(model, language, 8, 80, False, True)
    assert fits_8 < training_bytes(model, language, 16, 80, False, True)
    with caplog.at_level(logging.WARNING):
        lowered = fit_batch(model, language, config, 80, False, True, torch.device("cpu"),
                            available=int(fits_8 / HEADROOM) + 1)
    assert (lowered.batch_size, lowered.grad_accum) == (8, 4)
    assert any("training at batch 8 with 4 accumulation steps" in r.getMessage() for r in caplog.records)


def test_checkpointing_and_a_frozen_lm_need_less(pretrained):
    model, language = pretrained
    full = training_bytes(model, language, 8, 80, False, True)
    assert training_bytes(model, language, 8, 80, True, True) < full
    assert training_bytes(model, language, 8, 80, False, False) < full


def test_a_run_that_cannot_fit_one_example_is_refused_before_it_starts(pretrained):
    model, language = pretrained
    with pytest.raises(TrainingError, match=r"at batch 1 .*GB available; try --gradient-checkpointing"):
        plan_batch(model, language, TrainConfig(batch_size=4), 80, False, True, available=1000)


def test_prepare_run_turns_checkpointing_on_and_fits_the_batch(synth_data, tmp_path):
    from conftest import tiny_configs
    from hf_folders import make_lm_folder
    from vledge.training.run_options import RunOptions
    from vledge.training.setup import prepare_run

    folder = make_lm_folder(tmp_path / "lm", "llama")
    model_config, train_config = tiny_configs(max_steps=2)
    prepared = prepare_run(synth_data, tmp_path / "run", model_config, train_config,
                           RunOptions(language_model=folder, gradient_checkpointing=True))
    assert prepared.model.language.gradient_checkpointing is True
    assert prepared.train_config.batch_size * prepared.train_config.grad_accum >= train_config.batch_size
