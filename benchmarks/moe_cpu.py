"""Quantized MoE on CPU: Qwen3-30B-A3B shapes, a few layers, random weights, W4A16 g128 experts.

Builds (once, under out/bench/) a bf16 checkpoint with Qwen3-30B-A3B's geometry (hidden 2048,
128 experts, top-8, expert intermediate 768, 32 query / 4 KV heads of 128, vocab 151936) but only
`--layers` decoder layers, written tensor by tensor with safetensors (transformers would need the
whole fp32 model in memory), then quantizes it with `anyquant quantize --format compressed-tensors
--scheme W4A16` (int4, groups of 128, symmetric; routers stay bf16). It then runs
`anyquant bench offline` on it for each source tree given with `--tree NAME=PATH` (e.g. the
commit before a change and after it), alternating between the trees `--rounds` times in fresh
processes, and prints prefill / batch-1 decode tokens/s and peak RSS per tree.

    python benchmarks/moe_cpu.py --tree before=/tmp/base --tree after=. [--layers 3] [--rounds 2]

`--ab` instead loads the model once and alternates, in the same process, between the fused MoE
call (one C++ call per layer: `moe_experts` on AVX512_BF16 CPUs, `moe_experts_avx2` on AVX2 ones)
and the per-expert path over the same kernels and the same weights: whole-model prefill / batch-1
decode, engine decode at batch 1, 8 and 32 (`LLM.generate`, eager steps so the switch applies,
peers_cpu.py's protocol: time(B x (1 + N) tokens) - time(B x 1 token), 32-token prompts), and one
MoE layer alone at 1, 8, 32 and 512 tokens; it prints medians and fused / per-expert ratios.

    python benchmarks/moe_cpu.py --ab [--layers 3] [--rounds 3]

`--op` needs no checkpoint: one synthetic MoE layer of Qwen3-30B-A3B's shape (128 experts,
hidden 2048, intermediate 768, top-8, random routing) per expert format (W4A16 g128, GPTQ
act-order g128, GGUF-style uint4 g32 with float offsets, FP8 with dynamic per-token activations;
on an AVX2 CPU all but W8A8, on cpu_avx2 experts),
fused call vs the same kernels one expert at a time, alternating, at 1, 8, 32 and 512 tokens; and the
roofline of the bytes the call reads (the distinct chosen experts' packed weights, scales, zero
points, offsets) at the read bandwidth measured in the same run (a one-thread fp32 amax of 512 MB).

    python benchmarks/moe_cpu.py --op [--rounds 3] [--formats w4a16-g128 act-order-g128 ...] [--fp32-row]

(`--fp32-row` adds the fused call with its one-row int4 experts on the fp32 kernel, the A/B of the
16-bit fixed-point one; the same routing every call, so at 1 token the 8 experts' ~19 MiB stay in
the last-level cache.)

`--a8` compares, on that synthetic layer, int8-activation experts (as `activation_dtype="int8"`
loads them: cpu_avx512_vnni on AVX512-VNNI CPUs, cpu_avx2_a8 on AVX2 ones) one expert at a time
(SparseMoE's per-expert path) against their fused call (`moe_experts_vnni` / `moe_experts_avx2_a8`)
and against the bf16-activation fused call over the same codes (`moe_experts` /
`moe_experts_avx2`), alternating, at 1, 8, 32 and 512 tokens, for W4 g128 and W8 per-channel
codes (W4A8 / W8A8 against W4A16 / W8A16), with each one's error against float64 (the int8 ones'
include the activation quantization: their numerics, not a kernel error).

    python benchmarks/moe_cpu.py --a8 [--rounds 3] [--threads 1] [--a8-formats w4-g128 w8-channel]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from random_checkpoint import ShardedCheckpoint, build_w4a16, randn  # type: ignore[import-not-found]

OUT = Path("out/bench")
# Prompt length of --ab's engine decode rows: short, so that batch 32's prefill (32 x this many
# tokens per call, on the per-expert path too) does not dominate the measurement's time.
ENGINE_PROMPT = 32

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}


def write_dense(path: Path, layers: int, seed: int = 0) -> Path:
    """The bf16 checkpoint: one safetensors shard per decoder layer (plus one for the rest)."""
    cfg = {**QWEN3_30B_A3B, "num_hidden_layers": layers}
    h, v, heads, kv, hd = (cfg[k] for k in ("hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim"))  # fmt: skip
    experts, inter = cfg["num_experts"], cfg["moe_intermediate_size"]
    g = torch.Generator().manual_seed(seed)
    ckpt = ShardedCheckpoint(path)
    shard = ckpt.shard

    ones = torch.ones(h, dtype=torch.bfloat16)
    shard(
        "model-embed.safetensors",
        {
            "model.embed_tokens.weight": randn(g, v, h),
            "lm_head.weight": randn(g, v, h),
            "model.norm.weight": ones,
        },
    )
    for i in range(layers):
        p = f"model.layers.{i}"
        t = {
            f"{p}.input_layernorm.weight": ones.clone(),
            f"{p}.post_attention_layernorm.weight": ones.clone(),
            f"{p}.self_attn.q_proj.weight": randn(g, heads * hd, h),
            f"{p}.self_attn.k_proj.weight": randn(g, kv * hd, h),
            f"{p}.self_attn.v_proj.weight": randn(g, kv * hd, h),
            f"{p}.self_attn.o_proj.weight": randn(g, h, heads * hd),
            f"{p}.self_attn.q_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
            f"{p}.self_attn.k_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
            f"{p}.mlp.gate.weight": randn(g, experts, h, std=0.5),
        }
        for e in range(experts):
            t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = randn(g, inter, h)
            t[f"{p}.mlp.experts.{e}.up_proj.weight"] = randn(g, inter, h)
            t[f"{p}.mlp.experts.{e}.down_proj.weight"] = randn(g, h, inter)
        shard(f"model-layer{i:02d}.safetensors", t)
    return ckpt.finish(cfg)


def build(layers: int) -> Path:
    dense, quant = OUT / f"qwen3moe-a3b-{layers}l-bf16", OUT / f"qwen3moe-a3b-{layers}l-w4a16"
    return build_w4a16(dense, quant, lambda path: write_dense(path, layers))


def bench_tree(tree: Path, model: Path, prompt_len: int, decode_len: int) -> dict[str, float]:
    """One `anyquant bench offline` run in a fresh process importing `tree`'s anyquant."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    cmd = [sys.executable, "-m", "anyquant", "bench", "offline", str(model), "--dtype", "bfloat16"]
    cmd += ["--prompt-len", str(prompt_len), "--decode-len", str(decode_len), "--repeats", "2", "--json"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{") :])


def _seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `fn`: CPU time of this process with one thread (what the work costs,
    whatever else the shared machine runs), wall-clock time with more threads."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    runs = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        runs.append(clock() - t0)
    return statistics.median(runs)


def ab_in_process(model: Path, rounds: int, prompt_len: int, decode_len: int) -> None:
    """Fused vs per-expert MoE, alternating in one process on one loaded model (same weights)."""
    from anyquant import SamplingParams
    from anyquant.engine.kv_cache import SequenceCache
    from anyquant.layers.moe import SparseMoE
    from anyquant.llm import LLM

    # Eager decode steps: a compiled step would keep the call it was captured with.
    llm = LLM(str(model), dtype="bfloat16", max_model_len=1024, max_num_seqs=32, enforce_eager=True)
    blocks = [m for m in llm.model.modules() if isinstance(m, SparseMoE)]
    fused = [b.fused for b in blocks]
    if any(f is None for f in fused):
        raise SystemExit(f"not fused: {blocks[0].fused_reason}")
    g = torch.Generator().manual_seed(0)
    vocab = int(llm.loaded.config["vocab_size"])
    hidden = int(llm.loaded.config["hidden_size"])
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
    inputs = {t: torch.randn(t, hidden, generator=g).to(torch.bfloat16) for t in (1, 8, 32, 512)}

    def use(mode: str) -> None:
        for block, f in zip(blocks, fused):
            block.fused = f if mode == "fused" else None

    def prefill() -> SequenceCache:
        seq = SequenceCache(llm.model, prompt_len + decode_len + 1, llm.dtype, llm.device)
        seq.forward(prompt, 0, torch.tensor([prompt_len - 1]))
        return seq

    def decode(seq: SequenceCache) -> None:
        token = prompt[-1]
        for i in range(decode_len):
            token = int(seq.forward([token], prompt_len + i)[-1].argmax())

    def generate(batch: int, max_tokens: int) -> None:
        # Fresh random prompts for every call: no prefix-cache hits.
        prompts = [torch.randint(0, vocab - 16, (ENGINE_PROMPT,), generator=g).tolist() for _ in range(batch)]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        llm.generate(prompt_token_ids=prompts, sampling_params=params)

    def engine_decode(batch: int) -> float:
        """Generated tokens/s of `batch` sequences, the prefill and first token excluded."""
        full = _seconds(lambda: generate(batch, 1 + decode_len), 1)
        return batch * decode_len / max(full - _seconds(lambda: generate(batch, 1), 1), 1e-9)

    results: dict[str, dict[str, list[float]]] = {"per-expert": {}, "fused": {}}
    with torch.inference_mode():
        for mode in results:  # warm-up
            use(mode)
            decode(prefill())
            generate(8, 2)
        for _ in range(rounds):
            for mode, rates in results.items():
                use(mode)
                seqs: list[SequenceCache] = []
                s = _seconds(lambda seqs=seqs: seqs.append(prefill()), 1)
                rates.setdefault("prefill tok/s", []).append(prompt_len / s)
                s = _seconds(lambda seqs=seqs: decode(seqs[-1]), 1)
                rates.setdefault("decode b1 tok/s", []).append(decode_len / s)
                for batch in (1, 8, 32):
                    rates.setdefault(f"engine decode b{batch} tok/s", []).append(engine_decode(batch))
                    print(
                        mode,
                        f"b{batch}",
                        round(rates[f"engine decode b{batch} tok/s"][-1], 2),
                        file=sys.stderr,
                    )
                for t, x in inputs.items():
                    s = _seconds(lambda x=x: blocks[0](x), 1 if t == 512 else 5)
                    rates.setdefault(f"1 MoE layer, {t} tok: ms", []).append(s * 1e3)
            print(
                json.dumps({m: {k: round(v[-1], 2) for k, v in r.items()} for m, r in results.items()}),
                flush=True,
            )
    clock = "CPU time" if torch.get_num_threads() == 1 else "wall-clock time"
    print(
        f"\n{torch.get_num_threads()} threads ({clock}), {len(blocks)} MoE layers, medians of {rounds} rounds\n"
    )
    print("| measure | per-expert | fused | speed-up |")
    print("|---|---:|---:|---:|")
    for key in results["fused"]:
        before, after = (statistics.median(results[m][key]) for m in ("per-expert", "fused"))
        speedup = before / after if key.endswith("ms") else after / before
        print(f"| {key} | {before:.2f} | {after:.2f} | {speedup:.2f}x |")


OP_FORMATS = ("w4a16-g128", "act-order-g128", "offset-g32", "fp8-dynamic", "w8a8-int8")


def _op_weight(fmt: str, n: int, k: int, g: torch.Generator) -> object:
    """A random canonical weight of `fmt` for one [n, k] expert projection."""
    from anyquant.quant.spec import ActQuant, QuantSpec
    from anyquant.quant.weight import QuantWeight

    if fmt == "w8a8-int8":
        spec = QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True))
        data = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        return QuantWeight(spec, (n, k), data, 1e-4 + 1e-4 * torch.rand(n, generator=g)).validate(fmt)
    if fmt == "fp8-dynamic":
        spec = QuantSpec("fp8_e4m3", "channel", act=ActQuant("fp8_e4m3", dynamic=True))
        data = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        return QuantWeight(spec, (n, k), data, 1e-4 + 1e-4 * torch.rand(n, generator=g)).validate(fmt)
    group = 32 if fmt == "offset-g32" else 128
    spec = QuantSpec(
        "uint4", "group", group_size=group, act_order=fmt == "act-order-g128", has_offset=fmt == "offset-g32"
    )
    data = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = 0.005 + 0.01 * torch.rand(n, k // group, generator=g)
    g_idx = (
        (torch.arange(k) // group)[torch.randperm(k, generator=g)].to(torch.int32) if spec.act_order else None
    )
    offset = -0.08 * torch.rand(n, k // group, generator=g) if spec.has_offset else None
    return QuantWeight(spec, (n, k), data, scale, None, g_idx, offset=offset).validate(fmt)


def _op_layer(fmt: str, experts: int, hidden: int, inter: int) -> tuple[object, list[tuple[object, ...]]]:
    """(FusedExperts, per-expert (gate, up, down) kernels) of one synthetic MoE layer, on the
    weight-only kernel this CPU runs (cpu_avx512, else cpu_avx2: fp8 experts too, no int8 activations)."""
    from anyquant.quant.kernels.avx2 import Avx2WeightOnlyKernel
    from anyquant.quant.kernels.avx512 import Avx512WeightOnlyKernel
    from anyquant.quant.kernels.avx512_moe import FusedExperts, cannot_fuse, weight_only_twins
    from anyquant.quant.kernels.torch_cpu import CpuW8A8Int8Kernel

    g = torch.Generator().manual_seed(1)
    kernels = []
    for _ in range(experts):
        gate = _op_weight(fmt, inter, hidden, g)
        up = _op_weight(fmt, inter, hidden, g)
        if fmt == "act-order-g128":  # gate and up see the same inputs: one g_idx (as GPTQ writes)
            up = dataclasses.replace(up, group_index=gate.group_index)  # type: ignore[type-var]
        row = []
        for w, shape in (
            (gate, (inter, hidden)),
            (up, (inter, hidden)),
            (_op_weight(fmt, hidden, inter, g), (hidden, inter)),
        ):
            weight_only = (
                Avx512WeightOnlyKernel
                if Avx512WeightOnlyKernel.cpu_reason() is None
                else Avx2WeightOnlyKernel
            )
            kind = CpuW8A8Int8Kernel if fmt == "w8a8-int8" else weight_only
            kernel = kind(shape, torch.bfloat16)
            kernel.load(w)  # type: ignore[arg-type]
            row.append(kernel)
        kernels.append(tuple(row))
    # W8A8 int8: the per-expert path runs torch._int_mm kernels, the fused call their AVX-512 twins.
    fusable = weight_only_twins(kernels) if fmt == "w8a8-int8" else kernels
    reason = "no AVX-512 twins" if fusable is None else cannot_fuse(fusable, "silu")
    if reason is not None or fusable is None:
        raise SystemExit(f"{fmt}: not fused: {reason}")
    return FusedExperts(fusable), kernels


def _per_expert(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, kernels: list) -> torch.Tensor:
    """The per-expert path (SparseMoE._routed_per_expert) over the same kernels, without modules."""
    t, k = ids.shape
    out = torch.zeros(t, x.shape[1])
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens, w = order // k, weights.reshape(-1)[order]
    start = 0
    for e, n in enumerate(torch.bincount(flat, minlength=len(kernels)).tolist()):
        if n:
            rows, wr = tokens[start : start + n], w[start : start + n]
            gate, up, down = kernels[e]
            xr = x[rows]
            y = down(torch.nn.functional.silu(gate(xr)) * up(xr))
            out.index_add_(0, rows, y.float() * wr[:, None])
            start += n
    return out


def read_bandwidth_gbs(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Read-only bandwidth (GB/s, 1e9 bytes): the best of `repeats` fp32 amax passes over a large
    buffer, timed like the kernels (CPU time with one thread: the shared machine's other load
    would otherwise count as slow memory)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    buf.amax()
    return nbytes / min(_seconds(buf.amax, 1) for _ in range(repeats)) / 1e9


def _fp32_row(fn: Callable[[], object]) -> Callable[[], object]:
    """fn with INT4_ROW_FP32_ENV set: the fused call's one-row int4 experts on the fp32 kernel."""

    from anyquant.quant.kernels.avx2 import INT4_ROW_FP32_ENV

    def run() -> object:
        os.environ[INT4_ROW_FP32_ENV] = "1"
        try:
            return fn()
        finally:
            del os.environ[INT4_ROW_FP32_ENV]

    return run


def op_ab(formats: list[str], rounds: int, fp32_row: bool = False) -> None:
    cfg = QWEN3_30B_A3B
    experts, hidden, inter, top_k = (cfg[k] for k in ("num_experts", "hidden_size", "moe_intermediate_size", "num_experts_per_tok"))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    cases = {}
    for t in (1, 8, 32, 512):
        x = torch.randn(t, hidden, generator=g).to(torch.bfloat16)
        ids = torch.rand(t, experts, generator=g).topk(top_k, dim=-1).indices
        weights = torch.rand(t, top_k, generator=g).softmax(-1)
        cases[t] = (x, weights, ids)
    bandwidth = read_bandwidth_gbs()
    rows = []
    for fmt in formats:
        fused, kernels = _op_layer(fmt, experts, hidden, inter)
        per_e = {n: b for n, b in fused.named_buffers() if b is not None and n != "lut"}
        per_expert_bytes = sum(
            b[0].numel() * b.element_size() for n, b in per_e.items() if not n.startswith("act_")
        )
        times: dict[tuple[str, int], list[float]] = {}
        with torch.inference_mode():
            for t, (x, w, ids) in cases.items():  # warm-up and agreement
                a, b = fused(x, w, ids), _per_expert(x, w, ids, kernels)
                err = float((a - b).norm() / b.norm())
                assert err < 3e-2, (fmt, t, err)
            for _ in range(rounds):
                for t, case in cases.items():
                    reps = 1 if t == 512 else 5
                    runs = {
                        "per-expert": lambda c=case, ks=kernels: _per_expert(*c, ks),
                        "fused": lambda c=case, f=fused: f(*c),
                    }
                    if fp32_row:
                        runs["fused fp32 row"] = _fp32_row(runs["fused"])
                    for mode, fn in runs.items():
                        times.setdefault((mode, t), []).append(_seconds(fn, reps))
        for t, (_, _, ids) in cases.items():
            pe, fu = (statistics.median(times[(m, t)]) for m in ("per-expert", "fused"))
            read = per_expert_bytes * int(ids.unique().numel())
            roof = read / (bandwidth * 1e9)
            old = statistics.median(times[("fused fp32 row", t)]) if fp32_row else fu
            rows.append((fmt, t, pe * 1e3, fu * 1e3, pe / fu, read / 2**20, roof * 1e3, roof / fu, old * 1e3))
    threads = torch.get_num_threads()
    clock = "CPU time" if threads == 1 else "wall-clock time"  # as _seconds measures
    print(
        f"\n{threads} thread(s), {clock}, medians of {rounds} rounds; read bandwidth {bandwidth:.1f} GB/s"
        " (fp32 amax)\n"
    )
    extra = " fused, fp32 row ms | fp32 row / fused |" if fp32_row else ""
    print(
        "| experts | tokens | per-expert ms | fused ms | speed-up | MiB read | roofline ms | fused / roofline |"
        + extra
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if fp32_row else ""))
    for fmt, t, pe, fu, sp, mib, roof, frac, old in rows:
        tail = f" {old:.2f} | {old / fu:.2f}x |" if fp32_row else ""
        print(
            f"| {fmt} | {t} | {pe:.2f} | {fu:.2f} | {sp:.2f}x | {mib:.1f} | {roof:.2f} | {100 * frac:.0f} % |"
            + tail
        )


A8_FORMATS = ("w4-g128", "w8-channel")  # codes of the --a8 experts: int4 groups of 128, int8 per channel


def _a8_kernel_classes() -> tuple[type, type]:
    """(weight-only, int8-activation) expert kernel classes this CPU runs: AVX-512 (cpu_avx512,
    cpu_avx512_vnni) where it has the instructions, else AVX2 (cpu_avx2, cpu_avx2_a8)."""
    from anyquant.quant.kernels.avx2 import Avx2WeightOnlyKernel
    from anyquant.quant.kernels.avx2_a8 import Avx2Int8ActivationKernel
    from anyquant.quant.kernels.avx512 import Avx512WeightOnlyKernel
    from anyquant.quant.kernels.avx512_vnni import Avx512VnniKernel

    if Avx512VnniKernel.cpu_reason() is None:
        return Avx512WeightOnlyKernel, Avx512VnniKernel
    return Avx2WeightOnlyKernel, Avx2Int8ActivationKernel


def _a8_weight(fmt: str, n: int, k: int, g: torch.Generator) -> object:
    """A weight-only canonical weight of --a8's `fmt` (int4 g128, or int8 per channel: W8A8's codes)."""
    from anyquant.quant.spec import QuantSpec
    from anyquant.quant.weight import QuantWeight

    if fmt == "w8-channel":
        data = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        scale = 1e-4 + 1e-4 * torch.rand(n, generator=g)
        return QuantWeight(QuantSpec("int8", "channel"), (n, k), data, scale).validate(fmt)
    return _op_weight("w4a16-g128", n, k, g)


def a8_ab(rounds: int, formats: list[str]) -> None:
    """Per-expert int8-activation experts vs their fused call vs the bf16-activation fused call on
    the same codes (see the docstring), per format, alternating in this process."""
    from anyquant.loading.activations import INT8_PER_TOKEN
    from anyquant.quant.kernels.avx512_moe import fuse
    from anyquant.quant.reference import dequantize

    weight_only, int8_act = _a8_kernel_classes()
    cfg = QWEN3_30B_A3B
    experts, hidden, inter, top_k = (cfg[k] for k in ("num_experts", "hidden_size", "moe_intermediate_size", "num_experts_per_tok"))  # fmt: skip
    threads = torch.get_num_threads()
    clock = "CPU time" if threads == 1 else "wall-clock time"
    print(
        f"\n{threads} thread(s), {clock}, medians of {rounds} rounds; one layer of {experts} experts, "
        f"top-{top_k}; {int8_act.name} experts per expert and fused, {weight_only.name} fused (bf16 act)"
    )
    for fmt in formats:
        g = torch.Generator().manual_seed(1)
        bf16_kernels, a8_kernels, dense = [], [], []
        for e in range(experts):
            rows_b, rows_a = [], []
            for shape in ((inter, hidden), (inter, hidden), (hidden, inter)):
                w = _a8_weight(fmt, *shape, g)
                kb = weight_only(shape, torch.bfloat16)
                kb.load(w)
                ka = int8_act(shape, torch.bfloat16)
                ka.load(dataclasses.replace(w, spec=dataclasses.replace(w.spec, act=INT8_PER_TOKEN)))  # type: ignore[type-var, attr-defined]
                rows_b.append(kb)
                rows_a.append(ka)
                if e < top_k:  # float64 truth on the experts the accuracy check routes to
                    dense.append(dequantize(w, torch.float64))  # type: ignore[arg-type]
            bf16_kernels.append(tuple(rows_b))
            a8_kernels.append(tuple(rows_a))
        (fused_b, why_b), (fused_a, why_a) = fuse(bf16_kernels, "silu"), fuse(a8_kernels, "silu")
        if fused_b is None or fused_a is None:
            raise SystemExit(f"{fmt}: not fused: {why_b or why_a}")
        calls: dict[str, Callable[..., torch.Tensor]] = {
            "per-expert a8": lambda x, w, ids, ks=a8_kernels: _per_expert(x, w, ids, ks),
            "fused a8": fused_a,
            "fused bf16 act": fused_b,
        }
        # Accuracy: 16 tokens on experts 0..7 (each token all eight), relative L2 against float64.
        x16 = torch.randn(16, hidden, generator=g).to(torch.bfloat16)
        w16 = torch.rand(16, top_k, generator=g).softmax(-1)
        ids16 = torch.arange(top_k).expand(16, top_k).contiguous()
        truth = torch.zeros(16, hidden, dtype=torch.float64)
        for j in range(top_k):
            gd, ud, dd = dense[3 * j : 3 * j + 3]
            xd = x16.double()
            truth += w16[:, j : j + 1].double() * ((torch.nn.functional.silu(xd @ gd.T) * (xd @ ud.T)) @ dd.T)
        errors = {
            m: float((c(x16, w16, ids16).double() - truth).norm() / truth.norm()) for m, c in calls.items()
        }
        cases = {}
        for t in (1, 8, 32, 512):
            x = torch.randn(t, hidden, generator=g).to(torch.bfloat16)
            ids = torch.rand(t, experts, generator=g).topk(top_k, dim=-1).indices
            cases[t] = (x, torch.rand(t, top_k, generator=g).softmax(-1), ids)
        times: dict[tuple[str, int], list[float]] = {}
        with torch.inference_mode():
            for call in calls.values():
                for case in cases.values():
                    call(*case)
            for _ in range(rounds):
                for t, case in cases.items():
                    for mode, call in calls.items():
                        times.setdefault((mode, t), []).append(
                            _seconds(lambda c=call, a=case: c(*a), 1 if t == 512 else 5)
                        )
        print(
            f"\n{fmt}: error vs float64 (16 tokens, top-8): "
            + ", ".join(f"{m} {e:.1e}" for m, e in errors.items())
        )
        print(
            "\n| tokens | per-expert a8 ms | fused a8 ms | fused bf16-act ms | fused a8 / per-expert | fused a8 / fused bf16-act |"
        )
        print("|---:|---:|---:|---:|---:|---:|")
        for t in cases:
            pe, fa, fb = (statistics.median(times[(m, t)]) * 1e3 for m in calls)
            print(f"| {t} | {pe:.2f} | {fa:.2f} | {fb:.2f} | {pe / fa:.2f}x | {fb / fa:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of a source tree to run")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-len", type=int, default=16)
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--ab", action="store_true", help="fused vs per-expert MoE in one process")
    parser.add_argument("--op", action="store_true", help="one synthetic MoE layer per expert format")
    parser.add_argument("--a8", action="store_true", help="fused bf16 vs int8 activations, synthetic layer")
    parser.add_argument(
        "--fp32-row",
        action="store_true",
        help="--op: also the fused call with one-row int4 experts on the fp32 kernel (the A/B of the 16-bit one)",
    )
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--model", type=Path, default=None, help="--ab on this checkpoint instead")
    parser.add_argument("--formats", nargs="+", default=list(OP_FORMATS), choices=OP_FORMATS)
    parser.add_argument("--a8-formats", nargs="+", default=list(A8_FORMATS), choices=A8_FORMATS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.a8:
        return a8_ab(args.rounds, args.a8_formats)
    if args.op:
        return op_ab(args.formats, args.rounds, args.fp32_row)
    model = args.model or build(args.layers)
    if args.build_only:
        return
    if args.ab:
        return ab_in_process(model, args.rounds, args.prompt_len, args.decode_len)
    trees = dict(t.split("=", 1) for t in args.tree) or {"here": "."}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(bench_tree(Path(tree), model, args.prompt_len, args.decode_len))
            print(name, json.dumps(runs[name][-1]), flush=True)
    print(
        f"\n| tree | prefill {args.prompt_len} tok/s | batch-1 decode tok/s | peak RSS MiB | linear weights MiB |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, rs in runs.items():
        pre = statistics.median(r["prefill_tok_s"] for r in rs)
        dec = statistics.median(r["decode_tok_s"] for r in rs)
        rss = max(r["peak_rss_mib"] for r in rs)
        print(f"| {name} | {pre:.1f} | {dec:.2f} | {rss:.0f} | {rs[0]['linear_weight_mib']:.0f} |")


if __name__ == "__main__":
    main()
