"""`Request`: the state of one generation request as the engine core sees it.

Owns the token ids (prompt and output), the status and finish reason, how many tokens are already
in the KV cache and the request's page table (page ids only). It holds no tensors and imports no
torch: the scheduler and the page allocator mutate it, the model runner only reads it. Sampling
(including per-request seeds) and detokenization belong to other modules. A request with images
carries them as an opaque `MultimodalPrompt` (engine/multimodal.py), read by the runner.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Annotation only: sampling.py imports torch, which the engine core must not pull in.
    from anyquant.engine.multimodal import MultimodalPrompt
    from anyquant.engine.sampling import SamplingParams


def invalid_token_id(token_ids: Iterable[int], vocab_size: int | None) -> str | None:
    """What is wrong with the first prompt token id outside [0, vocab_size), or None (the
    embedding lookup would otherwise fail with a bare IndexError)."""
    for t in token_ids:
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            limit = f"[0, {vocab_size})" if vocab_size is not None else "non-negative ids"
            return f"prompt token id {t} is outside the vocabulary {limit}"
    return None


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # pages taken back; waits at the front of the queue to recompute
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS


# The OpenAI-style finish_reason string of each terminal status.
_FINISH_REASONS: dict[RequestStatus, str] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """One request. `num_computed_tokens` counts the leading tokens whose K/V sit in the pages of
    `page_ids`; the tokens after them (at least the last one while running) still have to be fed
    to the model. The newest sampled token is never computed until the next step feeds it."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Iterable[int],
        sampling_params: SamplingParams,
        eos_token_ids: Iterable[int] = (),
        vocab_size: int | None = None,
        multimodal: MultimodalPrompt | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids: list[int] = [int(t) for t in prompt_token_ids]
        if not self.prompt_token_ids:
            raise ValueError(f"request {request_id!r}: empty prompt; at least one token is needed")
        bad = invalid_token_id(self.prompt_token_ids, vocab_size)
        if bad is not None:
            raise ValueError(f"request {request_id!r}: {bad}")
        self.sampling_params = sampling_params
        # eos comes from the tokenizer, not from SamplingParams; ignore_eos switches it off.
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.output_token_ids: list[int] = []
        # prompt + output in one list, so the runner can slice the tokens to feed without copying.
        self._token_ids: list[int] = list(self.prompt_token_ids)
        self.status = RequestStatus.WAITING
        self.error: str | None = None
        self.stop_token_id: int | None = None  # the eos / stop token that finished it (not in output)
        self.arrival = -1  # position in arrival order, set by Scheduler.add
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at the last admission
        self.num_preemptions = 0
        self.page_ids: list[int] = []
        self.multimodal = multimodal
        if multimodal is not None and multimodal.num_prompt_tokens != len(self.prompt_token_ids):
            raise ValueError(
                f"request {request_id!r}: its images were laid out for {multimodal.num_prompt_tokens} "
                f"prompt tokens, the prompt has {len(self.prompt_token_ids)}"
            )
        # Prefix-cache keys of the prompt when they differ from its ids (images: see multimodal.py).
        self._prompt_keys = None if multimodal is None else multimodal.cache_key_ids(self.prompt_token_ids)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, pages={len(self.page_ids)})"
        )

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens. Read-only by convention: append through `append_token`."""
        return self._token_ids

    @property
    def cache_key_ids(self) -> list[int]:
        """What the prefix cache hashes: the token ids, except that image placeholders stand for
        their image's content. Read-only by convention."""
        if self._prompt_keys is None:
            return self._token_ids
        return self._prompt_keys + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self._token_ids) - self.num_computed_tokens

    @property
    def max_tokens(self) -> int:
        return self.sampling_params.max_tokens

    def reaches_end(self, num_new_tokens: int) -> bool:
        """Whether computing `num_new_tokens` more tokens covers every known token, so the last of
        them yields logits from which the next token is sampled."""
        return self.num_computed_tokens + num_new_tokens >= self.num_tokens

    # -- state ---------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """ "stop" | "length" | "abort" | "error", or None while the request is not finished."""
        return _FINISH_REASONS.get(self.status)

    def is_stop_token(self, token: int) -> bool:
        params = self.sampling_params
        return token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)

    def append_token(self, token: int) -> None:
        self.output_token_ids.append(token)
        self._token_ids.append(token)

    def finish(self, status: RequestStatus, error: str | None = None) -> None:
        if not status.is_finished:
            raise ValueError(f"request {self.request_id!r}: {status.name} is not a finished status")
        self.status = status
        self.error = error
