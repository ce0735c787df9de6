"""`anyquant quantize SRC DST --format F`: write an unquantized checkpoint in a quantized format."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="unquantized model directory")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--format", required=True, help="output format (see --list-formats)")
    parser.add_argument("--method", default="rtn", choices=["rtn"], help="quantization algorithm")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128, help="-1 for one scale per output channel")
    parser.add_argument("--sym", action="store_true", help="symmetric (no zero points)")
    parser.add_argument("--act-order", action="store_true", help="GPTQ act-order (writes a real g_idx)")
    parser.add_argument(
        "--scheme",
        default=None,
        help="preset of the target tool (compressed-tensors: W4A16, W8A8, FP8_DYNAMIC, FP8_BLOCK, ...)",
    )
    parser.add_argument("--block-size", type=int, nargs=2, default=(128, 128), metavar=("OUT", "IN"))
    parser.add_argument(
        "--skip", action="append", default=[], metavar="REGEX", help="leave matching layers unquantized"
    )
    parser.add_argument(
        "--lm-head", action="store_true", help="quantize lm_head too (where the format allows)"
    )
    parser.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    from anyquant.convert.quantize import quantize_checkpoint
    from anyquant.quant.formats.base import WriteOptions

    options = WriteOptions(
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        act_order=args.act_order,
        block_size=tuple(args.block_size),
        scheme=args.scheme,
    )
    report = quantize_checkpoint(
        args.src,
        args.dst,
        args.format,
        options,
        skip=args.skip,
        quantize_lm_head=args.lm_head,
        overwrite=args.overwrite,
    )
    quantized = [r for r in report.layers if r.rel_error is not None]
    print(
        f"wrote {args.dst} ({', '.join(report.files)}): {len(quantized)} layers quantized as {args.format}, "
        f"{len(report.skipped)} left unquantized"
    )
    for r in report.layers:
        err = f"rel. error {r.rel_error:.4f}" if r.rel_error is not None else ""
        print(f"  {r.prefix:48s} {r.spec:40s} {err}")
    return 0
