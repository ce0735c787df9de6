"""Each command's model flags reach `LLM(...)` through one mapping (cli/llm_options.py)."""

from __future__ import annotations

import inspect

import pytest

from anyquant.bench.offline import bench_offline
from anyquant.cli.llm_options import LLM_FLAGS, llm_options
from anyquant.cli.main import build_parser
from anyquant.llm import LLM


def test_every_flag_is_an_llm_keyword() -> None:
    assert set(LLM_FLAGS) <= set(inspect.signature(LLM.__init__).parameters)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["generate", "M", "--prompt", "x", "--dtype", "bfloat16", "--tp", "2", "--debug-numerics"],
            {
                "device": "cpu",
                "dtype": "bfloat16",
                "kernel": None,
                "lm_head_dtype": "auto",
                "activation_dtype": "auto",
                "mmproj": None,
                "tensor_parallel_size": 2,
                "enable_expert_parallel": False,
                "enforce_eager": None,
                "chat_template": None,
                "debug_numerics": True,
                "kv_cache_dtype": "auto",
            },
        ),
        (
            [
                "serve",
                "M",
                "--kv-cache-gb",
                "1.5",
                "--max-num-seqs",
                "8",
                "--kernel",
                "reference",
                "--enforce-eager",
                "--lm-head-dtype",
                "int4",
                "--kv-cache-dtype",
                "int8",
            ],
            {
                "device": "cpu",
                "dtype": "auto",
                "kernel": "reference",
                "lm_head_dtype": "int4",
                "activation_dtype": "auto",
                "mmproj": None,
                "enforce_eager": True,
                "max_model_len": None,
                "max_num_seqs": 8,
                "kv_cache_gb": 1.5,
                "kv_cache_fraction": None,
                "enable_expert_parallel": False,
                "tensor_parallel_size": 1,
                "chat_template": None,
                "kv_cache_dtype": "int8",
            },
        ),
        (
            ["bench", "offline", "M", "--lm-head-dtype", "int8", "--activation-dtype", "int8"],
            {
                "device": "cpu",
                "dtype": "auto",
                "kernel": None,
                "lm_head_dtype": "int8",
                "activation_dtype": "int8",
                "tensor_parallel_size": 1,
                "enable_expert_parallel": False,
                "kv_cache_dtype": "auto",
            },
        ),
    ],
    ids=["generate", "serve", "bench-offline"],
)
def test_commands_pass_the_flags_they_define(argv: list[str], expected: dict[str, object]) -> None:
    assert llm_options(build_parser().parse_args(argv)) == expected


def test_bench_offline_takes_the_options_of_its_command() -> None:
    options = llm_options(build_parser().parse_args(["bench", "offline", "M"]))
    assert set(options) <= set(inspect.signature(bench_offline).parameters)
