"""The OpenAI-compatible HTTP app: routes, limits, errors, auth, and the engine's lifecycle.

Owns turning a validated body into engine requests (chat template, tokenization, the context and
vocabulary limits, n and seeds), the non-streaming responses, the error shape every failure
answers with (400 for bad input, never 500), bearer-token auth, the request-body size limit and
starting / draining the `AsyncEngine`. Wire shapes of streams live in streaming.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from anyquant import __version__
from anyquant.engine.async_engine import (
    AsyncEngine,
    EngineUnavailableError,
    GenerationItem,
    QueueFullError,
    RequestStream,
)
from anyquant.engine.engine import Engine
from anyquant.engine.grammar import GuidedDecodingError
from anyquant.engine.sampling import GuidedDecodingParams
from anyquant.server.metrics import ServerMetrics
from anyquant.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
    new_id,
    now,
    usage,
)
from anyquant.server.streaming import LogprobFormatter, StreamMeta, chat_events, completion_events
from anyquant.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
_KNOWN_PATHS = frozenset({*_GENERATION_PATHS, "/v1/models", "/health", "/metrics", "/openapi.json", "/docs"})
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "invalid request (bad JSON, wrong types, impossible parameters, prompt too long)"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (413, "request body too large"),
        (429, "too many requests in flight; see Retry-After"),
        (500, "the generation failed inside the engine"),
        (503, "shutting down or engine stopped"),
    )
}


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = 8 * 2**20
    max_waiting: int = 256  # requests admitted beyond the running batch before 429
    shutdown_timeout: float = 10.0  # seconds in-flight requests get to finish on shutdown
    # True: the engine loop gets a thread of its own. False: the caller runs it with
    # `app.state.server.engine.run_here()` (`anyquant serve` does, on the main thread).
    engine_thread: bool = True

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (omit it to disable auth)")


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.headers = headers

    def response(self) -> Response:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}
        # ASCII-escaped: a message may quote client input, which can hold lone surrogates that have
        # no UTF-8 form (rendering them as UTF-8 would turn this 4xx into a 500).
        content = json.dumps({"error": error}, ensure_ascii=True, allow_nan=False)
        return Response(content, self.status, self.headers, media_type="application/json")


@dataclass
class _Choice:
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class _Prepared:
    """A request turned into engine items: one per (prompt, choice), in OpenAI's index order."""

    items: list[GenerationItem]
    num_prompt_tokens: int  # each distinct prompt counted once, as OpenAI's usage does


class _ClientGone(Exception):
    pass


