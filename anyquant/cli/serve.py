"""`anyquant serve MODEL`: load a checkpoint and serve the OpenAI-compatible API with uvicorn.

Owns the vLLM-compatible flags, logging load progress with the time of each phase (reading,
repacking, compiling, KV cache, warm-up), and running uvicorn, whose SIGTERM / Ctrl-C handling drains the
server gracefully. Server modules are imported only here, inside `run`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from anyquant.cli.flags import add_weight_options
from anyquant.errors import AnyquantError

if TYPE_CHECKING:
    import uvicorn

    from anyquant.engine.async_engine import AsyncEngine
    from anyquant.llm import LLM

log = logging.getLogger("anyquant.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="model id clients send (default: MODEL)")
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    parser.add_argument("--max-num-seqs", type=int, default=64, help="requests in the running batch")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument(
        "--tensor-parallel-size",
        "--tp",
        type=int,
        default=1,
        metavar="N",
        help="run N tensor-parallel ranks (gloo on CPU)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (or set ANYQUANT_API_KEY)",
    )
    kv = parser.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache budget in GiB")
    kv.add_argument(
        "--kv-cache-fraction",
        type=float,
        default=None,
        metavar="F",
        help="KV cache budget as this fraction of the memory free after loading the weights "
        "(RAM on CPU, device memory on CUDA); default: max-num-seqs full-length sequences, up to 2 GiB",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernel", default=None, help="force a kernel for quantized layers (e.g. reference)")
    add_weight_options(parser)
    parser.add_argument(
        "--max-waiting", type=int, default=256, help="requests queued beyond the batch before 429"
    )
    parser.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="chat template file (or the template itself) used instead of the model's",
    )
    parser.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="let requests send their own chat_template (it runs in a sandbox, but can still cost "
        "the server time); refused by default",
    )
    parser.add_argument(
        "--tool-call-parser",
        default=None,
        choices=["hermes", "llama3_json", "mistral", "deepseek_v3"],
        help="the model's tool-call format: enables tool_choice auto / required / named "
        "(hermes: Qwen2.5, Qwen3, Hermes; llama3_json: Llama 3.x; mistral; deepseek_v3)",
    )
    parser.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="accepted for vLLM compatibility: tool_choice auto is on whenever --tool-call-parser is given",
    )
    parser.add_argument("--max-body-mb", type=float, default=8.0, help="request body size limit in MiB")
    parser.add_argument(
        "--allowed-local-media-path",
        default=None,
        metavar="DIR",
        help="let chat messages name images as file:// URLs below DIR (default: refused)",
    )
    parser.add_argument(
        "--limit-images-per-request", type=int, default=8, help="images one chat request may carry"
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds in-flight requests get to finish on SIGTERM",
    )


def _check(args: argparse.Namespace) -> None:
    if args.tensor_parallel_size < 1:
        raise AnyquantError(f"--tensor-parallel-size {args.tensor_parallel_size}: must be at least 1")
    if not 0 <= args.port <= 65535:
        raise AnyquantError(f"--port {args.port}: must be in 0..65535")
    for name in ("max_num_seqs", "max_waiting"):
        if getattr(args, name) < (1 if name == "max_num_seqs" else 0):
            raise AnyquantError(f"--{name.replace('_', '-')} {getattr(args, name)}: out of range")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise AnyquantError(
            "--enable-auto-tool-choice needs --tool-call-parser (the model's tool-call format)"
        )
    if args.limit_images_per_request < 0:
        raise AnyquantError(f"--limit-images-per-request {args.limit_images_per_request}: must be >= 0")
    if args.allowed_local_media_path and not Path(args.allowed_local_media_path).is_dir():
        raise AnyquantError(f"--allowed-local-media-path {args.allowed_local_media_path}: not a directory")
    if args.max_body_mb <= 0:
        raise AnyquantError(f"--max-body-mb {args.max_body_mb}: must be positive")
    if args.kv_cache_gb is not None and args.kv_cache_gb <= 0:
        raise AnyquantError(f"--kv-cache-gb {args.kv_cache_gb}: must be positive")
    if args.kv_cache_fraction is not None and not 0 < args.kv_cache_fraction <= 1:
        raise AnyquantError(f"--kv-cache-fraction {args.kv_cache_fraction}: must be in (0, 1]")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    _check(args)
    try:
        import uvicorn

        from anyquant.models.media import MediaLimits
        from anyquant.server.app import ServerConfig, create_app
    except ImportError as exc:
        raise AnyquantError(
            f"the server needs its extra dependencies ({exc}); pip install 'anyquant[server]'"
        ) from exc
    from anyquant.cli.llm_options import load_llm

    logging.getLogger("anyquant").setLevel(logging.INFO)
    api_key = args.api_key or os.environ.get("ANYQUANT_API_KEY") or None
    log.info("loading %s", args.model)
    t0 = time.perf_counter()
    llm = load_llm(args)
    timings = llm.loaded.timings  # reading, repacking and compiling were logged as they ended
    engine_s = (
        time.perf_counter() - t0 - sum(timings.get(p, 0.0) for p in ("reading", "repacking", "compiling"))
    )
    log.info("%s: phase KV cache and engine took %.2fs", args.model, max(engine_s, 0.0))
    if llm.tokenizer is None:
        raise AnyquantError(f"{args.model}: no tokenizer.json; the server needs a tokenizer")
    t1 = time.perf_counter()
    _warm_up(llm)
    log.info("%s: phase warm-up took %.2fs", args.model, time.perf_counter() - t1)
    config = ServerConfig(
        served_model_name=args.served_model_name or str(args.model),
        api_key=api_key,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_waiting=args.max_waiting,
        shutdown_timeout=args.shutdown_timeout,
        engine_thread=False,  # the engine loop runs on this, the main, thread: see _serve
        tool_call_parser=args.tool_call_parser,
        trust_request_chat_template=args.trust_request_chat_template,
        media=MediaLimits(
            max_images=args.limit_images_per_request,
            allowed_local_path=Path(args.allowed_local_media_path) if args.allowed_local_media_path else None,
        ),
    )
    processor = llm.image_processor() if llm.takes_images else None
    app = create_app(llm.engine, llm.tokenizer, config, processor)
    if not _is_loopback(args.host) and api_key is None:
        log.warning(
            "binding %s without --api-key: anyone who can reach this port can use the model", args.host
        )
    log.info(
        "serving %r (max_model_len=%d, max_num_seqs=%d) on http://%s:%d",
        config.served_model_name,
        llm.max_model_len,
        args.max_num_seqs,
        args.host,
        args.port,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level="info",
            timeout_graceful_shutdown=max(int(args.shutdown_timeout), 1),
        )
    )
    _serve(server, app.state.server.engine)
    log.info("shut down cleanly")
    return 0


def _serve(server: uvicorn.Server, engine: AsyncEngine) -> None:
    """uvicorn on a thread, the engine loop on the main thread, because torch's OpenMP kernels
    run about twice as fast launched from the process's initial thread (AsyncEngine.run_here).
    SIGTERM / SIGINT ask uvicorn to stop accepting and drain; its lifespan shutdown then drains
    the engine, whose loop returns here. A second signal stops without waiting."""

    def on_signal(signum: int, frame: object) -> None:
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    def http() -> None:
        try:
            server.run()  # not the main thread: uvicorn leaves signals to us
        finally:
            engine.close()  # whatever ended uvicorn (a port in use...), the loop below returns

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    thread = threading.Thread(target=http, name="anyquant-http")
    thread.start()
    engine.run_here()
    thread.join()


def _warm_up(llm: LLM) -> None:
    """One short generation, so the first client does not pay for lazy initialisation."""
    from anyquant.engine.sampling import SamplingParams

    prompt = [llm.tokenizer.bos_token_id or 0] if llm.tokenizer is not None else [0]
    llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=2, temperature=0.0))
