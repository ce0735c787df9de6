"""TP=2 and TP=4 give the logits of one process, over real gloo ranks, for every format and family.

Covered: unquantized Llama, AWQ, GPTQ with act-order, compressed-tensors W4A16 (Qwen2 biases and a
quantized vocab-parallel LM head), FP8 block, tied embeddings (Qwen3), MoE (Qwen3-MoE GPTQ and
Qwen2-MoE with its gated shared expert) and DeepSeek-V2 latent attention. The Llama models have an
MLP intermediate of 3 groups of 32, which needs zero padding at both sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from anyquant import LLM
from anyquant.loading.describe import describe_checkpoint
from tests.parallel._spmd import tp_logits
from tests.parallel.conftest import IDS

pytestmark = pytest.mark.slow

MODELS = [
    "llama",
    "awq",
    "gptq-act-order",
    "ct-w4a16-lm-head",
    "fp8-block",
    "qwen3-tied",
    "qwen3-moe-gptq",
    "qwen2-moe",
    "deepseek-v2",
]


@pytest.fixture(scope="module")
def reference(tp_model: Callable[[str], Path]) -> dict[str, torch.Tensor]:
    return {name: LLM(tp_model(name), dtype="float32").logits(IDS) for name in MODELS}


@pytest.fixture(scope="module", params=[2, 4])
def parallel(
    request: pytest.FixtureRequest, tp_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, dict[str, torch.Tensor]]:
    world = int(request.param)
    models = {name: tp_model(name) for name in MODELS}
    return world, tp_logits(world, models, IDS, tmp_path_factory.mktemp(f"tp{world}"))


@pytest.mark.parametrize("name", MODELS)
def test_tp_logits_equal_single_process(
    parallel: tuple[int, dict[str, torch.Tensor]], reference: dict[str, torch.Tensor], name: str
) -> None:
    world, logits = parallel
    got, want = logits[name], reference[name]
    assert got.shape == want.shape
    # Same weights, same math; only fp32 summation order differs (row-parallel partial sums).
    err = float((got - want).norm() / want.norm())
    assert err < 1e-5, (name, world, err)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("world", [2, 4])
def test_the_padding_model_is_padded(tp_model: Callable[[str], Path], world: int) -> None:
    """Guards the padding case itself: the AWQ Llama's 96-wide MLP is zero-padded at tp 2 and 4."""
    padding = describe_checkpoint(tp_model("awq"), tp=world)["tensor_parallel"]["padding"]
    assert any(p["pattern"] == "model.layers.*.mlp" and sum(p["padding_per_rank"]) for p in padding)
