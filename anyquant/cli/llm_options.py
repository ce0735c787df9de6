"""The `LLM` a command's flags describe: one mapping from flags to `LLM(...)` for every command.

A flag's argparse name is the `LLM` keyword it sets (`--lm-head-dtype` -> `lm_head_dtype`), and a
command passes only the ones it defines, so an option a command does not offer keeps `LLM`'s
default.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anyquant.llm import LLM

# The `LLM` keywords that commands expose as flags.
LLM_FLAGS = (
    "device",
    "dtype",
    "kernel",
    "lm_head_dtype",
    "activation_dtype",
    "mmproj",
    "max_model_len",
    "max_num_seqs",
    "kv_cache_gb",
    "kv_cache_fraction",
    "kv_cache_dtype",
    "tensor_parallel_size",
    "enable_expert_parallel",
    "chat_template",
    "debug_numerics",
    # store_true with default None: absent leaves the choice to LLM (the environment variable).
    "enforce_eager",
)


def llm_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `LLM` keywords among the command's flags, with their values."""
    flags = vars(args)
    return {name: flags[name] for name in LLM_FLAGS if name in flags}


def load_llm(args: argparse.Namespace) -> LLM:
    """`LLM(args.model, ...)` with every option the command's flags set."""
    from anyquant.llm import LLM

    return LLM(args.model, **llm_options(args))
