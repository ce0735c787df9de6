"""`anyquant convert SRC DST --format F`: rewrite a quantized checkpoint in another format, exactly."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="quantized model directory")
    parser.add_argument("dst", help="output directory (new or empty)")
    parser.add_argument(
        "--format",
        required=True,
        help="output format (the values `quantize --format` takes, or gguf: Q4_0 / Q8_0 where exact)",
    )
    parser.add_argument(
        "--requantize",
        action="store_true",
        help="re-quantize layers the target cannot hold exactly (lossy; reports each layer's error)",
    )
    parser.add_argument(
        "--allow-reorder",
        action="store_true",
        help="permute MLP intermediate dimensions so act-order down projections become plain groups (exact)",
    )
    parser.add_argument(
        "--pad-for-tp",
        type=int,
        default=1,
        metavar="N",
        help="zero-pad intermediate sizes so N tensor-parallel ranks get whole groups and tiles (exact)",
    )
    parser.add_argument(
        "--tile",
        type=int,
        default=None,
        help="with --pad-for-tp: per-rank sizes are multiples of this many features (default 128)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def run(args: argparse.Namespace) -> int:
    from anyquant.convert.converter import ConvertOptions, convert_checkpoint
    from anyquant.convert.padding import DEFAULT_TILE

    options = ConvertOptions(
        requantize=args.requantize,
        allow_reorder=args.allow_reorder,
        pad_for_tp=args.pad_for_tp,
        tile=args.tile or DEFAULT_TILE,
        overwrite=args.overwrite,
    )
    if args.format == "gguf":  # one file with its own metadata, not a checkpoint directory
        from anyquant.convert.gguf_target import convert_to_gguf

        report = convert_to_gguf(args.src, args.dst, options)
    else:
        report = convert_checkpoint(args.src, args.dst, args.format, options)
    counts: dict[str, int] = {}
    for layer in report.layers:
        counts[layer.how] = counts.get(layer.how, 0) + 1
    summary = ", ".join(f"{n} {how}" for how, n in counts.items())
    print(
        f"wrote {args.dst} ({', '.join(report.files)}) as {args.format}, scales {report.scale_dtype}: {summary}"
    )
    for line in report.padding:
        print(f"  padded: {line}")
    for r in report.layers:
        err = f"rel. error {r.rel_error:.4g}" if r.rel_error is not None else ""
        print(f"  {r.prefix:48s} {r.how:12s} {r.source} -> {r.target} {err}")
        if r.reason and r.how == "requantized":
            print(f"  {'':48s} why: {r.reason}")
    return 0
