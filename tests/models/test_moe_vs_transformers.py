"""Mixtral, Qwen2-MoE and Qwen3-MoE, tiny and random, against HF transformers in fp32.

Checkpoints come from `anyquant.utils.tiny_moe`, saved by transformers' own `save_pretrained`, so
tensor names are the real ones (per-expert `experts.{e}.*`, Mixtral's `block_sparse_moe`). The
quantized cases run the project's writers over them and compare against transformers holding the
float64-dequantized weights (activation fake-quantization patched in for W8A8 schemes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from anyquant import LLM, SamplingParams
from anyquant.engine.kv_cache import SequenceCache
from anyquant.errors import AnyquantError
from anyquant.layers.linear import QuantLinear
from anyquant.layers.mlp import GatedMLP
from anyquant.layers.moe import SparseMoE
from anyquant.loading.checkpoint import Checkpoint
from anyquant.loading.loader import build_on_meta
from anyquant.loading.plan import plan_layers
from anyquant.quant.detect import detect_format
from anyquant.quant.reference import dequantize
from anyquant.quant.spec import ActQuant
from anyquant.utils.tiny_moe import TINY_MOE, tiny_moe_fields, write_tiny_moe_model
from tests.helpers.errors import rel_err

transformers = pytest.importorskip("transformers")

FAMILIES = sorted(TINY_MOE)
VOCAB = tiny_moe_fields("mixtral")["vocab_size"]


def _hf_model(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_logits(model: torch.nn.Module, ids: list[int]) -> Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {f: write_tiny_moe_model(tmp_path_factory.mktemp(f), f, seed=3) for f in FAMILIES}


IDS = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def hf_logits(tiny_dirs: dict[str, Path]) -> dict[str, Tensor]:
    """transformers' fp32 logits of each unquantized tiny model on IDS."""
    return {f: _hf_logits(_hf_model(path), IDS) for f, path in tiny_dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(
    tiny_dirs: dict[str, Path], hf_logits: dict[str, Tensor], family: str
) -> None:
    ours = LLM(tiny_dirs[family], dtype="float32").logits(IDS)
    ref = hf_logits[family]
    assert rel_err(ours, ref) < 1e-5, rel_err(ours, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_structure(tiny_dirs: dict[str, Path], hf_logits: dict[str, Tensor], family: str) -> None:
    """Sparse / dense layers where the config puts them; routers fp32 and never of kind linear."""
    llm = LLM(tiny_dirs[family], dtype="bfloat16")
    dense_layers = set(tiny_moe_fields(family).get("mlp_only_layers", []))
    for i, layer in enumerate(llm.model.model.layers):
        assert isinstance(layer.mlp, GatedMLP if i in dense_layers else SparseMoE), (i, type(layer.mlp))
        if isinstance(layer.mlp, SparseMoE):
            assert layer.mlp.gate.kind == "router"
            assert layer.mlp.gate.kernel is not None and layer.mlp.gate.kernel.compute_dtype == torch.float32
            kinds = {m.kind for m in layer.mlp.experts.modules() if isinstance(m, QuantLinear)}
            assert kinds == {"experts"}
    # bf16 compute still tracks the fp32 reference loosely (routing is computed in fp32).
    ours = llm.logits(IDS)
    assert rel_err(ours, hf_logits[family]) < 5e-2, rel_err(ours, hf_logits[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(tiny_dirs: dict[str, Path], family: str) -> None:
    path = tiny_dirs[family]
    prompt = [1, 72, 101, 108, 108, 111]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    ours = LLM(path, dtype="float32").generate(prompt_token_ids=[prompt], sampling_params=params)[0].token_ids
    with torch.no_grad():
        hf = _hf_model(path).generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :]
    assert ours == hf.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_equals_token_by_token_decode(tiny_dirs: dict[str, Path], family: str) -> None:
    llm = LLM(tiny_dirs[family], dtype="float32")
    ids = list(range(40, 60))
    full = llm.logits(ids)
    seq = SequenceCache(llm.model, len(ids), torch.float32)
    steps = [seq.forward([tok], pos)[0] for pos, tok in enumerate(ids)]
    assert torch.allclose(full, torch.stack(steps), atol=1e-5, rtol=1e-5)


def test_missing_expert_tensor_is_named(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = tiny_dirs["mixtral"]
    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(AnyquantError, match=r"block_sparse_moe\.experts\.3\.w3"):
        LLM(tmp_path, dtype="float32")


# ---------------------------------------------------------------------------------------------
# Quantized experts: every format's writer over the tiny MoE checkpoints.

FORMATS: dict[str, dict[str, Any]] = {
    "gptq": dict(bits=4, group_size=32),
    "awq": dict(bits=4, group_size=32),
    "compressed-tensors": dict(bits=4, group_size=32),
    "fp8-block": dict(),
    "lmdeploy-int8": dict(),
}


def _quantize(src: Path, dst: Path, fmt: str) -> Any:
    quantize = pytest.importorskip("anyquant.convert.quantize")
    from anyquant.quant.formats.base import WriteOptions
    from anyquant.quant.registry import writer_class

    try:
        writer_class(fmt)
    except AnyquantError as exc:
        pytest.skip(f"writer {fmt!r} is not available: {exc}")
    return quantize.quantize_checkpoint(src, dst, fmt, WriteOptions(**FORMATS[fmt]))


def _dequantized_dir(src: Path, dst: Path) -> dict[str, ActQuant | None]:
    """Write `dst`: `src` with every quantized layer decoded by its format and dequantized in
    float64 (then stored fp32), config without quantization_config. Returns prefix -> act scheme."""
    from safetensors.torch import save_file

    ckpt = Checkpoint(src)
    fmt = detect_format(ckpt)
    assert fmt is not None
    plans = plan_layers(ckpt, fmt, build_on_meta(ckpt.text_config()), torch.device("cpu"), torch.float32)
    state: dict[str, Tensor] = {}
    consumed: set[str] = set()
    acts: dict[str, ActQuant | None] = {}
    for plan in plans:
        if plan.spec is None:
            continue
        names = [n for n in plan.stored.all() if n in ckpt.index]
        weight = fmt.decode(plan.prefix, plan.spec, ckpt.read_many(names))
        state[f"{plan.prefix}.weight"] = dequantize(weight, torch.float64).float()
        consumed.update(names)
        acts[plan.prefix] = plan.spec.act
    for name in ckpt.index:
        if name not in consumed and ckpt.index.has_data(name):
            state[name] = ckpt.read(name).float()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config))
    return acts


def _fake_quant(x: Tensor, act: ActQuant) -> Tensor:
    """Dynamic symmetric activation quantize-dequantize, written from formats.md, in float64:
    scale = amax / qmax per token (or per group of `group_size` input channels)."""
    assert act.dynamic and act.granularity in ("token", "group")
    x64 = x.double().reshape(-1, x.shape[-1])
    k = x64.shape[-1]
    g = act.group_size if act.granularity == "group" else k
    out = torch.empty_like(x64)
    for c0 in range(0, k, g):
        part = x64[:, c0 : c0 + g]
        amax = part.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10)
        if act.type == "int8":
            scale = amax / 127.0
            out[:, c0 : c0 + g] = torch.round(part / scale).clamp(-128, 127) * scale
        else:
            scale = amax / 448.0
            codes = (part / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).double()
            out[:, c0 : c0 + g] = codes * scale
    return out.reshape(x.shape).to(x.dtype)


def _patch_activation_quant(model: torch.nn.Module, acts: dict[str, ActQuant | None]) -> None:
    """Make transformers' model see activations as a W8A8 kernel does: fake-quantize the input of
    every quantized Linear, and of each expert's gate/up and down inside the fused experts."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and acts.get(name) is not None:
            act = acts[name]
            assert act is not None
            module.register_forward_pre_hook(lambda _m, args, a=act: (_fake_quant(args[0], a),))
        elif name.endswith(".experts") and hasattr(module, "gate_up_proj"):
            layer = name.removesuffix(".mlp.experts")
            expert_acts = [a for p, a in acts.items() if p.startswith(layer + ".") and ".experts." in p]
            if expert_acts and expert_acts[0] is not None:
                module.forward = _quantized_experts_forward(module, expert_acts[0])


def _quantized_experts_forward(experts: Any, act: ActQuant) -> Any:
    def forward(hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden)
        for e in range(experts.num_experts):
            tokens, slots = torch.where(top_k_index == e)
            if tokens.numel() == 0:
                continue
            gate, up = torch.nn.functional.linear(
                _fake_quant(hidden[tokens], act), experts.gate_up_proj[e]
            ).chunk(2, dim=-1)
            h = _fake_quant(experts.act_fn(gate) * up, act)
            y = torch.nn.functional.linear(h, experts.down_proj[e]) * top_k_weights[tokens, slots, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    return forward


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_quantized_experts_match_dequantized_transformers(
    tiny_dirs: dict[str, Path], hf_logits: dict[str, Tensor], tmp_path: Path, family: str, fmt: str
) -> None:
    qdir = tmp_path / "q"
    report = _quantize(tiny_dirs[family], qdir, fmt)
    specs = {r.prefix: r.spec for r in report.layers}
    experts = [p for p in specs if ".experts." in p]
    routers = [p for p in specs if p.endswith(".gate")]
    assert experts and all(not specs[p].startswith("skipped") for p in experts), specs
    assert routers and all(specs[p].startswith("skipped") for p in routers), specs
    acts = _dequantized_dir(qdir, tmp_path / "deq")
    assert set(experts) <= set(acts)

    model = _hf_model(tmp_path / "deq")
    _patch_activation_quant(model, acts)
    ref = _hf_logits(model, IDS)
    # The quantized model is a different model: the comparisons below are not vacuous.
    assert rel_err(ref, hf_logits[family]) > 1e-3
    # The reference kernel does the oracle's arithmetic, so the model and format plumbing must
    # agree tightly. The kernels chosen by default must too for weight-only schemes; with W8A8 an
    # exact integer GEMM may round a later activation to the neighbouring code, which then
    # propagates, so they get a bound that still catches a wrong expert or weight.
    ours = LLM(qdir, dtype="float32", kernel="reference").logits(IDS)
    assert rel_err(ours, ref) < 1e-4, rel_err(ours, ref)
    ours = LLM(qdir, dtype="float32").logits(IDS)
    bound = 1e-4 if all(a is None for a in acts.values()) else 2e-2
    assert rel_err(ours, ref) < bound, rel_err(ours, ref)


def test_qwen2_moe_shared_expert_quantized_and_gate_kept_float(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    qdir = tmp_path / "q"
    report = _quantize(tiny_dirs["qwen2_moe"], qdir, "gptq")
    specs = {r.prefix: r.spec for r in report.layers}
    assert specs["model.layers.0.mlp.shared_expert_gate"].startswith("skipped")
    assert not specs["model.layers.0.mlp.shared_expert.down_proj"].startswith("skipped")
    _dequantized_dir(qdir, tmp_path / "deq")
    ours = LLM(qdir, dtype="float32").logits(IDS)
    ref = _hf_logits(_hf_model(tmp_path / "deq"), IDS)
    assert rel_err(ours, ref) < 1e-4, rel_err(ours, ref)


def test_quantized_router_is_dequantized_and_runs_in_fp32(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """AutoAWQ may quantize a Qwen3-MoE router (formats.md §9.3): it must still give fp32 logits."""
    from safetensors.torch import load_file, save_file

    from anyquant.quant.algorithms.rtn import quantize_rtn
    from anyquant.quant.formats.base import WriteOptions
    from anyquant.quant.registry import writer_class

    qdir = tmp_path / "q"
    _quantize(tiny_dirs["qwen3_moe"], qdir, "awq")
    writer = writer_class("awq")(WriteOptions(**FORMATS["awq"]))
    state = load_file(str(qdir / "model.safetensors"))
    routers = [n.removesuffix(".weight") for n in state if n.endswith(".mlp.gate.weight")]
    assert routers
    for prefix in routers:
        dense = state.pop(f"{prefix}.weight")
        spec = writer.spec_for(prefix, tuple(dense.shape), "linear")
        assert not isinstance(spec, str), spec
        state.update(writer.encode(prefix, quantize_rtn(dense, spec, writer.scale_dtype(dense.dtype))))
    save_file(state, str(qdir / "model.safetensors"))

    llm = LLM(qdir, dtype="bfloat16")
    gates = {p.prefix: p for p in llm.loaded.plans if p.prefix in routers}
    assert set(gates) == set(routers) and all(p.spec is not None for p in gates.values())
    for layer in llm.model.model.layers:
        if isinstance(layer.mlp, SparseMoE):
            assert layer.mlp.gate.kernel is not None
            assert layer.mlp.gate.kernel.compute_dtype == torch.float32
    _dequantized_dir(qdir, tmp_path / "deq")
    ref = _hf_logits(_hf_model(tmp_path / "deq"), IDS)
    ours = LLM(qdir, dtype="float32").logits(IDS)
    assert rel_err(ours, ref) < 1e-4, rel_err(ours, ref)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_fused_experts_match_the_per_expert_path(
    tiny_dirs: dict[str, Path], tmp_path: Path, family: str
) -> None:
    """Each quantized MoE block (qwen2_moe: with its gated shared expert) runs its routed experts as
    one fused call where the C++ kernels run (cpu_avx512 or cpu_avx2 experts): the block's output
    at 1..70 tokens and top-k routing against the same block on its per-expert path (bf16: the
    per-expert path rounds every projection's output, the fused call keeps h in fp32)."""
    qdir = tmp_path / "q"
    _quantize(tiny_dirs[family], qdir, "gptq")
    gen = torch.Generator().manual_seed(2)
    for dtype, budget in ((torch.bfloat16, 1e-2), (torch.float32, 1e-6)):
        llm = LLM(qdir, dtype=str(dtype).removeprefix("torch."), enforce_eager=True)
        blocks = [m for m in llm.model.modules() if isinstance(m, SparseMoE)]
        if any(b.fused is None for b in blocks):
            pytest.skip(f"not fused here: {blocks[0].fused_reason}")
        hidden = blocks[0].experts[0].gate_proj.in_features
        for block in blocks:
            for tokens in (1, 8, 33, 70):
                x = torch.randn(tokens, hidden, generator=gen).to(dtype)
                fused = block(x)
                kept, block.fused = block.fused, None
                per_expert = block(x)
                block.fused = kept
                assert fused.dtype == torch.float32 and fused.shape == (tokens, hidden)
                assert rel_err(fused, per_expert) < budget, (
                    family,
                    dtype,
                    tokens,
                    rel_err(fused, per_expert),
                )
