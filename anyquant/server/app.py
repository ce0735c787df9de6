"""The OpenAI-compatible HTTP app: its routes, its error handlers and the engine's lifecycle.

Owns the routes (each endpoint's flow: admit, submit to the `AsyncEngine`, respond), turning
failures into `ApiError`s (errors.py; 400 for bad input, never 500) and starting / draining the
engine. What a request must pass before the engine sees it lives in admission.py, the responses
of a generation in responses.py (their shapes: protocol.py; stream events: streaming.py), auth
and the body-size limit, which run before routing, in guard.py, tool calling in tools.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from anyquant import __version__
from anyquant.engine.async_engine import AsyncEngine, EngineUnavailableError, QueueFullError, RequestStream
from anyquant.engine.engine import Engine
from anyquant.engine.multimodal import MultimodalPrompt
from anyquant.engine.scoring import PromptLogprobs, prompt_logprobs
from anyquant.models.multimodal import ImageProcessor
from anyquant.server.admission import Admission, Prepared, with_tools
from anyquant.server.config import ServerConfig
from anyquant.server.errors import ApiError
from anyquant.server.guard import Guard
from anyquant.server.metrics import ServerMetrics
from anyquant.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    new_id,
    now,
)
from anyquant.server.responses import (
    ClientGone,
    chat_choice,
    chat_response,
    collect,
    completion_choice,
    completion_response,
    json_response,
    sse_response,
)
from anyquant.server.streaming import (
    LogprobFormatter,
    StreamMeta,
    chat_events,
    completion_events,
    prompt_logprobs_json,
)
from anyquant.server.tools import ToolChoiceError, ToolPlan, plan_tools
from anyquant.tokenizer import Tokenizer

__all__ = ["Server", "ServerConfig", "create_app"]

log = logging.getLogger(__name__)

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


class Server:
    """State shared by the routes of one app."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        config: ServerConfig,
        image_processor: ImageProcessor | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.created = now()
        self.metrics = ServerMetrics(config.served_model_name, lambda: self.engine.stats)
        self.engine = AsyncEngine(engine, max_waiting=config.max_waiting, observer=self.metrics)
        self.admission = Admission(engine, tokenizer, config, image_processor, self.engine.capacity)

    async def submit(self, response_id: str, prepared: Prepared) -> RequestStream:
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
        admission = self.admission
        admission.check_body(body)
        prompts = [admission.encode(p, True) if isinstance(p, str) else list(p) for p in body.prompts()]
        return await self._generate(body, request, prompts, body.max_tokens, body.logprobs, "text_completion")

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        admission = self.admission
        admission.check_body(body)
        try:
            plan = plan_tools(
                body.tools, body.tool_choice, body.parallel_tool_calls, self.config.tool_call_parser
            )
        except ToolChoiceError as exc:
            raise ApiError(400, str(exc), param=exc.param) from exc
        prompt = admission.encode(
            admission.render_chat(body, plan.tools), False
        )  # the template places any <s>
        multimodal = None
        if any(m.image_parts() for m in body.messages):
            # Decoding and resizing a large image takes a while: off the event loop, so that the
            # other requests' streams keep flowing.
            prompt, multimodal = await asyncio.to_thread(admission.prepare_images, body, prompt)
        requested = body.requested_max_tokens()
        return await self._generate(
            body, request, [prompt], requested, body.logprobs_k(), "chat.completion", plan, multimodal
        )

    # -- generation ---------------------------------------------------------------------------
    async def _generate(
        self,
        body: CompletionRequest | ChatCompletionRequest,
        request: Request,
        prompts: list[list[int]],
        requested: int | None,
        logprobs: int | None,
        kind: str,
        tools: ToolPlan | None = None,
        multimodal: MultimodalPrompt | None = None,
    ) -> Response:
        if multimodal is not None and body.prompt_logprobs is not None:
            raise ApiError(400, "prompt_logprobs is not available with images", param="prompt_logprobs")
        guided = await self.admission.guided(body)
        if guided is not None and tools is not None and tools.guided is not None:
            raise ApiError(
                400,
                "response_format / guided_* cannot be combined with tool_choice 'required' or a named "
                "function (both constrain the output)",
                param="tool_choice",
            )
        prepared = self.admission.prepare(body, prompts, requested, logprobs, multimodal, guided)
        if tools is not None and tools.parser is not None:
            prepared = with_tools(prepared, tools)
        scored = await self._score_prompts(body, prompts)
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
            body.n,
        )
        if body.stream:
            if chat:
                return sse_response(chat_events(meta, stream, formatter, tools), stream)
            return sse_response(completion_events(meta, stream, formatter), stream)
        try:
            choices = await collect(stream, len(prepared.items), request)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the status shows in logs and metrics
        wire = None if scored is None else [prompt_logprobs_json(self.tokenizer, s) for s in scored]
        if chat:
            out = [chat_choice(i, c, formatter, tools) for i, c in enumerate(choices)]
            return chat_response(meta, out, choices, None if wire is None else wire[0])
        completions = [
            completion_choice(i, c, formatter, None if wire is None else wire[i // body.n])
            for i, c in enumerate(choices)
        ]
        return completion_response(meta, completions, choices)

    async def _score_prompts(
        self, body: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]]
    ) -> list[PromptLogprobs] | None:
        """vLLM's prompt_logprobs: one teacher-forced pass per prompt, run on the engine thread
        between steps (it owns the model)."""
        k = body.prompt_logprobs
        if k is None:
            return None
        if body.stream:
            raise ApiError(400, "prompt_logprobs is not available with stream=true", param="prompt_logprobs")
        vocab_size = self.admission.vocab_size
        if k > vocab_size:
            raise ApiError(
                400,
                f"{k} prompt logprobs asked for a vocabulary of {vocab_size}",
                param="prompt_logprobs",
            )
        scored = []
        for ids in prompts:

            def score(engine: Engine, ids: list[int] = ids) -> PromptLogprobs:
                return prompt_logprobs(engine.prompt_logits(ids), ids, k)

            try:
                scored.append(await self.engine.call(score))
            except EngineUnavailableError as exc:
                raise ApiError(503, str(exc), "service_unavailable") from exc
            except ValueError as exc:  # non-finite logits: the model's numerics, not the request
                raise ApiError(500, str(exc), "server_error") from exc
        return scored

    # -- /tokenize, /detokenize ------------------------------------------------------------------
    def tokenize(self, body: TokenizeCompletionRequest | TokenizeChatRequest) -> Response:
        self.admission.check_model(body.model)
        if isinstance(body, TokenizeChatRequest):
            text = self.admission.render_chat(body, body.tools)
        else:
            text = body.prompt
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
        except Exception as exc:  # e.g. lone surrogates
            raise ApiError(400, f"the text cannot be tokenized: {exc}", param="prompt") from exc
        strs = (
            [self.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
            if body.return_token_strs
            else None
        )
        max_model_len = self.admission.max_model_len
        return json_response(
            TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids, token_strs=strs)
        )

    def detokenize(self, body: DetokenizeRequest) -> Response:
        self.admission.check_model(body.model)
        bad = next((t for t in body.tokens if t >= self.tokenizer.vocab_size), None)
        if bad is not None:
            raise ApiError(
                400,
                f"token id {bad} is outside the vocabulary [0, {self.tokenizer.vocab_size})",
                param="tokens",
            )
        return json_response(DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens)))


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


def create_app(
    engine: Engine, tokenizer: Tokenizer, config: ServerConfig, image_processor: ImageProcessor | None = None
) -> FastAPI:
    """The app; its engine thread starts now (unless `config.engine_thread` is False) and is
    drained by the app's lifespan shutdown (or `app.state.server.engine.close()` when no ASGI
    server runs the lifespan). `image_processor`: the model's, for chat messages with images."""
    server = Server(engine, tokenizer, config, image_processor)

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
        card = ModelCard(
            id=config.served_model_name,
            object="model",
            created=server.created,
            owned_by="anyquant",
            max_model_len=server.admission.max_model_len,
        )
        return json_response(ModelList(object="list", data=[card]))

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: TokenizeChatRequest | TokenizeCompletionRequest) -> Response:
        return server.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> Response:
        return server.detokenize(body)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.completions(body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(body, request)

    app.add_middleware(Guard, server=server)
    return app
