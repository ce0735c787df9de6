"""Device plumbing without a GPU: the early refusal of an unusable CUDA device, the compute dtype a
(simulated) GPU gets, the warning `inspect` prints before loading, the CUDA numerics settings,
and that a kernel which repacks on its device receives the weight there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anyquant import LLM
from anyquant.errors import UnsupportedError
from anyquant.layers.linear import QuantLinear
from anyquant.loading.dtype_policy import dtype_risks
from anyquant.loading.loader import _install, resolve_dtype
from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight, weight_to_device
from anyquant.utils.devices import (
    configure_cuda_numerics,
    cuda_properties,
    parse_capability,
    resolve_device,
    simulated_cuda,
)
from anyquant.utils.tiny_model import write_tiny_model
from tests.helpers.quant_weights import random_weight

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
BF16_MODEL = {"torch_dtype": "bfloat16"}


@pytest.mark.parametrize(
    ("text", "want"), [("7.5", (7, 5)), ("sm90", (9, 0)), ("89", (8, 9)), ("sm_80", (8, 0))]
)
def test_parse_capability(text: str, want: tuple[int, int]) -> None:
    assert parse_capability(text) == want


def test_parse_capability_refuses_garbage() -> None:
    with pytest.raises(ValueError, match=r"MAJOR\.MINOR"):
        parse_capability("turing")


@no_cuda
def test_cuda_is_refused_early_with_the_reason() -> None:
    build = "CPU-only build" if torch.version.cuda is None else "sees no GPU"
    with pytest.raises(UnsupportedError, match=f"device 'cuda' was requested, but .*{build}"):
        resolve_device("cuda")
    # LLM refuses before it reads anything: the model path does not even exist.
    with pytest.raises(UnsupportedError, match="device 'cuda:1' was requested"):
        LLM("/nonexistent/model", device="cuda:1")


def test_other_devices_are_refused() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UnsupportedError, match="runs on cpu and cuda"):
        resolve_device("meta")
    with pytest.raises(UnsupportedError, match="not a torch device"):
        resolve_device("gpu0")


def test_simulated_device_reports_its_capability() -> None:
    with simulated_cuda((7, 5), "Tesla T4") as t4:
        props = cuda_properties(torch.device("cuda"))
        assert props is t4 and not props.has_bf16 and not props.has_fp8
        assert props.describe() == "Tesla T4 (compute capability 7.5, simulated)"
        assert resolve_device("cuda") == torch.device("cuda")  # the simulation stands in for the GPU
    with simulated_cuda((9, 0)):
        props = cuda_properties(torch.device("cuda:0"))
        assert props.has_bf16 and props.has_fp8


def test_auto_dtype_on_a_gpu_without_bf16_is_float16() -> None:
    cuda = torch.device("cuda")
    with simulated_cuda((7, 5)):
        assert resolve_dtype("auto", BF16_MODEL, cuda) == torch.float16
        assert resolve_dtype("auto", {"torch_dtype": "float32"}, cuda) == torch.float32
        assert resolve_dtype("float32", BF16_MODEL, cuda) == torch.float32
        with pytest.raises(UnsupportedError, match=r"compute capability 8\.0 or newer.*float16"):
            resolve_dtype("bfloat16", BF16_MODEL, cuda)
    with simulated_cuda((8, 0)):
        assert resolve_dtype("auto", BF16_MODEL, cuda) == torch.bfloat16
    # On CPU bf16 stays bf16 (AVX512_BF16 or emulated, never refused).
    assert resolve_dtype("auto", BF16_MODEL, torch.device("cpu")) == torch.bfloat16


def test_float16_risk_names_the_gpu() -> None:
    with simulated_cuda((7, 5), "Tesla T4"):
        (risk,) = dtype_risks(torch.float16, torch.bfloat16, torch.device("cuda"))
    assert risk.startswith(
        "bfloat16-trained model runs in float16 on Tesla T4 (compute capability 7.5, simulated)"
    )
    assert "warm-up names the first layer" in risk
    (risk,) = dtype_risks(torch.float16, torch.bfloat16, torch.device("cpu"), tensor_parallel=2)
    assert risk.startswith("bfloat16-trained model asked to run in float16")
    assert "only the per-step check runs" in risk and "warm-up" not in risk
    assert dtype_risks(torch.float16, torch.float16, torch.device("cpu")) == []
    assert dtype_risks(torch.bfloat16, torch.bfloat16, torch.device("cpu")) == []


def _inspect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "anyquant", "inspect", *args], capture_output=True, text=True, timeout=120
    )


def test_inspect_plans_for_a_t4_without_one(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "m", "llama", torch_dtype="bfloat16")
    proc = _inspect(str(model), "--device", "cuda", "--compute-capability", "7.5")
    assert proc.returncode == 0, proc.stderr
    assert "(compute capability 7.5, simulated), compute dtype float16" in proc.stdout
    assert "has no bf16" in proc.stdout
    if not torch.cuda.is_available():
        proc = _inspect(str(model), "--device", "cuda")
        assert proc.returncode != 0
        assert "device 'cuda' was requested" in proc.stderr + proc.stdout


def test_cuda_numerics_accumulate_in_fp32() -> None:
    matmul = torch.backends.cuda.matmul
    saved = (matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction)
    try:
        configure_cuda_numerics()
        assert matmul.allow_fp16_reduced_precision_reduction is False
        assert matmul.allow_bf16_reduced_precision_reduction is False
    finally:
        matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction = saved


class _RecordingKernel(LinearKernel):
    """Records where its weight was when `load` ran."""

    name = "recording_test_kernel"
    load_on_device = True
    seen: list[torch.device] = []

    def load(self, weight: QuantWeight | torch.Tensor) -> None:
        assert isinstance(weight, QuantWeight)
        type(self).seen += [weight.data.device, weight.scale.device]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


def test_kernels_that_repack_on_their_device_get_the_weight_there() -> None:
    # The meta device stands in for a GPU: only where tensors are is checked, never their values.
    spec = QuantSpec(weight="uint4", granularity="group", group_size=32, has_zero=True)
    weight = random_weight(spec, 16, 64)
    layer = QuantLinear("layer", 64, 16)
    _install(layer, _RecordingKernel, weight, torch.float16, torch.device("meta"), None)
    assert _RecordingKernel.seen == [torch.device("meta")] * 2
    moved = weight_to_device(weight, torch.device("meta"))
    assert isinstance(moved, QuantWeight) and moved.data.dtype == weight.data.dtype
    assert moved.zero is not None and moved.zero.device.type == "meta" and weight.zero is not None
    assert weight.data.device.type == "cpu"  # the original is untouched


def test_host_loaded_kernels_move_to_the_device_at_install() -> None:
    # Layer by layer: each kernel is on the target device as soon as it is installed, so the host
    # holds about one layer at a time (the meta device stands in for a GPU: placement only).
    from anyquant.quant.kernels.dense import DenseKernel

    layer = QuantLinear("layer", 64, 16, bias=True)
    _install(layer, DenseKernel, torch.randn(16, 64), torch.bfloat16, torch.device("meta"), torch.randn(16))
    assert layer.kernel is not None
    assert {p.device.type for p in layer.parameters()} == {"meta"}
    assert layer.kernel.weight.dtype == torch.bfloat16 and layer.bias is not None
    assert layer.bias.dtype == torch.bfloat16


def test_overflow_advice_offers_bf16_only_where_it_runs() -> None:
    from anyquant.loading.dtype_policy import overflow_advice

    assert overflow_advice(torch.device("cpu")) == "float32 or bfloat16"
    with simulated_cuda((7, 5)):
        assert overflow_advice(torch.device("cuda")) == "float32"
    with simulated_cuda((8, 6)):
        assert overflow_advice(torch.device("cuda")) == "float32 or bfloat16"
