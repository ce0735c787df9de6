"""A generation's HTTP response: collected into one JSON body, or streamed as server-sent events.

Owns gathering a non-streaming request's choices (aborting it when the client hangs up first),
the choices and body of its response, built from the response models of protocol.py (the one
home of each response shape), and the SSE response of a streaming one (its events: streaming.py).
A choice that failed or was aborted turns the whole response into the error it carries.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from anyquant.engine.async_engine import RequestStream
from anyquant.server.errors import ApiError
from anyquant.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    Usage,
    usage,
)
from anyquant.server.streaming import LogprobFormatter, StreamMeta
from anyquant.server.tools import ToolPlan, assistant_message


def json_response(model: BaseModel) -> Response:
    """`model` as JSON. Responses set every field they carry, so leaving out the unset ones drops
    only the optional fields a response does not carry (e.g. `prompt_logprobs`)."""
    return JSONResponse(model.model_dump(exclude_unset=True))


@dataclass
class Choice:
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    num_cached_tokens: int = 0


class ClientGone(Exception):
    pass


async def collect(stream: RequestStream, n: int, request: Request) -> list[Choice]:
    """Gather a non-streaming response; abort it (raising ClientGone) if the client hangs up
    first. The ASGI server reports a hang-up as the next message on `receive`."""
    gather = asyncio.ensure_future(_gather(stream, n))
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({gather, watch}, return_when=asyncio.FIRST_COMPLETED)
        if gather in done:
            return gather.result()
        raise ClientGone
    finally:
        gather.cancel()
        watch.cancel()
        stream.abort()


async def _gather(stream: RequestStream, n: int) -> list[Choice]:
    choices = [Choice() for _ in range(n)]
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


def sse_response(events: AsyncIterator[str], stream: RequestStream) -> StreamingResponse:
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


def chat_choice(
    index: int, choice: Choice, formatter: LogprobFormatter | None, tools: ToolPlan | None = None
) -> ChatChoice:
    reason = choice.finish_reason
    if tools is not None:
        message, called = assistant_message(tools, choice.text)
        reason = tools.finish_reason(called, reason)
    else:
        message = {"role": "assistant", "content": choice.text}
    return ChatChoice(
        index=index,
        message=AssistantMessage.model_validate(message),
        logprobs=formatter.chat(choice.logprobs) if formatter is not None else None,
        finish_reason=reason,
    )


def completion_choice(
    index: int,
    choice: Choice,
    formatter: LogprobFormatter | None,
    prompt_logprobs: list[dict[str, Any] | None] | None = None,
) -> CompletionChoice:
    logprobs = formatter.completion(choice.logprobs, 0)[0] if formatter is not None else None
    extra = {} if prompt_logprobs is None else {"prompt_logprobs": prompt_logprobs}
    return CompletionChoice(
        index=index, text=choice.text, logprobs=logprobs, finish_reason=choice.finish_reason, **extra
    )


def check_choices(choices: list[Choice]) -> None:
    """A failed choice fails the response (500); an aborted one means the server is going (503)."""
    failed = next((c for c in choices if c.finish_reason == "error"), None)
    if failed is not None:
        raise ApiError(500, failed.error or "generation failed", "server_error")
    aborted = next((c for c in choices if c.finish_reason == "abort"), None)
    if aborted is not None:
        raise ApiError(503, aborted.error or "the request was aborted", "service_unavailable")


def _usage(meta: StreamMeta, choices: list[Choice]) -> Usage:
    generated = sum(c.num_tokens for c in choices)
    cached = sum(c.num_cached_tokens for i, c in enumerate(choices) if i % meta.choices_per_prompt == 0)
    return usage(meta.num_prompt_tokens, generated, cached)


def chat_response(
    meta: StreamMeta,
    out: list[ChatChoice],
    choices: list[Choice],
    prompt_logprobs: list[dict[str, Any] | None] | None = None,
) -> Response:
    check_choices(choices)
    extra = {} if prompt_logprobs is None else {"prompt_logprobs": prompt_logprobs}
    body = ChatCompletionResponse(
        id=meta.response_id,
        object="chat.completion",
        created=meta.created,
        model=meta.model,
        choices=out,
        usage=_usage(meta, choices),
        **extra,
    )
    return json_response(body)


def completion_response(meta: StreamMeta, out: list[CompletionChoice], choices: list[Choice]) -> Response:
    check_choices(choices)
    body = CompletionResponse(
        id=meta.response_id,
        object="text_completion",
        created=meta.created,
        model=meta.model,
        choices=out,
        usage=_usage(meta, choices),
    )
    return json_response(body)