class Server:
    """State shared by the routes of one app."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, config: ServerConfig) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = engine.config.max_model_len
        self.vocab_size = int(engine.runner.model.args.vocab_size)
        self.num_pages = engine.allocator.num_pages
        self.page_size = engine.allocator.page_size
        self.created = now()
        self.grammars = engine.grammars  # thread-safe: requests' grammars compile off the event loop
        self.metrics = ServerMetrics(config.served_model_name, lambda: self.engine.stats)
        self.engine = AsyncEngine(engine, max_waiting=config.max_waiting, observer=self.metrics)

    # -- shared checks ---------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.config.served_model_name!r}",
                "not_found_error",
                "model",
            )

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except Exception as exc:  # e.g. lone surrogates, which have no UTF-8 form
            raise ApiError(400, f"the prompt cannot be tokenized: {exc}", param="prompt") from exc
        if not ids:
            raise ApiError(
                400, "the prompt is empty after tokenization; at least one token is needed", param="prompt"
            )
        return ids

    def check_ids(self, ids: list[int]) -> None:
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise ApiError(
                400, f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})", param="prompt"
            )

    def max_tokens_for(self, num_prompt: int, requested: int | None) -> int:
        """The request's max_tokens after checking it against the context and the KV cache."""
        limit = self.max_model_len
        if num_prompt >= limit:
            raise ApiError(
                400,
                f"this model's maximum context length is {limit} tokens and the prompt has {num_prompt} "
                "tokens, which leaves no room for output; shorten the prompt",
                param="prompt",
            )
        max_tokens = limit - num_prompt if requested is None else requested
        if num_prompt + max_tokens > limit:
            raise ApiError(
                400,
                f"this model's maximum context length is {limit} tokens; the prompt has {num_prompt} "
                f"tokens and max_tokens is {max_tokens} ({num_prompt + max_tokens} in all); lower "
                f"max_tokens to at most {limit - num_prompt} or shorten the prompt",
                param="max_tokens",
            )
        pages = -(-(num_prompt + max_tokens) // self.page_size)
        if pages > self.num_pages:
            raise ApiError(
                400,
                f"the KV cache holds {self.num_pages} pages of {self.page_size} tokens "
                f"({self.num_pages * self.page_size} tokens) and this request needs up to "
                f"{num_prompt + max_tokens}; lower max_tokens or shorten the prompt",
                param="max_tokens",
            )
        return max_tokens

    def prepare(
        self,
        body: CompletionRequest | ChatCompletionRequest,
        prompts: list[list[int]],
        requested: int | None,
        logprobs: int | None,
        guided: GuidedDecodingParams | None = None,
    ) -> _Prepared:
        total = len(prompts) * body.n
        if total > self.engine.capacity:
            raise ApiError(
                400,
                f"{len(prompts)} prompt(s) x n={body.n} = {total} sequences; this server holds at most "
                f"{self.engine.capacity} at once",
                param="n",
            )
        if logprobs is not None and logprobs > self.vocab_size:
            raise ApiError(
                400, f"{logprobs} top logprobs asked for a vocabulary of {self.vocab_size}", param="logprobs"
            )
        items = []
        for ids in prompts:
            self.check_ids(ids)
            max_tokens = self.max_tokens_for(len(ids), requested)
            for index in range(body.n):
                try:
                    params = body.sampling_params(max_tokens, index, logprobs, guided)
                except ValueError as exc:
                    raise ApiError(400, str(exc)) from exc
                items.append(GenerationItem(ids, params))
        return _Prepared(items, sum(len(ids) for ids in prompts))

    async def guided(self, body: CompletionRequest | ChatCompletionRequest) -> GuidedDecodingParams | None:
        """The request's output constraint, compiled now on a worker thread (the engine then finds
        it in the cache): a bad schema, regex or grammar is this request's 400, and compiling never
        stalls the engine's steps."""
        try:
            asked = body.guided_decoding()
        except ValueError as exc:
            raise ApiError(400, str(exc), param="response_format") from exc
        if asked is None:
            return None
        params, name = asked
        try:
            await asyncio.to_thread(self.grammars.compile, params)
        except GuidedDecodingError as exc:
            raise ApiError(400, f"{name}: {exc}", param=name) from exc
        return params

    async def submit(self, response_id: str, prepared: _Prepared) -> RequestStream:
        ids = [f"{response_id}-{i}" for i in range(len(prepared.items))]
        try:
            return await self.engine.generate(ids, prepared.items)
        except QueueFullError as exc:
            raise ApiError(
                429, str(exc), "rate_limit_error", headers={"Retry-After": str(exc.retry_after)}
            ) from exc
        except EngineUnavailableError as exc:
            raise ApiError(503, str(exc), "service_unavailable") from exc
        except ValueError as exc:  # a limit the engine checks itself
            raise ApiError(400, str(exc)) from exc

    # -- endpoints -------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check(body)
        prompts = [self.encode(p, True) if isinstance(p, str) else list(p) for p in body.prompts()]
        return await self._generate(body, request, prompts, body.max_tokens, body.logprobs, "text_completion")

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check(body)
        prompt = self.encode(self.render_chat(body), False)  # the template places any <s> itself
        requested = body.requested_max_tokens()
        return await self._generate(body, request, [prompt], requested, body.logprobs_k(), "chat.completion")

    def _check(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        self.check_model(body.model)
        problem = body.unsupported()
        if problem:
            raise ApiError(400, problem)

    async def _generate(
        self,
        body: CompletionRequest | ChatCompletionRequest,
        request: Request,
        prompts: list[list[int]],
        requested: int | None,
        logprobs: int | None,
        kind: str,
    ) -> Response:
        prepared = self.prepare(body, prompts, requested, logprobs, await self.guided(body))
        formatter = LogprobFormatter(self.tokenizer, logprobs) if logprobs is not None else None
        chat = kind == "chat.completion"
        response_id = new_id("chatcmpl" if chat else "cmpl")
        stream = await self.submit(response_id, prepared)
        meta = StreamMeta(
            response_id,
            now(),
            self.config.served_model_name,
            len(prepared.items),
            prepared.num_prompt_tokens,
            body.include_usage,
        )
        if body.stream:
            events = chat_events if chat else completion_events
            return _sse_response(events(meta, stream, formatter), stream)
        try:
            choices = await _collect(stream, len(prepared.items), request)
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it; the status shows in logs and metrics
        out = [_choice_json(chat, i, c, formatter) for i, c in enumerate(choices)]
        return self._respond(meta, kind, out, choices)

    def render_chat(self, body: ChatCompletionRequest) -> str:
        if not self.tokenizer.chat_template:
            raise ApiError(
                400, "this model has no chat template (tokenizer_config.json); use /v1/completions"
            )
        messages = []
        for i, m in enumerate(body.messages):
            try:
                text = m.text()
            except ValueError as exc:
                raise ApiError(400, f"messages[{i}]: {exc}", param="messages") from exc
            message = {"role": m.role, "content": text}
            if m.name is not None:
                message["name"] = m.name
            messages.append(message)
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=body.add_generation_prompt
            )
        except Exception as exc:  # the template is checkpoint data: any failure is this request's
            raise ApiError(
                400, f"the chat template failed for these messages: {exc}", param="messages"
            ) from exc

    def _respond(
        self, meta: StreamMeta, kind: str, out: list[dict[str, Any]], choices: list[_Choice]
    ) -> Response:
        failed = next((c for c in choices if c.finish_reason == "error"), None)
        if failed is not None:
            raise ApiError(500, failed.error or "generation failed", "server_error")
        aborted = next((c for c in choices if c.finish_reason == "abort"), None)
        if aborted is not None:
            raise ApiError(503, aborted.error or "the request was aborted", "service_unavailable")
        generated = sum(c.num_tokens for c in choices)
        body = {
            "id": meta.response_id,
            "object": kind,
            "created": meta.created,
            "model": meta.model,
            "choices": out,
            "usage": usage(meta.num_prompt_tokens, generated),
        }
        return JSONResponse(body)


async def _collect(stream: RequestStream, n: int, request: Request) -> list[_Choice]:
    """Gather a non-streaming response; abort it (raising _ClientGone) if the client hangs up
    first. The ASGI server reports a hang-up as the next message on `receive`."""
    gather = asyncio.ensure_future(_gather(stream, n))
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({gather, watch}, return_when=asyncio.FIRST_COMPLETED)
        if gather in done:
            return gather.result()
        raise _ClientGone
    finally:
        gather.cancel()
        watch.cancel()
        stream.abort()


async def _gather(stream: RequestStream, n: int) -> list[_Choice]:
    choices = [_Choice() for _ in range(n)]
    async for event in stream:
        c, d = choices[event.index], event.delta
        c.text += d.new_text
        c.num_tokens += len(d.new_token_ids)
        c.logprobs += d.logprobs
        if d.finished:
            c.finish_reason, c.error = d.finish_reason, d.error
    return choices


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse_response(events: AsyncIterator[str], stream: RequestStream) -> StreamingResponse:
    async def abort() -> None:
        # The generator aborts in its `finally`, but only if it ever started: a client gone before
        # the first event would otherwise leave its requests running to max_tokens.
        stream.abort()

    # no-cache and no proxy buffering: each event must reach the client when it is produced.
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(abort),
    )


