"""Shared pieces of the property-based loading tests (tests/loading/test_properties_*.py).

- Hypothesis settings: profile `anyquant-ci` (the default) is derandomized, so CI runs the same
  examples every time; `ANYQUANT_HYPOTHESIS_PROFILE=anyquant-explore` draws fresh random examples,
  ten times as many, for a longer local search. Profiles are applied per test (`fuzz_settings`),
  never loaded globally, so other hypothesis users in the suite keep their own settings.
- `load_outcome`: one load under a wall-clock limit, sorted into "loaded" (with logits) or "refused"
  (an anyquant error); anything else (a bare KeyError, TypeError, struct.error..., or a hang) fails
  the test with the exception and its traceback.
- `json_values`: adversarial JSON values for fields (wrong types, zero, negative, huge numbers).
"""

from __future__ import annotations

import os
import signal
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from anyquant import LLM
from anyquant.errors import AnyquantError, TensorError

_COMMON = dict(
    deadline=None,
    database=None,  # no example database written into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.register_profile("anyquant-ci", derandomize=True, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("anyquant-explore", derandomize=False, **_COMMON)  # type: ignore[arg-type]
PROFILE = os.environ.get("ANYQUANT_HYPOTHESIS_PROFILE", "anyquant-ci")
_SCALE = 10 if PROFILE == "anyquant-explore" else 1

# Each case gets this long; loads of these tiny models take milliseconds, so hitting it is a hang.
CASE_TIMEOUT_S = 20.0
TOKENS = [1, 5, 9, 12, 3]


def fuzz_settings(max_examples: int) -> settings:
    return settings(settings.get_profile(PROFILE), max_examples=max_examples * _SCALE)


def record(outcome: str) -> None:
    """Count an outcome in hypothesis' statistics (`--hypothesis-show-statistics`)."""
    if currently_in_test_context():
        event(outcome)


class Hang(AssertionError):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail with `Hang` if the block runs longer than `seconds` (SIGALRM: main thread, POSIX)."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds:.0f}s: a hang")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Outcome:
    logits: torch.Tensor | None = None  # loaded: teacher-forced logits of TOKENS
    error: AnyquantError | None = None  # refused

    @property
    def loaded(self) -> bool:
        return self.logits is not None


def load_outcome(path: Path, tokens: list[int] = TOKENS) -> Outcome:
    """Load `path` with the public API and run a forward pass; an anyquant error is an outcome,
    any other exception (or running past CASE_TIMEOUT_S) fails the test."""
    try:
        with time_limit(CASE_TIMEOUT_S):
            llm = LLM(path, max_num_seqs=1, kv_cache_gb=0.001, max_model_len=16)
            return Outcome(logits=llm.logits(tokens))
    except AnyquantError as exc:
        return Outcome(error=exc)
    except Hang:
        raise
    except Exception as exc:
        raise AssertionError(
            f"bare {type(exc).__name__} escaped instead of an anyquant error: {exc}\n{traceback.format_exc()}"
        ) from exc


def assert_names(error: AnyquantError, *needles: str) -> None:
    """The message must name at least one of `needles` (the file, tensor or field involved); a
    `TensorError` always names its tensor."""
    if isinstance(error, TensorError):
        return
    message = str(error)
    assert any(n in message for n in needles), f"{type(error).__name__} names none of {needles}: {message}"


# -- adversarial JSON values -------------------------------------------------------------------
EDGE_INTS = [0, -1, 1, 2, 3, 7, 31, 2**31, 2**32 + 1, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63)]


def json_scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(EDGE_INTS),
        st.integers(min_value=-5, max_value=300),
        st.floats(allow_nan=False, allow_infinity=False, width=32),
        st.sampled_from([float("nan"), float("inf"), -0.0, 0.5, 1e-30, 1e30]),
        st.text(max_size=8),
        st.sampled_from(["", "4", "none", "int", "float", "true", "auto", "-1"]),
    )


def json_values(max_leaves: int = 6) -> st.SearchStrategy[Any]:
    """Scalars, and lists / objects of them (nested a little)."""
    return st.recursive(
        json_scalars(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.text(max_size=6), inner, max_size=3),
        ),
        max_leaves=max_leaves,
    )


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """`one_of` with weights: mutations that reach deep into loading (near-valid values) are drawn
    more often than ones refused at the first check (a whole file replaced by junk)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
