"""`kv_cache_dtype="int8"` under tensor parallelism: every rank's cache twin holds int8 rows (the
cache announcement carries the dtype), so TP 2 picks the tokens TP 1 picks on an int8 cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant import LLM, SamplingParams
from anyquant.utils.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow


def test_tp2_int8_cache_picks_the_tp1_tokens(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path, "qwen2", seed=21)
    prompts = [[256, 30 + i, 90 - i, *range(i, 3 * i)] for i in range(4)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    single = LLM(model, dtype="float32", kv_cache_dtype="int8", enforce_eager=True)
    want = [o.token_ids for o in single.generate(prompt_token_ids=prompts, sampling_params=params)]
    with LLM(model, dtype="float32", tensor_parallel_size=2, kv_cache_dtype="int8", enforce_eager=True) as tp:
        assert tp.engine.runner.cache.k.dtype == torch.int8
        got = [o.token_ids for o in tp.generate(prompt_token_ids=prompts, sampling_params=params)]
    assert got == want
