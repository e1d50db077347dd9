"""The FastAPI application: OpenAI-compatible chat completions over a loaded vledge runtime."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from vledge import __version__
from vledge.errors import RequestError
from vledge.image_tiles import tiled_question
from vledge.prompt import question_ids
from vledge.runtime.preprocess import ImagePreprocessor
from vledge.serve.budget import PixelBudget
from vledge.serve.guard import BODY_TOO_LARGE, RequestGuard
from vledge.serve.images import image_bytes, image_pixels
from vledge.serve.metrics import ServerMetrics
from vledge.serve.options import ServeOptions
from vledge.serve.scheduler import Answer, Job, Scheduler
from vledge.serve.schemas import (
    AnswerMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatRequest,
    Choice,
    ChunkChoice,
    Delta,
    RequestLimits,
    Usage,
    chat_request,
    error_body,
)
from vledge.serve.text import StreamText

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"


class _ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class ServerState:
    """What the routes share: the model, the scheduler, the metrics, and whether warm-up is done."""

    def __init__(self, model, options: ServeOptions) -> None:
        self.model = model
        self.options = options
        self.metrics = ServerMetrics()
        self.scheduler = Scheduler(model, options, self.metrics)
        self.ready = False
        self.model_name = options.model_name or Path(model.info()["model_dir"]).name or "vledge"
        self.created = int(time.time())
        architecture = model.info()["architecture"]
        self.image_tokens = int(architecture["image_tokens"])
        self.max_positions = architecture.get("max_positions")  # None: no limit (LSTM)
        base = model.preprocessor
        self.tiled = base.tiled  # tiled models (SmolVLM) take several images in one prompt
        self.max_images = options.max_images if self.tiled else 1
        self.limits = RequestLimits(max_tokens=options.max_new_tokens_limit, max_messages=options.max_messages,
                                    max_text_chars=options.max_text_chars, max_images=self.max_images)
        self.preprocessor = ImagePreprocessor(base.spec, max_pixels=min(options.max_image_pixels, base.max_pixels),
                                              reduced_jpeg=base.reduced_jpeg)
        self.pixel_budget = PixelBudget(options.max_pixels_in_flight, options.retry_after_s)

    async def warm_up(self) -> None:
        await asyncio.to_thread(self.model.warmup)
        self.ready = True
        self.metrics.ready.set(1)
        log.info("model %s warmed up; ready", self.model_name)

    def prepare(self, raw: bytes) -> tuple[ChatRequest, np.ndarray | list, str, int]:
        """A request body -> (the request, its pixels, its prompt, the prompt's positions); run off the event loop.

        The pixels are float32 [3, S, S], or for a tiled model the list of its images' tiles. Every count is
        checked before the work it bounds: messages, images and characters before tokenizing, the encoded size
        before base64 decoding, the header's pixel count (and the global budget) before decoding.
        """
        try:  # JSON whatever the Content-Type says (curl -d sends a form type)
            body = ChatCompletionRequest.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_input=False)) from None
        chat = chat_request(body, self.limits)
        prompt = chat.question or self.model.caption_prompt
        if not self.tiled:
            data = image_bytes(chat.image_url, self.options.max_image_bytes)
            pixels = image_pixels(self.preprocessor, data, self.pixel_budget)
            return chat, pixels, prompt, self.prompt_tokens(prompt)
        images = [image_pixels(self.preprocessor, image_bytes(url, self.options.max_image_bytes), self.pixel_budget)
                  for url in chat.image_urls]  # one at a time: the budget holds one image's pixels per request
        return chat, images, prompt, self.prompt_tokens(prompt, images)

    def prompt_tokens(self, prompt: str, images: list | None = None) -> int:
        """Tokens the model reads: the templated question with the image token replaced by the visual tokens
        (for a tiled model, every image's tiles: ``images`` are its ``ImagePreprocessor.tiles()`` results)."""
        manifest = self.model.manifest
        if images is not None:
            return len(tiled_question(self.model.tokenizer, manifest.prompt, manifest.preprocess.tiles, prompt, images))
        return len(question_ids(self.model.tokenizer, manifest.prompt, prompt)) - 1 + self.image_tokens


    def token_room(self, prompt_tokens: int, max_tokens: int) -> int:
        """``max_tokens`` lowered to the positions the prompt leaves, as the model does for a request alone."""
        if self.max_positions is None:
            return max_tokens
        room = int(self.max_positions) - prompt_tokens
        if room < 1:
            raise RequestError(f"the prompt takes {prompt_tokens} positions (image tokens included) of the "
                               f"model's {self.max_positions}; ask a shorter question", code="prompt_too_long",
                               param="messages")
        return min(max_tokens, room)


def create_app(model, options: ServeOptions | None = None) -> RequestGuard:
    """The ASGI app for ``model`` (a loaded ``vledge.runtime`` model): the FastAPI routes (``.app``) behind
    the API-key and body-size guard. Run it with uvicorn, or any ASGI server that runs the lifespan."""
    options = options or ServeOptions()
    state = ServerState(model, options)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.scheduler.start()
        warm = asyncio.create_task(state.warm_up(), name="vledge-warmup")
        try:
            yield
        finally:
            warm.cancel()
            await state.scheduler.stop()

    # The API description pages are off unless asked for; when on, they sit behind the key like /v1/.
    docs = {"docs_url": "/docs", "redoc_url": "/redoc", "openapi_url": "/openapi.json"} if options.docs else {
        "docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="vledge", version=__version__, lifespan=lifespan, **docs)
    app.state.vledge = state
    _add_error_handlers(app, state)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "ok" if state.ready else "loading", "model": state.model_name,
                "queue_depth": state.scheduler.depth, "max_batch": options.max_batch}
        headers = {} if state.ready else {"Retry-After": str(options.retry_after_s)}
        return JSONResponse(body, status_code=200 if state.ready else 503, headers=headers)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict:
        if model_id != state.model_name:
            raise RequestError(f"no model {model_id!r}; this server serves {state.model_name!r}", status=404,
                               code="model_not_found", param="model")
        return _model_card(state)

    @app.post(CHAT_PATH, response_model=None)
    async def chat_completions(request: Request) -> Response:
        arrived = time.perf_counter()
        if not state.ready:
            raise RequestError("the model is still warming up; retry shortly", status=503, code="not_ready",
                               retry_after_s=options.retry_after_s)
        with state.scheduler.arrival():
            try:
                raw = await request.body()
            except ClientDisconnect:
                if BODY_TOO_LARGE in request.scope:
                    raise RequestError(request.scope[BODY_TOO_LARGE], status=413, code="body_too_large") from None
                state.metrics.requests.labels(status="499").inc()
                return Response(status_code=499)
            # parsing, base64, decoding and tokenizing run in a worker thread: the event loop keeps answering
            prepared = await asyncio.to_thread(state.prepare, raw)
            state.metrics.observe_stage("preprocess", time.perf_counter() - arrived)
            chat, pixels, prompt, prompt_tokens = prepared
            job = Job(pixels=pixels, prompt=prompt, max_tokens=state.token_room(prompt_tokens, chat.max_tokens),
                      temperature=chat.temperature, top_p=chat.top_p, seed=chat.seed, stop=chat.stop,
                      loop=asyncio.get_running_loop(), stream=chat.stream, positions=prompt_tokens,
                      enqueued_at=time.perf_counter())
            state.scheduler.submit(job)
        deadline = arrived + options.request_timeout_s
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        watcher = asyncio.create_task(_disconnected(request))
        try:
            if not chat.stream:
                answer = await _until(job.future, watcher, deadline, job, state)
                state.metrics.requests.labels(status="200").inc()
                state.metrics.request_seconds.observe(time.perf_counter() - arrived)
                return JSONResponse(_completion(reply_id, state, answer, prompt_tokens).model_dump())
            first = await _until(asyncio.ensure_future(job.events.get()), watcher, deadline, job, state)
        except _ClientGone:
            state.metrics.requests.labels(status="499").inc()
            return Response(status_code=499)
        finally:
            watcher.cancel()
        if isinstance(first, BaseException):
            raise first
        stream = _stream(first, job, state, reply_id, prompt_tokens, chat.include_usage, deadline, arrived)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    protected = ("/docs", "/redoc", "/openapi.json") if options.docs else ()
    return RequestGuard(app, options.api_key, options.max_body_bytes, state.metrics, protected)


def _model_card(state: ServerState) -> dict:
    info = state.model.info()
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "vledge",
            "capabilities": {"vision": True, "streaming": True, "max_images": state.max_images},
            "max_tokens": state.options.max_new_tokens_limit, "architecture": info["architecture"],
            "precisions": info["precisions"], "provider": info["provider"]}


def _completion(reply_id: str, state: ServerState, answer: Answer, prompt_tokens: int) -> ChatCompletion:
    completion_tokens = len(answer.token_ids)
    return ChatCompletion(
        id=reply_id, created=int(time.time()), model=state.model_name,
        choices=[Choice(message=AnswerMessage(content=answer.text), finish_reason=answer.finish_reason)],
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens))


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _until(waiting: asyncio.Future, watcher: asyncio.Task, deadline: float, job: Job, state: ServerState):
    """The result of ``waiting``; a disconnect or the deadline cancels the job instead."""
    try:
        done, _ = await asyncio.wait({waiting, watcher}, timeout=max(deadline - time.perf_counter(), 0),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not waiting.done() and waiting is not job.future:
            waiting.cancel()
    if waiting in done:
        return waiting.result()
    if watcher in done:
        state.scheduler.cancel(job, "disconnected")
        state.metrics.cancelled.labels(reason="disconnected").inc()
        raise _ClientGone
    state.scheduler.cancel(job, "deadline")
    state.metrics.cancelled.labels(reason="deadline").inc()
    raise RequestError(f"no answer within the server's {state.options.request_timeout_s:g} s deadline", status=504,
                       code="deadline_exceeded")


async def _stream(first, job: Job, state: ServerState, reply_id: str, prompt_tokens: int, include_usage: bool,
                  deadline: float, arrived: float) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    created = int(time.time())
    text = StreamText(state.model.tokenizer, job.stop)

    def chunk(delta: Delta, finish_reason: str | None = None) -> str:
        body = ChatCompletionChunk(id=reply_id, created=created, model=state.model_name,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)]).model_dump()
        body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)  # as OpenAI: only the fields it carries
        del body["usage"]
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    event = first
    try:
        yield chunk(Delta(role="assistant", content=""))
        while True:
            if isinstance(event, int):
                piece = text.add(event)
                if piece:
                    yield chunk(Delta(content=piece))
            elif isinstance(event, Answer):
                rest = text.finish(event.text)
                if rest:
                    yield chunk(Delta(content=rest))
                yield chunk(Delta(), event.finish_reason)
                if include_usage:
                    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=len(event.token_ids),
                                  total_tokens=prompt_tokens + len(event.token_ids))
                    body = ChatCompletionChunk(id=reply_id, created=created, model=state.model_name, choices=[],
                                               usage=usage)
                    yield f"data: {body.model_dump_json()}\n\n"
                state.metrics.requests.labels(status="200").inc()
                state.metrics.request_seconds.observe(time.perf_counter() - arrived)
                break
            else:
                error = event if isinstance(event, RequestError) else RequestError(str(event), status=500,
                                                                                    code="generation_failed")
                state.metrics.requests.labels(status=str(error.status)).inc()
                state.metrics.errors.labels(code=error.code).inc()
                yield f"data: {json.dumps(error_body(str(error), error.status, error.code))}\n\n"
                break
            try:
                event = await asyncio.wait_for(job.events.get(), max(deadline - time.perf_counter(), 0))
            except asyncio.TimeoutError:
                state.scheduler.cancel(job, "deadline")
                state.metrics.cancelled.labels(reason="deadline").inc()
                event = RequestError(f"no answer within the server's {state.options.request_timeout_s:g} s "
                                     "deadline", status=504, code="deadline_exceeded")
        yield "data: [DONE]\n\n"
    finally:
        if not job.future.done() and job.cancelled is None:
            state.scheduler.cancel(job, "disconnected")
            state.metrics.cancelled.labels(reason="disconnected").inc()
            state.metrics.requests.labels(status="499").inc()


def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    def refuse(request: Request, status: int, message: str, code: str | None, param: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
        state.metrics.errors.labels(code=code or "unknown").inc()
        if request.url.path == CHAT_PATH:
            state.metrics.requests.labels(status=str(status)).inc()
        return JSONResponse(error_body(message, status, code, param), status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
        return refuse(request, exc.status, str(exc), exc.code, exc.param, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = first.get("msg", "invalid request body")
        code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_request"
        return refuse(request, 400, f"{where}: {message}" if where else message, code, where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return refuse(request, exc.status_code, str(exc.detail), code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s", request.url.path)
        return refuse(request, 500, f"internal error: {type(exc).__name__}", "internal_error")
