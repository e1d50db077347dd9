"""A pretrained LM's chat template (jinja) rendered once into vledge's plain prompt pieces.

vledge's prompt layout is ``[bos] system user <image>\\n question assistant answer eos
turn_separator user ...``. Rendering the template with marker contents and cutting the text at the
markers gives those pieces as plain strings, so training shows an instruct LM the format it was
tuned on while the manifest, and so the runtime, needs neither jinja nor the template.
"""

from __future__ import annotations

import logging
import time
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


MAX_TEMPLATE_CHARS = 100_000  # characters a chat template may write for one conversation
MAX_TEMPLATE_STEPS = 1_000_000  # loop iterations, calls and attribute lookups while rendering
MAX_TEMPLATE_SECONDS = 5.0  # wall time of one rendering
MAX_TEMPLATE_RANGE = 10_000  # the longest range() a template may loop over


class _Budget:
    """Steps and time left to one rendering; running out is a ConfigError, checked as the template runs."""

    def __init__(self) -> None:
        self.steps = 0
        self.deadline = time.monotonic() + MAX_TEMPLATE_SECONDS

    def tick(self) -> None:
        self.steps += 1
        if self.steps > MAX_TEMPLATE_STEPS:
            raise ConfigError(f"the chat template runs more than {MAX_TEMPLATE_STEPS} steps for one conversation")
        if not self.steps % 256 and time.monotonic() > self.deadline:
            raise ConfigError(f"the chat template takes more than {MAX_TEMPLATE_SECONDS:g} s to render")


def _environment(budget: _Budget):
    """jinja's immutable sandbox, as transformers renders chat templates, with every loop, call, lookup and
    arithmetic result counted or sized against ``budget``."""
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+"])

        def call(self, context, obj, *args, **kwargs):
            budget.tick()
            return super().call(context, obj, *args, **kwargs)

        def getattr(self, obj, attribute):
            budget.tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            budget.tick()
            return super().getitem(obj, argument)

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise SecurityError("the chat template raises a number to a power over 64")
            if operator == "*" and isinstance(right, int) and isinstance(left, (str, list)) or (
                    operator == "*" and isinstance(left, int) and isinstance(right, (str, list))):
                length = len(left) * right if isinstance(right, int) else len(right) * left
                if length > MAX_TEMPLATE_CHARS:
                    raise SecurityError(f"the chat template builds a value of {length} items")
            result = super().call_binop(context, operator, left, right)
            if isinstance(result, (str, list)) and len(result) > MAX_TEMPLATE_CHARS:
                raise SecurityError(f"the chat template builds a value of {len(result)} items")
            return result

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def bounded_range(*args):
        numbers = range(*args)
        if len(numbers) > MAX_TEMPLATE_RANGE:
            raise SecurityError(f"the chat template loops over range({len(numbers)}), over {MAX_TEMPLATE_RANGE}")
        for number in numbers:
            budget.tick()
            yield number

    environment = Bounded(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    environment.globals["range"] = bounded_range
    return environment


def render(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
           bos_token: str, eos_token: str) -> str:
    """The template's text for ``messages``, in the sandbox transformers renders chat templates in.

    Bounded: at most MAX_TEMPLATE_CHARS of output, MAX_TEMPLATE_STEPS steps, MAX_TEMPLATE_SECONDS, and
    ranges of MAX_TEMPLATE_RANGE; a template past a bound, or one that fails in any way (a TypeError, endless
    recursion), is a ConfigError.
    """
    budget = _Budget()
    pieces, length = [], 0
    try:
        compiled = _environment(budget).from_string(template)
        for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token):
            budget.tick()
            length += len(piece)
            if length > MAX_TEMPLATE_CHARS:
                raise ConfigError(f"the chat template writes more than {MAX_TEMPLATE_CHARS} characters for a "
                                  "two-turn conversation")
            pieces.append(piece)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError("the chat template cannot render a plain user/assistant conversation: it recurses "
                          "without end") from None
    except Exception as exc:  # noqa: BLE001 - jinja and the template's own code raise anything (TypeError, ...)
        raise ConfigError(f"the chat template cannot render a plain user/assistant conversation: "
                          f"{type(exc).__name__}: {exc}") from None
    return "".join(pieces)


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
