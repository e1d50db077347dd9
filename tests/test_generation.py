"""One generation path: --ckpt (PyTorch) and --model (ONNX Runtime fp32) answer alike, limits and stop strings included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vledge.cli import main
from vledge.decoding import GenerationOptions
from vledge.errors import ConfigError, VledgeError

QUESTION = "How many shapes are there?"


def _image(synth_data: Path, index: int = 0) -> str:
    return str(sorted((synth_data / "images").rglob("*.jpg"))[index])


def _ask(engine_args: list[str], image: str, question: str, *extra: str):
    return CliRunner().invoke(main, ["ask", *engine_args, image, question, "--jsonl", *extra])


def _engines(tiny_run, tiny_model_dir) -> dict[str, list[str]]:
    return {"ckpt": ["--ckpt", str(tiny_run.best_checkpoint)],
            "model": ["--model", str(tiny_model_dir), "--precision", "fp32", "--provider", "cpu"]}


def _max_positions(model_dir: Path) -> int:
    return json.loads((model_dir / "vledge.json").read_text())["architecture"]["max_positions"]


def test_more_new_tokens_than_the_prompt_leaves_are_clamped_alike(tiny_run, tiny_model_dir, synth_data):
    """--max-new-tokens beyond the room the prompt leaves is lowered to that room, for both engines."""
    image = _image(synth_data, 3)
    limit = str(_max_positions(tiny_model_dir))  # fits the model, never the room after a prompt
    lines = {}
    for name, args in _engines(tiny_run, tiny_model_dir).items():
        result = _ask(args, image, QUESTION, "--max-new-tokens", limit)
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
        lines[name] = json.loads(result.stdout)
    assert lines["ckpt"]["token_ids"] == lines["model"]["token_ids"]
    assert lines["ckpt"]["text"] == lines["model"]["text"]
    assert lines["ckpt"]["finish_reason"] == lines["model"]["finish_reason"]


def test_more_new_tokens_than_the_model_has_positions_is_one_error_line(tiny_run, tiny_model_dir, synth_data):
    image = _image(synth_data, 3)
    for name, args in _engines(tiny_run, tiny_model_dir).items():
        result = _ask(args, image, QUESTION, "--max-new-tokens", "10000")
        assert result.exit_code == 1, (name, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.output, (name, lines)
        assert lines[0].startswith("Error: ConfigError: --max-new-tokens 10000"), (name, lines)
        assert str(_max_positions(tiny_model_dir)) in lines[0], (name, lines)


def test_a_question_that_leaves_no_room_is_one_error_line(tiny_run, tiny_model_dir, synth_data):
    image = _image(synth_data, 3)
    question = " ".join(["How many red squares are there in this picture?"] * 40)
    for name, args in _engines(tiny_run, tiny_model_dir).items():
        result = _ask(args, image, question)
        assert result.exit_code == 1, (name, result.output)
        assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, (name, result)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1, (name, lines)
        assert lines[0].startswith("Error: ConfigError:") and "leaves no room" in lines[0], (name, lines)


QUESTIONS = ("Describe the image briefly.", QUESTION, "What color is the circle?", "What is in this image?")


def _stop_in(text: str) -> str | None:
    """A character first seen after the text's first third, so a stop there cuts the text short."""
    for start in (max(1, len(text) // 3), 1):
        for at in range(start, len(text)):
            if text[at].strip() and text[at] not in text[:at]:
                return text[at]
    return None


def _check_stop(tiny_run, tiny_model_dir, synth_data, extra: tuple[str, ...]) -> tuple[int, int]:
    """Asks with a stop string cut from each plain answer; both engines must agree exactly.

    Returns how many answers were checked, and how many of them the stop string ended early."""
    from vledge.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(tiny_model_dir / "tokenizer.json")
    engines = _engines(tiny_run, tiny_model_dir)
    checked = shorter = 0
    for index in range(4):
        for question in QUESTIONS:
            image = _image(synth_data, index)
            plain = json.loads(_ask(engines["model"], image, question, *extra).stdout)
            stop = _stop_in(plain["text"])
            if stop is None:
                continue
            lines = {}
            for name, args in engines.items():
                result = _ask(args, image, question, "--stop", stop, *extra)
                assert result.exit_code == 0, result.output
                lines[name] = json.loads(result.stdout)
            assert lines["ckpt"]["token_ids"] == lines["model"]["token_ids"], (question, stop)
            assert lines["ckpt"]["text"] == lines["model"]["text"] == plain["text"][: plain["text"].find(stop)].strip()
            assert lines["ckpt"]["finish_reason"] == lines["model"]["finish_reason"] == "stop_string"
            ids = lines["model"]["token_ids"]
            assert stop in tokenizer.decode(ids) and stop not in tokenizer.decode(ids[:-1])
            assert ids == plain["token_ids"][: len(ids)]
            checked += 1
            shorter += len(ids) < len(plain["token_ids"])
    return checked, shorter


def test_stop_strings_give_the_same_text_and_tokens(tiny_run, tiny_model_dir, synth_data):
    """Both engines stop as soon as the text holds the stop string; ids end with the token that completed it."""
    # Sampling hot (one seed, the same token choice code) makes the tiny model's answers long enough to cut.
    checked, shorter = _check_stop(tiny_run, tiny_model_dir, synth_data,
                                   ("--max-new-tokens", "40", "--temperature", "2", "--seed", "0"))
    assert checked >= 4 and shorter >= 2


def test_beam_search_stop_strings_keep_tokens_through_the_stop(tiny_run, tiny_model_dir, synth_data):
    checked, _ = _check_stop(tiny_run, tiny_model_dir, synth_data, ("--num-beams", "3"))
    assert checked >= 1


def test_torch_and_runtime_engines_share_one_generate(tiny_run, tiny_model_dir, synth_data):
    """The PyTorch engine and the runtime are two implementations of vledge.generation.Engine."""
    from vledge.checkpoint import load_checkpoint
    from vledge.data.images import preprocess
    from vledge.generation import generate_from_pixels
    from vledge.models.generate import TorchEngine
    from vledge.prompt import CAPTION_PROMPT, question_ids
    from vledge.runtime import load

    checkpoint = load_checkpoint(tiny_run.best_checkpoint)
    torch_engine = TorchEngine(checkpoint.build_model().eval(), checkpoint.tokenizer())
    runtime = load(tiny_model_dir, precision="fp32", providers="cpu", threads=1)
    assert runtime.caption_prompt == CAPTION_PROMPT
    pixels = np.stack([preprocess(_image(synth_data, i), checkpoint.model_config.preprocess).numpy()
                       for i in range(3)])
    ids = [question_ids(runtime.tokenizer, runtime.manifest.prompt, q)
           for q in (CAPTION_PROMPT, QUESTION, "What color is the circle?")]
    options = GenerationOptions(max_new_tokens=12)
    ours = [r.to_dict() for r in generate_from_pixels(runtime, pixels, ids, options)]
    theirs = [r.to_dict() for r in generate_from_pixels(torch_engine, pixels, ids, options)]
    for a, b in zip(ours, theirs):
        assert (a["text"], a["token_ids"], a["finish_reason"]) == (b["text"], b["token_ids"], b["finish_reason"])
        assert b["timings"]["vision_ms"] > 0 and b["timings"]["prefill_ms"] > 0


def test_torch_side_raises_typed_errors(tiny_run):
    import torch

    from vledge.checkpoint import load_checkpoint
    from vledge.metrics import bleu4
    from vledge.models.generate import generate

    checkpoint = load_checkpoint(tiny_run.best_checkpoint)
    model, tokenizer = checkpoint.build_model().eval(), checkpoint.tokenizer()
    size = checkpoint.model_config.preprocess.image_size
    pixels = torch.zeros(1, 3, size, size)
    with pytest.raises(ConfigError, match="leaves no room"):
        generate(model, pixels, [[tokenizer.image_id] * 1 + [5] * 500], GenerationOptions(), tokenizer.eos_id,
                 tokenizer.pad_id)
    with pytest.raises(ConfigError, match="2 prompts for 1 images"):
        generate(model, pixels, [[tokenizer.image_id], [tokenizer.image_id]], GenerationOptions(), tokenizer.eos_id,
                 tokenizer.pad_id)
    with pytest.raises(ConfigError, match="exactly one image token"):
        generate(model, pixels, [[5, 6]], GenerationOptions(), tokenizer.eos_id, tokenizer.pad_id)
    with pytest.raises(VledgeError):
        bleu4(["a cat"], [])
