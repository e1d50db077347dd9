"""A pretrained LM's chat template (jinja) rendered once into vledge's plain prompt pieces.

vledge's prompt layout is ``[bos] system user <image>\\n question assistant answer eos
turn_separator user ...``. Rendering the template with marker contents and cutting the text at the
markers gives those pieces as plain strings, so training shows an instruct LM the format it was
tuned on while the manifest, and so the runtime, needs neither jinja nor the template.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from vledge.config import PromptTemplate
from vledge.errors import ConfigError

log = logging.getLogger(__name__)

USER_1, ANSWER_1, USER_2, ANSWER_2 = "VLEDGEQUESTIONONE", "VLEDGEANSWERONE", "VLEDGEQUESTIONTWO", "VLEDGEANSWERTWO"


@dataclass(frozen=True)
class ChatPieces:
    prompt: PromptTemplate
    eos_token: str  # the token that ends an assistant turn (the runtime stops on it)
    uses_bos: bool  # the rendered conversation starts with the bos token


def render(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
           bos_token: str, eos_token: str) -> str:
    """The template's text for ``messages``, in the sandbox transformers renders chat templates in."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return environment.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
            eos_token=eos_token,
        )
    except TemplateError as exc:
        raise ConfigError(f"the chat template cannot render a plain user/assistant conversation: {exc}") from None


def chat_pieces(template: str, bos_token: str, eos_token: str, special_tokens: Sequence[str]) -> ChatPieces:
    """Cut a rendered two-turn conversation into vledge's pieces; ConfigError if its layout differs.

    ``special_tokens`` are the tokenizer's special token texts: the first one after an answer is
    the end-of-turn token, whatever follows it before the next user header is the turn separator.
    """
    def turn(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    opened = render(template, [turn("user", USER_1)], True, bos_token, eos_token)
    full = render(template, [turn("user", USER_1), turn("assistant", ANSWER_1), turn("user", USER_2),
                             turn("assistant", ANSWER_2)], False, bos_token, eos_token)
    for marker in (USER_1, ANSWER_1, USER_2, ANSWER_2):
        if full.count(marker) != 1:
            raise ConfigError(f"the chat template does not show each message once (marker {marker!r})")
    if opened.count(USER_1) != 1:
        raise ConfigError("the chat template's generation prompt does not show the question once")
    head, assistant = opened.split(USER_1)
    if not full.startswith(head + USER_1 + assistant + ANSWER_1):
        raise ConfigError("the chat template's generation prompt differs from its rendered conversation")
    between = full[full.index(ANSWER_1) + len(ANSWER_1):full.index(USER_2)]
    tail = full[full.index(ANSWER_2) + len(ANSWER_2):]
    end = next((token for token in sorted(special_tokens, key=len, reverse=True) if token and tail.startswith(token)),
               None)
    if end is None:
        raise ConfigError(f"the chat template does not end an answer with a special token (it writes {tail!r})")
    if not between.startswith(tail):
        raise ConfigError("the chat template ends the last answer differently from the others")
    user = between[len(tail):]
    if not user or not head.endswith(user):
        raise ConfigError("the chat template's first user header differs from the later ones")
    system = head[:len(head) - len(user)]
    uses_bos = bool(bos_token) and system.startswith(bos_token)
    if uses_bos:
        system = system[len(bos_token):]
    if not full.startswith((bos_token if uses_bos else "") + system + user):
        raise ConfigError("the chat template's conversation does not start with its system piece")
    prompt = PromptTemplate(system=system, user=user, assistant=assistant, answer_prefix="",
                            image_separator="\n", turn_separator=tail[len(end):])
    return ChatPieces(prompt=prompt, eos_token=end, uses_bos=uses_bos)
