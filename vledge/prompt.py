"""Turn conversations into token ids with the template; shared by training, export and runtime.

Each piece of the template is encoded on its own and the ids are concatenated, so
the tokens before the image are a constant prefix (the runtime caches their keys
and values) and the answer tokens are known exactly (the loss mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vledge.config import PromptTemplate
from vledge.data.records import Turn
from vledge.tokenizer import Tokenizer

# What ``caption`` asks when no question is given (the manifest records it as ``generation.caption_prompt``).
CAPTION_PROMPT = "Describe the image briefly."


@dataclass(frozen=True)
class EncodedPrompt:
    ids: list[int]
    # True where the token is part of an answer the model must learn to produce.
    target: list[bool]


def prefix_ids(tokenizer: Tokenizer, template: PromptTemplate) -> list[int]:
    """The constant tokens that precede the image placeholder."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return bos + tokenizer.encode(template.system) + tokenizer.encode(template.user)


def encode_conversation(
    tokenizer: Tokenizer,
    template: PromptTemplate,
    turns: Sequence[Turn],
    with_image: bool = True,
    generation_prompt: bool = False,
    images: int = 1,
) -> EncodedPrompt:
    """Ids of a whole conversation; with ``generation_prompt`` the last turn's answer is left open.

    With ``with_image`` the first turn starts with ``images`` image tokens, one per image, side by side.
    """
    ids = prefix_ids(tokenizer, template)
    target = [False] * len(ids)

    def add(piece: list[int], is_target: bool) -> None:
        ids.extend(piece)
        target.extend([is_target] * len(piece))

    for index, turn in enumerate(turns):
        if index > 0:
            add(tokenizer.encode(template.turn_separator + template.user), False)
        if index == 0 and with_image:
            add([tokenizer.image_id] * images + tokenizer.encode(template.image_separator), False)
        add(tokenizer.encode(turn.question) + tokenizer.encode(template.assistant), False)
        if generation_prompt and index == len(turns) - 1:
            break
        add(tokenizer.encode(template.answer_prefix + turn.answer) + [tokenizer.eos_id], True)
    return EncodedPrompt(ids=ids, target=target)


def question_ids(tokenizer: Tokenizer, template: PromptTemplate, question: str, with_image: bool = True,
                 images: int = 1) -> list[int]:
    """Ids that ask one question about ``images`` images (one image token each), ending where the answer begins."""
    turn = Turn(question=question, answer="")
    return encode_conversation(tokenizer, template, [turn], with_image=with_image, generation_prompt=True,
                               images=images).ids
