"""`anyquant <command>`: builds the sub-commands and turns anyquant errors into one-line messages.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from anyquant import __version__
from anyquant.errors import AnyquantError

_COMMANDS = {
    "inspect": "describe a checkpoint's quantization per layer without reading tensor data",
    "quantize": "quantize an unquantized checkpoint into a format (round-to-nearest)",
    "convert": "rewrite a quantized checkpoint in another format, exactly (or --requantize), optionally padded for TP",
    "generate": "generate text from a prompt",
    "bench": "measure throughput and memory (offline)",
    "serve": "serve an OpenAI-compatible HTTP API (completions, chat, streaming, metrics)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anyquant", description="Run quantized LLM checkpoints from any tool."
    )
    parser.add_argument("--version", action="version", version=f"anyquant {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and debug details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in _COMMANDS.items():
        module = importlib.import_module(f"anyquant.cli.{name}")
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.run(args))
    except AnyquantError as exc:
        print(f"anyquant {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
