"""A LLaVA processor's chat template (jinja, messages with image and text parts) -> vledge's prompt pieces.

The template is rendered once, at conversion time, with marker texts; cutting the result at the
markers gives ``system``, ``user``, the text between the image and the question, ``assistant``,
the answer prefix and the turn separator as plain strings, so the runtime needs no jinja.
Templates written for transformers may use its ``{% generation %}`` block; it renders its body.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from vledge.config import PromptTemplate
from vledge.errors import ConfigError, DataError
from vledge.reads import read_json

log = logging.getLogger(__name__)

QUESTION_1, ANSWER_1, QUESTION_2, ANSWER_2 = "VLEDGEQUESTIONONE", "VLEDGEANSWERONE", "VLEDGEQUESTIONTWO", "VLEDGEANSWERTWO"


def find_chat_template(folder: Path) -> str | None:
    """The processor's chat template: chat_template.jinja, chat_template.json, processor or tokenizer config."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            template = read_json(path, error=DataError, what="processor file").get("chat_template")
        except (DataError, AttributeError):
            continue
        if isinstance(template, str) and template:
            return template
    return None


def _render(template: str, messages: list[dict], add_generation_prompt: bool, bos_token: str, eos_token: str) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` marks assistant text; here it just renders."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock])
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return environment.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                        bos_token=bos_token, eos_token=eos_token)
    except TemplateError as exc:
        raise ConfigError(f"the chat template cannot render an image conversation: {exc}") from None


def _common_suffix(a: str, b: str) -> str:
    size = 0
    while size < min(len(a), len(b)) and a[len(a) - size - 1] == b[len(b) - size - 1]:
        size += 1
    return a[len(a) - size:]


def prompt_from_template(template: str, bos_token: str, eos_token: str, image_token: str = "<image>") -> PromptTemplate:
    """Cut rendered one- and two-turn image conversations into vledge's pieces; ConfigError if they do not fit."""
    def message(role: str, text: str, image: bool = False) -> dict:
        return {"role": role, "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}

    opened = _render(template, [message("user", QUESTION_1, image=True)], True, bos_token, eos_token)
    if opened.count(image_token) != 1 or opened.count(QUESTION_1) != 1:
        raise ConfigError(f"the chat template does not show one {image_token} and the question once")
    head, rest = opened.split(image_token)
    if QUESTION_1 not in rest:
        raise ConfigError("the chat template puts the question before the image; vledge's prompt has the image first")
    separator, assistant = rest.split(QUESTION_1)
    def without_bos(text: str) -> str:
        return text[len(bos_token):] if bos_token and text.startswith(bos_token) else text

    head, opened = without_bos(head), without_bos(opened)
    system, user, answer_prefix, turn_separator = "", head, "", ""
    full = without_bos(_render(template, [message("user", QUESTION_1, image=True), message("assistant", ANSWER_1),
                                          message("user", QUESTION_2), message("assistant", ANSWER_2)], False,
                               bos_token, eos_token))
    if full.startswith(opened) and all(full.count(marker) == 1 for marker in (ANSWER_1, QUESTION_2)):
        answer_prefix = full[len(opened):full.index(ANSWER_1)]
        between = full[full.index(ANSWER_1) + len(ANSWER_1):full.index(QUESTION_2)]
        if eos_token and between.startswith(eos_token):  # vledge writes the end-of-turn token itself
            between = between[len(eos_token):]
        user = _common_suffix(head, between) or head
        system = head[:len(head) - len(user)]
        turn_separator = between[:len(between) - len(user)] if between.endswith(user) else ""
    else:
        log.warning("the chat template's multi-turn layout is unclear; using its single-turn pieces")
    return PromptTemplate(system=system, user=user, assistant=assistant, answer_prefix=answer_prefix,
                          image_separator=separator, turn_separator=turn_separator)


def llava_prompt(folder: Path, bos_token: str, eos_token: str, fallback: PromptTemplate) -> PromptTemplate:
    """The folder's prompt pieces from its chat template; ``fallback`` where it has none."""
    template = find_chat_template(folder)
    if template is None:
        log.info("%s has no chat template; using the prompt %r", folder, fallback)
        return fallback
    image_token = "<image>"
    processor = folder / "processor_config.json"
    if processor.is_file():
        try:
            image_token = read_json(processor, error=DataError, what="processor file").get("image_token") or image_token
        except (DataError, AttributeError):
            pass
    try:
        return prompt_from_template(template, bos_token, eos_token, image_token)
    except ConfigError as exc:
        raise ConfigError(f"{folder}: {exc}") from None
