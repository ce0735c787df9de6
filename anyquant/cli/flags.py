"""Flags that several subcommands share, defined once (argparse only: `anyquant --help` stays light)."""

import argparse

ENFORCE_EAGER_HELP = (
    "run every step eagerly: skip compiling the decode step with torch.compile at load "
    "(vLLM's flag; the environment variable ANYQUANT_ENFORCE_EAGER=1 does the same)"
)


EXPERT_PARALLEL_HELP = (
    "with --tp N: each rank holds whole routed experts (about E/N) instead of a slice of every expert "
    "(MoE models)"
)


# loading/lm_head.py's LM_HEAD_DTYPES (a test checks they agree), spelled out here so that parsing
# flags imports no torch.
LM_HEAD_DTYPE_CHOICES = ("auto", "int8", "int4")


def add_lm_head_dtype(parser: argparse.ArgumentParser) -> None:
    """`--lm-head-dtype`: the LM head as stored, or quantized at load (loading/lm_head.py)."""
    parser.add_argument(
        "--lm-head-dtype",
        default="auto",
        choices=LM_HEAD_DTYPE_CHOICES,
        help="quantize an unquantized LM head at load: int8 per row (half its bytes per token, small "
        "perplexity cost), int4 asymmetric per group of 128 inputs (0.28 of its bytes, larger cost; "
        "benchmarks/RESULTS.md); auto: as stored",
    )


# layers/kv_quant.py's KV_CACHE_DTYPES (a test checks they agree), spelled out for the same reason.
KV_CACHE_DTYPE_CHOICES = ("auto", "int8")


def add_kv_cache_dtype(parser: argparse.ArgumentParser) -> None:
    """`--kv-cache-dtype`: the KV cache in the compute dtype, or as int8 rows (layers/kv_quant.py)."""
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPE_CHOICES,
        help="int8: keep cached keys and values as int8 codes with one fp32 scale per token and KV "
        "head (about half the bytes per token of bf16: twice the tokens in the same KV budget; small "
        "accuracy cost, benchmarks/RESULTS.md; not for latent-attention models); auto: the compute dtype",
    )


def add_weight_options(parser: argparse.ArgumentParser) -> None:
    """How `generate` and `serve` load a model's weights and hold its cache: a GGUF vision
    projector, an int8 LM head, int8 activations, expert parallelism, eager decode, an int8 KV
    cache (each an `LLM` keyword)."""
    parser.add_argument("--enforce-eager", action="store_true", default=None, help=ENFORCE_EAGER_HELP)
    parser.add_argument(
        "--mmproj",
        default=None,
        metavar="FILE",
        help="a GGUF model's vision projector (llama.cpp's mmproj file); a directory holding the model "
        "and one mmproj*.gguf finds it alone",
    )
    add_lm_head_dtype(parser)
    parser.add_argument(
        "--activation-dtype",
        default="auto",
        choices=["auto", "int8"],
        help="int8: quantize the activations of weight-only (W4A16/W8A16) layers per token, so they "
        "run on int8 dot products (faster on AVX512-VNNI CPUs; small accuracy cost); auto: as stored",
    )
    parser.add_argument("--enable-expert-parallel", action="store_true", help=EXPERT_PARALLEL_HELP)
    add_kv_cache_dtype(parser)
