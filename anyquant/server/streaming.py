"""From engine events to OpenAI wire shapes: server-sent events, streamed chunks, logprobs.

Owns SSE framing (`data: {...}` and the final `data: [DONE]`), the chunk layouts of streamed
completions and chat completions, errors inside a stream, and logprob formatting. Whatever way a
stream ends (finished, failed, client gone, server shutting down), its unfinished requests are
aborted, which frees their KV pages.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from anyquant.engine.async_engine import RequestStream
from anyquant.engine.engine import RequestDelta
from anyquant.engine.scoring import PromptLogprobs
from anyquant.server.protocol import usage
from anyquant.server.tool_parsers import ToolCallStream
from anyquant.server.tools import ToolPlan
from anyquant.tokenizer import Tokenizer

SSE_DONE = "data: [DONE]\n\n"
# JSON has no -inf; OpenAI-compatible servers send this for a log-probability of zero.
_NEG_INF_LOGPROB = -9999.0


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(',', ':'))}\n\n"


def error_payload(message: str, kind: str = "server_error", code: int = 500) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else _NEG_INF_LOGPROB


class LogprobFormatter:
    """Engine logprobs (one dict per token: the sampled token first, then the top-k) -> OpenAI."""

    def __init__(self, tokenizer: Tokenizer, k: int) -> None:
        self.tokenizer = tokenizer
        self.k = k

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _top(self, entry: dict[int, float]) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda kv: -kv[1])[: self.k]

    def completion(self, entries: list[dict[int, float]], offset: int) -> tuple[dict[str, Any], int]:
        """The legacy completions layout; `offset` is the text offset of the first token."""
        tokens: list[str] = []
        token_logprobs: list[float] = []
        top_logprobs: list[dict[str, float]] = []
        offsets: list[int] = []
        for entry in entries:
            token, logprob = next(iter(entry.items()))
            text = self._text(token)
            tokens.append(text)
            token_logprobs.append(_finite(logprob))
            top_logprobs.append({self._text(t): _finite(lp) for t, lp in self._top(entry)})
            offsets.append(offset)
            offset += len(text)
        return (
            {
                "tokens": tokens,
                "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs,
                "text_offset": offsets,
            },
            offset,
        )

    def chat(self, entries: list[dict[int, float]]) -> dict[str, Any]:
        content = []
        for entry in entries:
            token, logprob = next(iter(entry.items()))
            content.append(
                {
                    **self._token(token, logprob),
                    "top_logprobs": [self._token(t, lp) for t, lp in self._top(entry)],
                }
            )
        return {"content": content}

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        text = self._text(token)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def prompt_logprobs_json(tokenizer: Tokenizer, scored: PromptLogprobs) -> list[dict[str, Any] | None]:
    """vLLM's wire form of prompt_logprobs: per position None or {token id: {logprob, rank,
    decoded_token}}, the prompt token first, then the top-k ranked 1..k."""
    out: list[dict[str, Any] | None] = []
    for entry, rank in zip(scored.entries, scored.ranks):
        if entry is None:
            out.append(None)
            continue
        token = next(iter(entry))
        # Every token more likely than one of the top k is in the top k too, so counting within
        # the entry ranks them; the prompt token's own rank comes from the whole vocabulary.
        ranked = {t: 1 + sum(lp > entry[t] for lp in entry.values()) for t in entry}
        ranked[token] = rank if rank is not None else ranked[token]
        out.append(
            {
                str(t): {
                    "logprob": _finite(entry[t]),
                    "rank": ranked[t],
                    "decoded_token": tokenizer.decode([t], skip_special_tokens=False),
                }
                for t in entry
            }
        )
    return out


@dataclass(frozen=True)
class StreamMeta:
    """What every chunk of one response repeats."""

    response_id: str
    created: int
    model: str
    num_choices: int
    num_prompt_tokens: int
    include_usage: bool
    choices_per_prompt: int = 1  # n: usage counts the prefix-cache hits of each prompt's first choice


async def _event_stream(
    meta: StreamMeta,
    stream: RequestStream,
    base: dict[str, Any],
    opening: list[dict[str, Any]],
    choice_for: Callable[[int, RequestDelta], list[dict[str, Any]]],
) -> AsyncIterator[str]:
    """The loop both streamed endpoints share: `opening` choices first, then one chunk per choice
    that `choice_for(index, delta)` makes of a delta (none: nothing to send), an error event if
    a request fails, the usage chunk when asked for, [DONE]; unfinished requests are aborted."""
    extra = {"usage": None} if meta.include_usage else {}
    generated = 0
    cached = 0
    try:
        for choice in opening:
            yield sse({**base, "choices": [choice], **extra})
        async for event in stream:
            delta = event.delta
            generated += len(delta.new_token_ids)
            if event.index % meta.choices_per_prompt == 0:
                cached += delta.num_cached_tokens
            if delta.finish_reason == "error":
                yield sse(error_payload(delta.error or "generation failed"))
                break
            for built in choice_for(event.index, delta):
                yield sse({**base, "choices": [built], **extra})
        else:
            if meta.include_usage:
                totals = usage(meta.num_prompt_tokens, generated, cached).model_dump()
                yield sse({**base, "choices": [], "usage": totals})
        yield SSE_DONE
    finally:
        stream.abort()  # no-op when every choice finished; frees the pages of a client that left


def _has_news(delta: RequestDelta, logprobs: LogprobFormatter | None) -> bool:
    # Every step that produced tokens is news, even when its text delta is empty (a token that
    # decodes to nothing, half a UTF-8 character, a possible stop-string prefix held back): clients
    # time the first token and the gaps between tokens from these chunks.
    return bool(delta.new_token_ids or delta.new_text or delta.finished or (logprobs and delta.logprobs))


def completion_events(
    meta: StreamMeta, stream: RequestStream, logprobs: LogprobFormatter | None
) -> AsyncIterator[str]:
    """SSE for /v1/completions with stream=true."""
    base = {"id": meta.response_id, "object": "text_completion", "created": meta.created, "model": meta.model}
    offsets = [0] * meta.num_choices

    def choice_for(index: int, delta: RequestDelta) -> list[dict[str, Any]]:
        if not _has_news(delta, logprobs):
            return []
        choice: dict[str, Any] = {
            "index": index,
            "text": delta.new_text,
            "logprobs": None,
            "finish_reason": delta.finish_reason if delta.finished else None,
        }
        if logprobs is not None:
            choice["logprobs"], offsets[index] = logprobs.completion(delta.logprobs, offsets[index])
        return [choice]

    return _event_stream(meta, stream, base, [], choice_for)


def chat_events(
    meta: StreamMeta,
    stream: RequestStream,
    logprobs: LogprobFormatter | None,
    tools: ToolPlan | None = None,
) -> AsyncIterator[str]:
    """SSE for /v1/chat/completions with stream=true: a role chunk per choice, then content. With
    `tools` (the request may call tools) each choice's text goes through its own parser
    stream: content as it is known not to be a call, each call once complete (OpenAI's delta
    shape: index, id, name, then the arguments), and finish_reason "tool_calls" if it called any."""
    base = {
        "id": meta.response_id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
    }
    roles = [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        for i in range(meta.num_choices)
    ]
    parsers = [tools.stream() for _ in range(meta.num_choices)] if tools is not None else None

    def choice_for(index: int, delta: RequestDelta) -> list[dict[str, Any]]:
        if not _has_news(delta, logprobs):
            return []
        finish = delta.finish_reason if delta.finished else None
        lp = logprobs.chat(delta.logprobs) if logprobs is not None else None
        parser = parsers[index] if parsers is not None else None
        if tools is None or parser is None:
            return [
                {
                    "index": index,
                    "delta": {"content": delta.new_text} if delta.new_text or delta.new_token_ids else {},
                    "logprobs": lp,
                    "finish_reason": finish,
                }
            ]
        return _tool_choices(index, delta, parser, tools, lp, finish)

    return _event_stream(meta, stream, base, roles, choice_for)


def _tool_choices(
    index: int,
    delta: RequestDelta,
    parser: ToolCallStream,
    tools: ToolPlan,
    lp: dict[str, Any] | None,
    finish: str | None,
) -> list[dict[str, Any]]:
    """The chunks of one delta of a choice whose text is parsed for tool calls."""
    first_call = len(parser.calls)
    got = parser.feed(delta.new_text)
    if delta.finished:
        rest = parser.finish()
        got.content += rest.content
        got.calls += rest.calls
        finish = tools.finish_reason(bool(parser.calls), finish)
    deltas: list[dict[str, Any]] = []
    if got.content or (delta.new_token_ids and not got.calls):
        deltas.append({"content": got.content})  # an empty one still marks the token's arrival
    for k, call in enumerate(got.calls):
        at = first_call + k
        head = {
            "index": at,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        deltas.append({"tool_calls": [head]})
        deltas.append({"tool_calls": [{"index": at, "function": {"arguments": call.arguments}}]})
    if not deltas:
        deltas.append({})
    chunks: list[dict[str, Any]] = [
        {"index": index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas
    ]
    chunks[0]["logprobs"] = lp
    chunks[-1]["finish_reason"] = finish
    return chunks
