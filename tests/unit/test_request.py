"""Request state: sizes, token appends, finish reasons, stop tokens; the engine core imports no torch."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from anyquant.engine.request import Request, RequestStatus
from anyquant.engine.sampling import SamplingParams


def make(prompt: list[int], **params: Any) -> Request:
    return Request("r", prompt, SamplingParams(**params))


def test_new_request_is_waiting_with_nothing_computed() -> None:
    r = make([5, 6, 7], max_tokens=4)
    assert r.status is RequestStatus.WAITING
    assert (r.num_tokens, r.num_prompt_tokens, r.num_output_tokens) == (3, 3, 0)
    assert r.num_uncomputed == 3
    assert r.page_ids == []
    assert not r.is_finished and r.finish_reason is None
    assert r.max_tokens == 4


def test_append_token_extends_output_and_all_tokens() -> None:
    r = make([5, 6, 7])
    r.num_computed_tokens = 3
    r.append_token(9)
    assert r.output_token_ids == [9]
    assert r.all_token_ids == [5, 6, 7, 9]
    assert r.prompt_token_ids == [5, 6, 7]
    assert r.num_uncomputed == 1


def test_reaches_end_only_when_every_known_token_is_covered() -> None:
    r = make([1, 2, 3, 4, 5])
    r.num_computed_tokens = 2
    assert not r.reaches_end(2)
    assert r.reaches_end(3)


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (RequestStatus.FINISHED_STOPPED, "stop"),
        (RequestStatus.FINISHED_LENGTH, "length"),
        (RequestStatus.FINISHED_ABORTED, "abort"),
        (RequestStatus.FINISHED_ERROR, "error"),
    ],
)
def test_finish_sets_reason(status: RequestStatus, reason: str) -> None:
    r = make([1])
    r.finish(status, "why" if reason == "error" else None)
    assert r.is_finished and r.finish_reason == reason
    assert r.error == ("why" if reason == "error" else None)


@pytest.mark.parametrize("status", [RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.PREEMPTED])
def test_finish_rejects_unfinished_status(status: RequestStatus) -> None:
    with pytest.raises(ValueError, match=status.name):
        make([1]).finish(status)


def test_empty_negative_or_out_of_vocabulary_prompt_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        make([])
    with pytest.raises(ValueError, match="prompt token id -3 is outside"):
        make([1, -3])
    with pytest.raises(ValueError, match=r"prompt token id 300 is outside the vocabulary \[0, 300\)"):
        Request("r", [1, 299, 300], SamplingParams(), vocab_size=300)
    assert Request("r", [0, 299], SamplingParams(), vocab_size=300).prompt_token_ids == [0, 299]


def test_stop_tokens_eos_and_ignore_eos() -> None:
    r = Request("r", [1], SamplingParams(stop_token_ids=[7]), eos_token_ids=[2])
    assert r.is_stop_token(7) and r.is_stop_token(2) and not r.is_stop_token(3)
    r = Request("r", [1], SamplingParams(stop_token_ids=[7], ignore_eos=True), eos_token_ids=[2])
    assert r.is_stop_token(7) and not r.is_stop_token(2)


def test_engine_core_imports_no_torch() -> None:
    code = (
        "import sys; import anyquant.engine.request, anyquant.engine.pages, anyquant.engine.scheduler; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
