"""`anyquant generate MODEL --prompt TEXT [--image FILE]`: one-shot generation for demos and smoke tests."""

from __future__ import annotations

import argparse
import time
from typing import Any

from anyquant.cli.flags import add_weight_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="with --chat: a chat template file (or the template itself) instead of the model's",
    )
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="an image for a vision-language model (repeatable); with --chat the template places it "
        "before the text, otherwise put one placeholder per image in --prompt",
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernel", default=None, help="force a kernel for quantized layers (e.g. reference)")
    add_weight_options(parser)
    parser.add_argument(
        "--tensor-parallel-size", "--tp", type=int, default=1, metavar="N", help="run N tensor-parallel ranks"
    )
    parser.add_argument(
        "--debug-numerics",
        action="store_true",
        help="on non-finite logits, name the first layer whose output overflowed",
    )


def run(args: argparse.Namespace) -> int:
    from anyquant.cli.llm_options import load_llm
    from anyquant.engine.sampling import SamplingParams
    from anyquant.errors import AnyquantError

    t0 = time.perf_counter()
    llm = load_llm(args)
    t1 = time.perf_counter()
    prompt = args.prompt
    if args.chat:
        if llm.tokenizer is None:
            raise AnyquantError("--chat needs tokenizer files in the model directory")
        content: str | list[dict[str, str]] = prompt
        if args.image:
            content = [{"type": "image"} for _ in args.image] + [{"type": "text", "text": prompt}]
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": content}])
    request: str | dict[str, Any] = prompt
    if args.image:
        request = {"prompt": prompt, "multi_modal_data": {"image": [_open_image(f) for f in args.image]}}
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    out = llm.generate([request], params)[0]
    t2 = time.perf_counter()
    print(args.prompt + out.text)
    fmt = llm.loaded.format.describe() if llm.loaded.format else "unquantized"
    print(
        f"\n[{fmt}; {len(out.token_ids)} tokens in {t2 - t1:.2f}s "
        f"({len(out.token_ids) / max(t2 - t1, 1e-9):.1f} tok/s), load {t1 - t0:.2f}s ({_step_mode(llm)}), finish={out.finish_reason}]"
    )
    return 0


def _step_mode(llm: Any) -> str:
    """How decode steps ran, for the load report: compiled (and the compile time) or eager (why)."""
    if llm.eager_reason is None:
        return f"decode compiled in {llm.loaded.timings.get('compiling', 0.0):.2f}s"
    return f"eager decode: {llm.eager_reason}"


def _open_image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    from anyquant.errors import AnyquantError

    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError) as exc:
        raise AnyquantError(f"--image {path}: cannot be read as an image: {exc}") from exc
    return image
