"""ASGI middleware run before any body is read: the API key on ``/v1/`` paths, then the body size limit."""

from __future__ import annotations

import hmac
import json

from vledge.serve.schemas import error_body

PROTECTED_PREFIX = "/v1/"
COUNTED_PATH = "/v1/chat/completions"  # refusals here count in vledge_serve_requests_total too


BODY_TOO_LARGE = "vledge.body_too_large"  # scope key set when a chunked body went over the limit

class RequestGuard:
    """Refuses a wrong or missing key with 401 and a body over ``max_body_bytes`` with 413, OpenAI-shaped.

    The key is compared in constant time (``hmac.compare_digest``); the body limit is checked against
    ``Content-Length`` before reading, and against the bytes actually received for chunked bodies (the
    route then answers 413 itself).
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics=None,
                 protected_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.protected_paths = tuple(protected_paths)  # also behind the key (the API description pages)
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value for key, value in scope.get("headers", ())}
        path = scope.get("path", "")
        if self.api_key is not None and (path.startswith(PROTECTED_PREFIX) or path in self.protected_paths):
            problem = self._key_problem(headers.get("authorization"))
            if problem is not None:
                await self._refuse(scope, send, 401, problem[0], problem[1],
                                   [(b"www-authenticate", b'Bearer realm="vledge"')])
                return
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await self._refuse(scope, send, 400, "Content-Length is not a number", "invalid_request")
                return
            if declared > self.max_body_bytes:
                await self._refuse(scope, send, 413, self._too_large_message(), "body_too_large")
                return
        received = 0

        async def limited_receive():
            """Past the limit the app sees a disconnect, and finds why under ``scope[BODY_TOO_LARGE]``."""
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    scope[BODY_TOO_LARGE] = self._too_large_message()
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, limited_receive, send)

    def _key_problem(self, header: bytes | None) -> tuple[str, str] | None:
        if not header:
            return "no API key: send the header 'Authorization: Bearer KEY'", "missing_api_key"
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
            return "the API key is wrong", "invalid_api_key"
        return None

    def _too_large_message(self) -> str:
        return f"the request body is over the server's limit of {self.max_body_bytes} bytes"

    async def _refuse(self, scope, send, status: int, message: str, code: str, extra_headers=()) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(code=code).inc()
            if scope.get("path") == COUNTED_PATH:
                self.metrics.requests.labels(status=str(status)).inc()
        body = json.dumps(error_body(message, status, code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *extra_headers]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
