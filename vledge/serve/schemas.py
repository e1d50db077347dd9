"""The OpenAI chat-completions wire format, as far as a one-image captioner can honour it.

Requests are parsed by these pydantic models (FastAPI validates the body with them); fields OpenAI defines
that do not apply (``frequency_penalty``, ``user``, ...) are accepted and ignored, fields that would change
the answer in ways this server cannot honour (``n`` > 1, tools) are refused by :func:`chat_request`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vledge.errors import RequestError

MAX_STOP_STRINGS = 4  # as OpenAI's API
MESSAGES_BOUND = 10_000  # no request parses past this many messages, whatever the server's max_messages
SEED_BOUND = 2**63 - 1  # seeds are 0..2**63-1 (a negative seed is refused, as numpy refuses it)


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    """One part of a message's content; the type is checked by :func:`chat_request` to name bad parts clearly."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageUrl | str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=MESSAGES_BOUND)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=SEED_BOUND)
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat request, reduced to what the model runs: its images, one question, decoding settings."""

    image_urls: tuple[str, ...]  # in the order the parts appear
    question: str  # "" asks for the model's caption prompt
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool

    @property
    def image_url(self) -> str:
        """The first image (the only one for models that take one image per prompt)."""
        return self.image_urls[0]


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold (the server's ``max_messages`` and ``max_text_chars``)."""

    max_tokens: int
    max_messages: int = 32
    max_text_chars: int = 16384
    max_images: int = 1  # image_url parts in the user message (more only for models that take several)


def chat_request(body: ChatCompletionRequest, limits: RequestLimits) -> ChatRequest:
    """Check what the wire format allows but this server cannot do, and pick out the image and the question.

    The counts (messages, characters of text) are checked here, before anything is tokenized or decoded.
    """
    max_tokens_limit = limits.max_tokens
    if len(body.messages) > limits.max_messages:
        raise RequestError(f"the request has {len(body.messages)} messages, over the server's limit of "
                           f"{limits.max_messages}", code="too_many_messages", param="messages")
    chars = _text_chars(body)
    if chars > limits.max_text_chars:
        raise RequestError(f"the request holds {chars} characters of text, over the server's limit of "
                           f"{limits.max_text_chars}", code="text_too_long", param="messages")
    if body.n not in (None, 1):
        raise RequestError(f"n must be 1, got {body.n}", code="unsupported_parameter", param="n")
    if body.tools:
        raise RequestError("tools are not supported", code="unsupported_parameter", param="tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise RequestError("only the text response_format is supported", code="unsupported_parameter",
                           param="response_format")
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if asked is not None and asked > max_tokens_limit:
        raise RequestError(f"max_tokens is {asked}, over the server's limit of {max_tokens_limit}",
                           code="max_tokens_too_large", param="max_tokens")
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
    image_urls, question = _images_and_question(body.messages, limits.max_images)
    return ChatRequest(
        image_urls=image_urls, question=question, max_tokens=asked or max_tokens_limit,
        temperature=body.temperature if body.temperature is not None else 0.0,
        top_p=body.top_p if body.top_p is not None else 1.0, seed=body.seed,
        stop=tuple(stop for stop in stops if stop), stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage))


def _text_chars(body: ChatCompletionRequest) -> int:
    """Characters of text in every message and stop string: what tokenizing the request may cost."""
    total = sum(len(stop) for stop in ((body.stop,) if isinstance(body.stop, str) else body.stop or ()))
    for message in body.messages:
        if isinstance(message.content, str):
            total += len(message.content)
        else:
            total += sum(len(part.text or "") for part in message.content or ())
    return total


def _images_and_question(messages: list[Message], max_images: int = 1) -> tuple[tuple[str, ...], str]:
    """System (and developer) messages are accepted and not used; exactly one user message with one image
    (up to ``max_images`` for models that take several), counted before any image is decoded."""
    users = []
    for index, message in enumerate(messages):
        if message.role in ("system", "developer"):
            continue
        if message.role != "user":
            raise RequestError(f"messages[{index}] has role {message.role!r}; this model answers one user "
                               "message about one image (system messages are accepted)",
                               code="unsupported_message", param=f"messages[{index}].role")
        users.append((index, message))
    if len(users) != 1:
        raise RequestError(f"exactly one user message is needed, got {len(users)}", code="unsupported_message",
                           param="messages")
    index, message = users[0]
    parts = [ContentPart(type="text", text=message.content)] if isinstance(message.content, str) else (
        message.content or [])
    texts, images = [], []
    for number, part in enumerate(parts):
        where = f"messages[{index}].content[{number}]"
        if part.type == "text":
            if part.text is None:
                raise RequestError(f"{where} is a text part without text", param=where)
            texts.append(part.text)
        elif part.type == "image_url":
            url = part.image_url.url if isinstance(part.image_url, ImageUrl) else part.image_url
            if not url:
                raise RequestError(f"{where} is an image_url part without a url", code="invalid_image_url",
                                   param=where)
            images.append(url)
        else:
            raise RequestError(f"{where} has type {part.type!r}; supported parts are 'text' and 'image_url'",
                               code="unsupported_content_part", param=f"{where}.type")
    if not images:
        raise RequestError("the user message must hold an image_url part, got none", code="missing_image",
                           param=f"messages[{index}].content")
    if len(images) > max_images:
        limit = ("exactly one image_url part: this model takes one image per request" if max_images == 1 else
                 f"at most {max_images} image_url parts (the server's limit of images per request)")
        raise RequestError(f"the user message must hold {limit}, got {len(images)}", code="too_many_images",
                           param=f"messages[{index}].content")
    return tuple(images), " ".join(text.strip() for text in texts if text.strip())


# --------------------------------------------------------------------------- answers


class AnswerMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AnswerMessage
    finish_reason: str
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


def error_body(message: str, status: int, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"
