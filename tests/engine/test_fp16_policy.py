"""The fp16 policy for bf16-trained models (the T4 case), simulated on CPU in fp16 compute.

Tiny Llamas whose weights are scaled so that known layers exceed fp16's 65504 while float64 (HF
transformers on the same weights) stays finite: the guard must keep the MLP / residual overflow
finite and close to float64, and name the first layer where it cannot (keys and values).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from anyquant import LLM
from anyquant.engine.fp16_guard import RangeGuardKernel, guard_fp16, needed_shift
from anyquant.engine.kv_cache import SequenceCache
from anyquant.engine.numerics import first_nonfinite_module
from anyquant.errors import NumericsError
from anyquant.loading.loader import load_model
from anyquant.utils.tiny_model import write_tiny_model
from tests.helpers.errors import rel_err

transformers = pytest.importorskip("transformers")

IDS = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 65]


def _scaled_model(path: Path, scales: dict[str, float]) -> Path:
    """A bf16-trained tiny Llama with some tensors multiplied (values stay within fp16's range)."""
    write_tiny_model(path, "llama", seed=3, torch_dtype="bfloat16")
    tensors = load_file(str(path / "model.safetensors"))
    for name, factor in scales.items():
        tensors[name] = (tensors[name].float() * factor).to(torch.bfloat16)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _float64_logits(path: Path) -> torch.Tensor:
    config = json.loads((path / "config.json").read_text())
    hf_config = transformers.AutoConfig.for_model(
        "llama", **{k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    )
    model = transformers.AutoModelForCausalLM.from_config(hf_config).to(torch.float64).eval()
    state = {k: v.to(torch.float64) for k, v in load_file(str(path / "model.safetensors")).items()}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


# Layer 0's MLP: gate and up outputs of a few hundred multiply to beyond 65504, and the down
# projection's output reaches ~1e6 (into the fp32 residual stream, which holds it).
MLP_OVERFLOW = {
    "model.layers.0.mlp.gate_proj.weight": 300.0,
    "model.layers.0.mlp.up_proj.weight": 300.0,
    "model.layers.0.mlp.down_proj.weight": 100.0,
}


@pytest.fixture(scope="module")
def mlp_overflow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _scaled_model(tmp_path_factory.mktemp("mlp_overflow"), MLP_OVERFLOW)


def test_plain_float16_overflows_in_the_named_layer(mlp_overflow: Path) -> None:
    """Without the guard (the loader alone), fp16 overflows and the replay names layer 0's MLP."""
    loaded = load_model(mlp_overflow, dtype="float16")
    seq = SequenceCache(loaded.model, len(IDS), torch.float16)
    logits = seq.forward(IDS, 0)
    assert not bool(torch.isfinite(logits).all())
    seq = SequenceCache(loaded.model, len(IDS), torch.float16)
    assert first_nonfinite_module(loaded.model, lambda: seq.forward(IDS, 0)) == "model.layers.0.mlp.down_proj"
    assert bool(torch.isfinite(_float64_logits(mlp_overflow)).all())


def test_guard_keeps_the_mlp_overflow_finite_and_close_to_float64(mlp_overflow: Path) -> None:
    llm = LLM(str(mlp_overflow), dtype="float16", max_num_seqs=2)
    assert llm.fp16_report is not None
    # Only layer 0's down projection needs a shift; every other guard was taken off again.
    assert set(llm.fp16_report.shifts) == {"model.layers.0.mlp.down_proj"}
    assert llm.fp16_report.shifts["model.layers.0.mlp.down_proj"] >= 4
    guards = [n for n, m in llm.model.named_modules() if isinstance(m, RangeGuardKernel)]
    assert guards == ["model.layers.0.mlp.down_proj.kernel"]
    logits = llm.logits(IDS)
    assert bool(torch.isfinite(logits).all())
    # fp16 compute against float64: a budget for fp16 rounding (2^-11 per operation), far below
    # what an overflow (inf) or a wrongly scaled layer (off by 2^shift) would give.
    assert rel_err(logits, _float64_logits(mlp_overflow)) < 1e-2


def test_a_shifted_gate_up_keeps_the_down_projection_guarded(tmp_path: Path) -> None:
    # Only gate_proj comes near fp16's limit (outputs up to ~19000, inside the headroom; up_proj
    # scaled down so the down projection's output stays ~600). The gate/up guard returns fp32, so
    # the MLP product is fp32 and the down projection must keep a guard (at shift 0) to cast it
    # back to the compute dtype.
    path = _scaled_model(
        tmp_path / "gate",
        {"model.layers.0.mlp.gate_proj.weight": 8000.0, "model.layers.0.mlp.up_proj.weight": 0.05},
    )
    llm = LLM(str(path), dtype="float16", max_num_seqs=2)
    assert llm.fp16_report is not None
    assert set(llm.fp16_report.shifts) == {"model.layers.0.mlp.gate_up_proj"}
    guards = {n: m.shift for n, m in llm.model.named_modules() if isinstance(m, RangeGuardKernel)}
    assert guards.keys() == {"model.layers.0.mlp.gate_up_proj.kernel", "model.layers.0.mlp.down_proj.kernel"}
    assert guards["model.layers.0.mlp.down_proj.kernel"] == 0
    logits = llm.logits(IDS)
    assert bool(torch.isfinite(logits).all())
    assert rel_err(logits, _float64_logits(path)) < 1e-2


def test_guard_names_a_key_value_overflow_it_cannot_rescale(tmp_path: Path) -> None:
    # Layer 1's keys/values: a norm weight of 600 and v_proj x100 put v beyond 65504; keys and
    # values are stored in the fp16 KV cache, so no rescaling of a projection's output helps.
    path = _scaled_model(
        tmp_path / "kv",
        {"model.layers.1.input_layernorm.weight": 600.0, "model.layers.1.self_attn.v_proj.weight": 100.0},
    )
    assert bool(torch.isfinite(_float64_logits(path)).all())
    with pytest.raises(NumericsError, match=r"model\.layers\.1\.self_attn\.qkv_proj overflowed float16"):
        LLM(str(path), dtype="float16", max_num_seqs=2)


def test_no_guard_outside_float16(mlp_overflow: Path) -> None:
    llm = LLM(str(mlp_overflow), dtype="float32", max_num_seqs=2)
    assert llm.fp16_report is None
    assert not any(isinstance(m, RangeGuardKernel) for m in llm.model.modules())
    assert rel_err(llm.logits(IDS), _float64_logits(mlp_overflow)) < 1e-4


def test_needed_shift_leaves_headroom() -> None:
    assert needed_shift(0.0) == 0
    assert needed_shift(4000.0) == 0  # 4000 * 16 < 65504
    assert needed_shift(5000.0) == 1
    assert needed_shift(1e6) == 8  # 1e6 / 2^8 = 3906 <= 65504 / 16
    assert needed_shift(float("inf")) == 40


def test_an_mlp_with_static_activation_scales_is_not_guarded(mlp_overflow: Path) -> None:
    # Scaling a layer's input would change its quantization against a fixed scale: such an MLP is
    # left alone (whole: a guarded gate/up would hand its down projection fp32), so its overflow
    # is named instead of fixed.
    loaded = load_model(mlp_overflow, dtype="float16")
    static = frozenset({"model.layers.0.mlp.down_proj"})
    with pytest.raises(NumericsError, match=r"model\.layers\.0\.mlp\.down_proj overflowed float16"):
        guard_fp16(loaded.model, IDS, loaded.device, static)
    assert not any(
        isinstance(m, RangeGuardKernel)
        for n, m in loaded.model.named_modules()
        if n.startswith("model.layers.0.mlp")
    )
