"""Tokenizer round trip and the prompt encoding's loss mask."""

from __future__ import annotations

import pytest

from vledge.config import PromptTemplate
from vledge.data.records import Turn
from vledge.errors import TokenizerError
from vledge.prompt import encode_conversation, prefix_ids, question_ids
from vledge.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXTS = ["How many objects are there?", " 3", "What color is the circle?", " red", "a red circle and a blue square"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS * 20, vocab_size=300)


@pytest.mark.parametrize("text", [
    "What color is the circle?",
    "  leading spaces and\ttabs\nnewlines ",
    "unseen words: zebra quokka, ünïcödé, 東京, emoji 🚲",
    "",
])
def test_round_trip_is_exact_for_any_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_are_distinct_and_survive_json(tokenizer):
    ids = tokenizer.special_tokens()
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    again = Tokenizer.from_json(tokenizer.to_json())
    assert again.special_tokens() == ids
    assert again.encode("a red circle") == tokenizer.encode("a red circle")
    assert tokenizer.decode([ids["bos"], *tokenizer.encode("red"), ids["eos"]]) == "red"


def test_bad_tokenizers_are_refused(tmp_path):
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_json("{ not json")
    with pytest.raises(TokenizerError, match="vocab_size"):
        Tokenizer.train(TEXTS, vocab_size=100)
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer.from_file(tmp_path / "missing.json")
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    with pytest.raises(TokenizerError, match="special token"):
        Tokenizer(HF(models.BPE()))


def test_targets_cover_exactly_the_answers_and_their_eos(tokenizer):
    template = PromptTemplate()
    turns = [Turn("How many objects are there?", "3", "count"), Turn("What color is the circle?", "red", "color")]
    encoded = encode_conversation(tokenizer, template, turns)
    assert encoded.ids.count(tokenizer.image_id) == 1
    targets = [i for i, t in zip(encoded.ids, encoded.target) if t]
    eos_positions = [k for k, i in enumerate(targets) if i == tokenizer.eos_id]
    assert len(eos_positions) == 2
    first, second = targets[: eos_positions[0]], targets[eos_positions[0] + 1: eos_positions[1]]
    assert tokenizer.decode(first).strip() == "3"
    assert tokenizer.decode(second).strip() == "red"
    # nothing of the questions or the template is a target
    assert not any(t for i, t in zip(encoded.ids, encoded.target) if i == tokenizer.image_id)


def test_question_ids_are_the_conversation_prefix(tokenizer):
    template = PromptTemplate()
    turn = Turn("What color is the circle?", "red")
    full = encode_conversation(tokenizer, template, [turn]).ids
    asked = question_ids(tokenizer, template, turn.question)
    assert full[: len(asked)] == asked
    assert asked[: len(prefix_ids(tokenizer, template))] == prefix_ids(tokenizer, template)
    assert asked[len(prefix_ids(tokenizer, template))] == tokenizer.image_id
