"""The OpenAI-compatible HTTP app: routes, limits, errors, auth, and the engine's lifecycle.

Owns turning a validated body into engine requests (chat template, tokenization, the context and
vocabulary limits, n and seeds), the non-streaming responses, turning failures into `ApiError`s
(errors.py; 400 for bad input, never 500), and starting / draining the `AsyncEngine`. Auth and
the body-size limit run before routing (guard.py); wire shapes of streams live in streaming.py,
tool calling in tools.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from anyquant import __version__
from anyquant.chat import ChatInputError, render_chat
from anyquant.engine.async_engine import (
    AsyncEngine,
    EngineUnavailableError,
    GenerationItem,
    QueueFullError,
    RequestStream,
)
from anyquant.engine.engine import Engine
from anyquant.engine.grammar import GuidedDecodingError
from anyquant.engine.multimodal import MultimodalPrompt, prepare_prompt
from anyquant.engine.sampling import GuidedDecodingParams
from anyquant.engine.scoring import PromptLogprobs, prompt_logits, prompt_logprobs
from anyquant.models.media import MediaLimits, image_url_of, load_image
from anyquant.models.multimodal import ImageInputError, ImageProcessor
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
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    new_id,
    now,
    usage,
)
from anyquant.server.streaming import (
    LogprobFormatter,
    StreamMeta,
    chat_events,
    completion_events,
    prompt_logprobs_json,
)
from anyquant.server.tool_parsers import PARSERS
from anyquant.server.tools import ToolChoiceError, ToolPlan, assistant_message, plan_tools
from anyquant.tokenizer import Tokenizer

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
    # The model's tool-call format (vLLM's --tool-call-parser); None: tool_choice "none" only.
    tool_call_parser: str | None = None
    # A request's own `chat_template` runs code-like Jinja on the server: off unless trusted.
    trust_request_chat_template: bool = False
    media: MediaLimits = field(default_factory=MediaLimits)  # images in chat messages

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(f"tool_call_parser {self.tool_call_parser!r}: choose one of {sorted(PARSERS)}")
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (omit it to disable auth)")


@dataclass
class _Choice:
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    num_cached_tokens: int = 0


@dataclass(frozen=True)
class _Prepared:
    """A request turned into engine items: one per (prompt, choice), in OpenAI's index order."""

    items: list[GenerationItem]
    num_prompt_tokens: int  # each distinct prompt counted once, as OpenAI's usage does


