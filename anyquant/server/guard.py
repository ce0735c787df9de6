"""The ASGI guard in front of every route: bearer auth, the request-body size limit, and the
per-path request counts and latencies of /metrics."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from anyquant.server.errors import ApiError

if TYPE_CHECKING:
    from anyquant.server.app import Server

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
# Outside /v1 but reading the model: behind the API key too.
_TOKEN_PATHS = ("/tokenize", "/detokenize")
_KNOWN_PATHS = frozenset(
    {*_GENERATION_PATHS, *_TOKEN_PATHS, "/v1/models", "/health", "/metrics", "/openapi.json", "/docs"}
)
_UNAUTHORIZED = ApiError(
    401,
    "missing or wrong API key: send 'Authorization: Bearer <key>'",
    "authentication_error",
    headers={"WWW-Authenticate": "Bearer"},
)


class Guard:
    """Runs before routing: bearer auth on /v1/*, the body size limit (413, checked on the header
    and on the bytes actually received), request counts and latencies."""

    def __init__(self, app: ASGIApp, server: Server) -> None:
        self.app = app
        self.server = server
        key = server.config.api_key
        self._expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        label = path if path in _KNOWN_PATHS else "other"
        start = time.monotonic()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            protected = path.startswith("/v1/") or path in _TOKEN_PATHS
            if self._expected is not None and protected and not self._authorized(scope):
                await _UNAUTHORIZED.response()(scope, receive, send_and_record)
                return
            replay = await self._read_body(scope, receive, send_and_record)
            if replay is not None:
                await self.app(scope, replay, send_and_record)
        finally:
            self.server.metrics.http_request(label, status)
            if label in _GENERATION_PATHS:
                self.server.metrics.request_latency(label, time.monotonic() - start)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                return self._expected is not None and hmac.compare_digest(value, self._expected)
        return False

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Read the whole body within the limit; a receive that replays it, or None when the
        request was answered here (413) or the client left."""
        limit = self.server.config.max_body_bytes
        too_large = ApiError(413, f"request body larger than {limit} bytes", param=None)
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length" and value.isdigit() and int(value) > limit:
                await too_large.response()(scope, receive, send)
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await too_large.response()(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the app expects

        return replay
