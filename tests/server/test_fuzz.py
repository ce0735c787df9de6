"""Property-based run over the server's own OpenAPI schema (schemathesis + hypothesis): whatever
the generated request, valid or not, the answer is never a 5xx."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import MODEL, AppFactory

pytestmark = pytest.mark.slow

# Examples per operation and mode (derandomized: the same ones every run).
EXAMPLES = {"/v1/completions": 80, "/v1/chat/completions": 80}


@pytest.fixture
def fuzz_app(make_app: AppFactory) -> FastAPI:
    # One app per test: schemathesis runs the app's lifespan and shuts it down after each test.
    # Small limits keep every accepted generation short: at most 8 sequences (n beyond that is a
    # 400) of at most 32 tokens.
    return make_app(max_model_len=32, max_num_seqs=4, config={"max_waiting": 4})


def _operations(app: FastAPI) -> list[Any]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(
    fuzz_app: FastAPI, mode: schemathesis.GenerationMode
) -> None:
    seen: dict[str, set[int]] = {}
    for operation in _operations(fuzz_app):
        if mode is schemathesis.GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # parameterless GETs have no invalid form
        examples = EXAMPLES.get(operation.path, 15)

        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,  # the same examples on every run
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=operation.as_strategy(generation_mode=mode), served=st.booleans())
        def check(case: Any, served: bool) -> None:
            # Half of the bodies name the served model, so they reach generation instead of a 404.
            if served and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL
            response = case.call(timeout=60)
            seen.setdefault(case.operation.path, set()).add(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.text}"

        check()
    # The run reached generation, and refused bad input, on both generation endpoints.
    for path in ("/v1/completions", "/v1/chat/completions"):
        codes = seen[path]
        if mode is schemathesis.GenerationMode.POSITIVE:
            assert 200 in codes, (path, codes)
        assert codes & {400, 404}, (path, codes)
    assert fuzz_app.state.llm.engine.allocator.num_used == 0