def _choice_json(
    chat: bool, index: int, choice: _Choice, formatter: LogprobFormatter | None
) -> dict[str, Any]:
    if chat:
        return {
            "index": index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": formatter.chat(choice.logprobs) if formatter is not None else None,
            "finish_reason": choice.finish_reason,
        }
    logprobs = formatter.completion(choice.logprobs, 0)[0] if formatter is not None else None
    return {"index": index, "text": choice.text, "logprobs": logprobs, "finish_reason": choice.finish_reason}


# -- ASGI guard: auth, body limit, per-path metrics -------------------------------------------------
_UNAUTHORIZED = ApiError(
    401,
    "missing or wrong API key: send 'Authorization: Bearer <key>'",
    "authentication_error",
    headers={"WWW-Authenticate": "Bearer"},
)


class _Guard:
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
            if self._expected is not None and path.startswith("/v1/") and not self._authorized(scope):
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


# -- app ---------------------------------------------------------------------------------------------
def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    param = None
    for error in exc.errors()[:8]:
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "")
            return f"malformed JSON body: {detail}".rstrip(": "), None
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body", param


def create_app(engine: Engine, tokenizer: Tokenizer, config: ServerConfig) -> FastAPI:
    """The app; its engine thread starts now (unless `config.engine_thread` is False) and is
    drained by the app's lifespan shutdown (or `app.state.server.engine.close()` when no ASGI
    server runs the lifespan)."""
    server = Server(engine, tokenizer, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.engine_thread:
            server.engine.start()
        yield
        await server.engine.shutdown(config.shutdown_timeout)

    app = FastAPI(title="anyquant", version=__version__, lifespan=lifespan)
    app.state.server = server
    if config.engine_thread:
        server.engine.start()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc)
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return ApiError(500, f"internal server error: {type(exc).__name__}: {exc}", "server_error").response()

    @app.get("/health")
    async def health() -> Response:
        if server.engine.is_healthy:
            return JSONResponse({"status": "ok"})
        reason = server.engine.dead_reason or "shutting down"
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models() -> Response:
        card = {
            "id": config.served_model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "anyquant",
            "max_model_len": server.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.completions(body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(body, request)

    app.add_middleware(_Guard, server=server)
    return app
