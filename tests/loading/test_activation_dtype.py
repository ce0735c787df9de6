"""`activation_dtype="int8"`: weight-only layers run with per-token int8 activations (opt-in).

Budget: the activations' quantization adds, per layer, a relative error of about
(amax / 127) / sqrt(12) / rms(x) to each matmul; on this tiny random model the logits move by
~2.6e-2 relative (measured) against the same checkpoint run as stored. Checked: every
weight-only layer gets the integer kernel of the CPU (cpu_avx512_vnni where the CPU has
AVX512-VNNI, else cpu_avx2_a8 on AVX2 CPUs), the logits are within 5e-2 of the
stored numerics and visibly not equal to them, and the fast kernel equals the reference kernel
running the same (fake-quantized) definition in float32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant import LLM
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.errors import AnyquantError
from anyquant.loading.activations import activation_quant, with_activations
from anyquant.loading.describe import describe_checkpoint
from anyquant.quant.formats.base import WriteOptions
from anyquant.quant.kernels.avx2_a8 import Avx2Int8ActivationKernel
from anyquant.quant.kernels.avx512_vnni import Avx512VnniKernel
from anyquant.quant.spec import ActQuant, QuantSpec
from anyquant.utils.tiny_model import write_tiny_model

IDS = [5, 99, 300, 17, 4, 1000, 250, 7, 42, 3]
W4 = QuantSpec("uint4", "group", group_size=32)
W4A8 = QuantSpec("uint4", "group", group_size=32, act=ActQuant("int8", True))
# The integer kernel this CPU runs int8 activations on: VNNI where it can, else AVX2's.
INTEGER_KERNEL = next(
    (
        cls
        for cls in (Avx512VnniKernel, Avx2Int8ActivationKernel)
        if cls.cannot_run(W4A8, "linear", torch.device("cpu"), (64, 64), torch.bfloat16) is None
    ),
    None,
)
needs_integer_kernel = pytest.mark.skipif(
    INTEGER_KERNEL is None, reason="neither cpu_avx512_vnni nor cpu_avx2_a8 runs on this CPU"
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("act")
    dense = write_tiny_model(root / "dense", "llama", seed=5, hidden_size=128, head_dim=32, vocab_size=2048)
    quantize_checkpoint(
        dense, root / "w4a16", "compressed-tensors", WriteOptions(scheme="W4A16", group_size=32)
    )
    return root / "w4a16"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_spec_transform() -> None:
    act = activation_quant("int8")
    assert activation_quant("auto") is None
    assert with_activations(W4, "linear", act) == QuantSpec("uint4", "group", group_size=32, act=act)
    assert with_activations(QuantSpec("int8", "channel"), "lm_head", act) is not None
    assert with_activations(W4, "experts", act) == QuantSpec("uint4", "group", group_size=32, act=act)
    for spec, kind in [
        (W4, "router"),
        (QuantSpec("fp8_e4m3", "channel"), "linear"),
        (QuantSpec("int8", "channel", act=ActQuant("int8", False, "tensor")), "linear"),
        (None, "linear"),
    ]:
        assert with_activations(spec, kind, act) is spec  # type: ignore[arg-type]
    with pytest.raises(AnyquantError, match="activation_dtype 'fp16'"):
        activation_quant("fp16")


@needs_integer_kernel
def test_int8_activations_run_on_the_integer_kernel_within_budget(model: Path) -> None:
    assert INTEGER_KERNEL is not None
    stored = LLM(model, dtype="bfloat16")
    int8 = LLM(model, dtype="bfloat16", activation_dtype="int8")
    kernels = {m.kernel.name for m in int8.loaded.model.modules() if hasattr(m, "kernel") and m.kernel}
    assert INTEGER_KERNEL.name in kernels and not kernels & {"cpu_avx512", "cpu_avx2"}, kernels
    want, got = stored.logits(IDS), int8.logits(IDS)
    assert 1e-4 < _rel(got, want) < 5e-2, _rel(got, want)


@needs_integer_kernel
def test_int8_activations_equal_the_reference_definition(model: Path) -> None:
    fast = LLM(model, dtype="float32", activation_dtype="int8")
    reference = LLM(model, dtype="float32", activation_dtype="int8", kernel="reference")
    assert _rel(fast.logits(IDS), reference.logits(IDS)) < 1e-3


def test_inspect_shows_the_activations(model: Path) -> None:
    doc = describe_checkpoint(model, dtype="bfloat16", activation_dtype="int8")
    quantized = [g for g in doc["groups"] if g["scheme"] is not None]
    assert quantized and all(g["activations_at_load"] == "int8 dynamic per-token" for g in quantized)
    plain = describe_checkpoint(model, dtype="bfloat16")
    assert all(g["activations_at_load"] is None for g in plain["groups"])