class _ClientGone(Exception):
    pass


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
        self.image_processor = image_processor  # None: the model takes no images
        self.max_model_len = engine.config.max_model_len
        self.vocab_size = int(engine.runner.model.args.vocab_size)
        self.prompt_vocab_size = engine.prompt_vocab_size  # may exceed it (mllama's <|image|>)
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
        limit = self.prompt_vocab_size
        bad = next((t for t in ids if t >= limit), None)
        if bad is not None:
            raise ApiError(
                400, f"prompt token id {bad} is outside the vocabulary [0, {limit})", param="prompt"
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
        multimodal: MultimodalPrompt | None = None,
        guided: GuidedDecodingParams | None = None,
    ) -> _Prepared:
        """`multimodal`: the images of the (single) prompt."""
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
                items.append(GenerationItem(ids, params, multimodal))
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
        try:
            plan = plan_tools(
                body.tools, body.tool_choice, body.parallel_tool_calls, self.config.tool_call_parser
            )
        except ToolChoiceError as exc:
            raise ApiError(400, str(exc), param=exc.param) from exc
        prompt = self.encode(self.render_chat(body, plan.tools), False)  # the template places any <s>
        multimodal = None
        if any(m.image_parts() for m in body.messages):
            # Decoding and resizing a large image takes a while: off the event loop, so that the
            # other requests' streams keep flowing.
            prompt, multimodal = await asyncio.to_thread(self.prepare_images, body, prompt)
        requested = body.requested_max_tokens()
        return await self._generate(
            body, request, [prompt], requested, body.logprobs_k(), "chat.completion", plan, multimodal
        )

    def prepare_images(
        self, body: ChatCompletionRequest, prompt: list[int]
    ) -> tuple[list[int], MultimodalPrompt]:
        images = self.chat_images(body)
        assert self.image_processor is not None  # render_chat refused image parts for a text model
        try:
            return prepare_prompt(self.image_processor, prompt, images)
        except ImageInputError as exc:
            raise ApiError(400, f"messages: {exc}", param="messages") from exc

    def chat_images(self, body: ChatCompletionRequest) -> list[Any]:
        """The messages' images, decoded within the limits (400 for any problem)."""
        parts = [(i, j, part) for i, m in enumerate(body.messages) for j, part in m.image_parts()]
        if not parts:
            return []
        limits = self.config.media
        if len(parts) > limits.max_images:
            raise ApiError(
                400, f"{len(parts)} images in one request; the limit is {limits.max_images}", param="messages"
            )
        images = []
        for i, j, part in parts:
            where = f"messages[{i}].content[{j}]"
            try:
                images.append(load_image(image_url_of(part, where), limits, where))
            except ImageInputError as exc:
                raise ApiError(400, str(exc), param="messages") from exc
        return images

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
        tools: ToolPlan | None = None,
        multimodal: MultimodalPrompt | None = None,
    ) -> Response:
        if multimodal is not None and body.prompt_logprobs is not None:
            raise ApiError(400, "prompt_logprobs is not available with images", param="prompt_logprobs")
        guided = await self.guided(body)
        if guided is not None and tools is not None and tools.guided is not None:
            raise ApiError(
                400,
                "response_format / guided_* cannot be combined with tool_choice 'required' or a named "
                "function (both constrain the output)",
                param="tool_choice",
            )
        prepared = self.prepare(body, prompts, requested, logprobs, multimodal, guided)
        if tools is not None and tools.parser is not None:
            prepared = _with_tools(prepared, tools)
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
                return _sse_response(chat_events(meta, stream, formatter, tools), stream)
            return _sse_response(completion_events(meta, stream, formatter), stream)
        try:
            choices = await _collect(stream, len(prepared.items), request)
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it; the status shows in logs and metrics
        out = [_choice_json(chat, i, c, formatter, tools) for i, c in enumerate(choices)]
        extra = {}
        if scored is not None:
            wire = [prompt_logprobs_json(self.tokenizer, s) for s in scored]
            if chat:
                extra["prompt_logprobs"] = wire[0]
            else:
                for i, choice in enumerate(out):
                    choice["prompt_logprobs"] = wire[i // body.n]
        return self._respond(meta, kind, out, choices, extra)

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
        if k > self.vocab_size:
            raise ApiError(
                400,
                f"{k} prompt logprobs asked for a vocabulary of {self.vocab_size}",
                param="prompt_logprobs",
            )
        scored = []
        for ids in prompts:

            def score(engine: Engine, ids: list[int] = ids) -> PromptLogprobs:
                logits = prompt_logits(engine.runner.model, ids, engine.dtype, engine.runner.device)
                return prompt_logprobs(logits, ids, k)

            try:
                scored.append(await self.engine.call(score))
            except EngineUnavailableError as exc:
                raise ApiError(503, str(exc), "service_unavailable") from exc
            except ValueError as exc:  # non-finite logits: the model's numerics, not the request
                raise ApiError(500, str(exc), "server_error") from exc
        return scored

    def render_chat(
        self, body: ChatCompletionRequest | TokenizeChatRequest, tools: list[dict[str, Any]] | None
    ) -> str:
        if self.image_processor is None and any(m.image_parts() for m in body.messages):
            raise ApiError(400, "this model takes no images; send text parts only", param="messages")
        chat_template = body.chat_template
        if chat_template is not None and not self.config.trust_request_chat_template:
            raise ApiError(
                400,
                "this server does not take chat templates from requests (start it with "
                "--trust-request-chat-template to allow them); it uses the model's or --chat-template",
                param="chat_template",
            )
        if not (chat_template or self.tokenizer.chat_templates):
            raise ApiError(
                400,
                "this model has no chat template (chat_template.jinja, chat_template.json or "
                "tokenizer_config.json) and the server was started without --chat-template; use "
                "/v1/completions or send chat_template",
            )
        try:
            return render_chat(
                self.tokenizer,
                [m.model_dump(exclude_none=True) for m in body.messages],
                tools,
                body.add_generation_prompt,
                chat_template,
                body.chat_template_kwargs,
                body.continue_final_message,
            )
        except ChatInputError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        except Exception as exc:  # the template is checkpoint data: any failure is this request's
            raise ApiError(
                400, f"the chat template failed for these messages: {exc}", param="messages"
            ) from exc

    # -- /tokenize, /detokenize ------------------------------------------------------------------
    def tokenize(self, body: TokenizeCompletionRequest | TokenizeChatRequest) -> Response:
        self.check_model(body.model)
        if isinstance(body, TokenizeChatRequest):
            text = self.render_chat(body, body.tools)
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
        return JSONResponse(
            {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}
        )

    def detokenize(self, body: DetokenizeRequest) -> Response:
        self.check_model(body.model)
        bad = next((t for t in body.tokens if t >= self.tokenizer.vocab_size), None)
        if bad is not None:
            raise ApiError(
                400,
                f"token id {bad} is outside the vocabulary [0, {self.tokenizer.vocab_size})",
                param="tokens",
            )
        return JSONResponse({"prompt": self.tokenizer.decode(body.tokens)})

    def _respond(
        self,
        meta: StreamMeta,
        kind: str,
        out: list[dict[str, Any]],
        choices: list[_Choice],
        extra: dict[str, Any] | None = None,
    ) -> Response:
        failed = next((c for c in choices if c.finish_reason == "error"), None)
        if failed is not None:
            raise ApiError(500, failed.error or "generation failed", "server_error")
        aborted = next((c for c in choices if c.finish_reason == "abort"), None)
        if aborted is not None:
            raise ApiError(503, aborted.error or "the request was aborted", "service_unavailable")
        generated = sum(c.num_tokens for c in choices)
        cached = sum(c.num_cached_tokens for i, c in enumerate(choices) if i % meta.choices_per_prompt == 0)
        body = {
            "id": meta.response_id,
            "object": kind,
            "created": meta.created,
            "model": meta.model,
            "choices": out,
            "usage": usage(meta.num_prompt_tokens, generated, cached),
            **(extra or {}),
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
            c.num_cached_tokens = d.num_cached_tokens
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


def _with_tools(prepared: _Prepared, tools: ToolPlan) -> _Prepared:
    """The items with what tool calling needs: the call grammar of `required` / named choices, and
    special tokens kept in the text when the format's markers are special tokens."""
    items = [
        GenerationItem(
            item.prompt_token_ids,
            replace(
                item.params,
                guided_decoding=tools.guided or item.params.guided_decoding,
                skip_special_tokens=item.params.skip_special_tokens and tools.skip_special_tokens,
            ),
            item.multimodal,
        )
        for item in prepared.items
    ]
    return _Prepared(items, prepared.num_prompt_tokens)


def _choice_json(
    chat: bool, index: int, choice: _Choice, formatter: LogprobFormatter | None, tools: ToolPlan | None = None
) -> dict[str, Any]:
    if chat:
        reason = choice.finish_reason
        if tools is not None:
            message, called = assistant_message(tools, choice.text)
            reason = tools.finish_reason(called, reason)
        else:
            message = {"role": "assistant", "content": choice.text}
        return {
            "index": index,
            "message": message,
            "logprobs": formatter.chat(choice.logprobs) if formatter is not None else None,
            "finish_reason": reason,
        }
    logprobs = formatter.completion(choice.logprobs, 0)[0] if formatter is not None else None
    return {"index": index, "text": choice.text, "logprobs": logprobs, "finish_reason": choice.finish_reason}


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
        card = {
            "id": config.served_model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "anyquant",
            "max_model_len": server.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

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
