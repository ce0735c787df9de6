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


def add_weight_options(parser: argparse.ArgumentParser) -> None:
    """How `generate` and `serve` load a model's weights: a GGUF vision projector, an int8 LM
    head, int8 activations, expert parallelism, eager decode (each an `LLM` keyword)."""
    parser.add_argument("--enforce-eager", action="store_true", default=None, help=ENFORCE_EAGER_HELP)
    parser.add_argument(
        "--mmproj",
        default=None,
        metavar="FILE",
        help="a GGUF model's vision projector (llama.cpp's mmproj file); a directory holding the model "
        "and one mmproj*.gguf finds it alone",
    )
    parser.add_argument(
        "--lm-head-dtype",
        default="auto",
        choices=["auto", "int8"],
        help="int8: quantize an unquantized LM head per row at load (half its bytes per token, small "
        "perplexity cost)",
    )
    parser.add_argument(
        "--activation-dtype",
        default="auto",
        choices=["auto", "int8"],
        help="int8: quantize the activations of weight-only (W4A16/W8A16) layers per token, so they "
        "run on int8 dot products (faster on AVX512-VNNI CPUs; small accuracy cost); auto: as stored",
    )
    parser.add_argument("--enable-expert-parallel", action="store_true", help=EXPERT_PARALLEL_HELP)
