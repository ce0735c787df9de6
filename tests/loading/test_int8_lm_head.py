"""The opt-in int8 LM head (`lm_head_dtype="int8"`): per-row symmetric int8 weights quantized at
load, within a stated error budget of the bf16 head, both measured against float64.

Budget (relative L2 of the logits against the float64 product of the same hidden states with the
checkpoint's head): the bf16 head is ~2e-3 off (bf16 inputs and output rounding); per-row int8
adds rounding noise of (row amax / 127) / sqrt(12) per weight, ~1e-2 of the logits for normally
distributed rows (amax ~ 4 sigma): the int8 head must stay under 2e-2, and within 10x of bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant import LLM
from anyquant.errors import AnyquantError
from anyquant.loading.describe import describe_checkpoint
from anyquant.loading.lm_head import INT8_HEAD, quantize_rows
from anyquant.quant.algorithms.rtn import quantize_rtn
from anyquant.utils.tiny_model import write_tiny_model
from tests.helpers.cpu_kernels import expected_kernel
from tests.helpers.errors import rel_err
from tests.helpers.lm_head import head_input_and_logits

IDS = [5, 99, 300, 17, 4, 1000, 250, 7, 42, 3]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(
        tmp_path_factory.mktemp("head"), "llama", seed=11, hidden_size=128, head_dim=32, vocab_size=4096
    )


def _logits_and_exact(llm: LLM) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and the float64 product of the head's input with the stored head."""
    x, logits = head_input_and_logits(llm, IDS)
    return logits, x @ llm.loaded.checkpoint.read("lm_head.weight").double().T


def test_int8_head_is_within_budget_of_the_bf16_head(model: Path) -> None:
    bf16 = LLM(model, dtype="bfloat16")
    int8 = LLM(model, dtype="bfloat16", lm_head_dtype="int8")
    assert bf16.loaded.model.lm_head.kernel.name == expected_kernel(
        "cpu_avx512_lm_head", "dense", "cpu_avx2_lm_head"
    )
    assert int8.loaded.model.lm_head.kernel.name == expected_kernel(
        "cpu_avx512", "cpu_int8_weight", "cpu_avx2"
    )
    err_bf16 = rel_err(*_logits_and_exact(bf16))
    err_int8 = rel_err(*_logits_and_exact(int8))
    assert err_bf16 < 4e-3, err_bf16
    assert err_int8 < 2e-2 and err_int8 < 10 * err_bf16, (err_int8, err_bf16)


def test_int8_head_in_float32_is_the_float64_product_of_its_codes(model: Path) -> None:
    """fp32 compute: the kernel is exact to fp32 rounding against dequantized int8 rows."""
    llm = LLM(model, dtype="float32", lm_head_dtype="int8")
    x, logits = head_input_and_logits(llm, IDS)
    q = quantize_rows(llm.loaded.checkpoint.read("lm_head.weight"), INT8_HEAD)
    dense = q.data.double() * q.scale.double()[:, None]
    assert rel_err(logits, x @ dense.T) < 1e-6


def test_rows_quantize_in_chunks_as_in_one_piece() -> None:
    w = torch.randn(20000, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    chunked, whole = quantize_rows(w, INT8_HEAD), quantize_rtn(w, INT8_HEAD)
    assert torch.equal(chunked.data, whole.data) and torch.equal(chunked.scale, whole.scale)


def test_inspect_plans_the_int8_head_and_bad_values_fail(model: Path) -> None:
    doc = describe_checkpoint(model, dtype="bfloat16", lm_head_dtype="int8")
    head = next(g for g in doc["groups"] if g["pattern"] == "lm_head")
    assert head["quantized_at_load"]["description"] == INT8_HEAD.describe()
    assert head["kernel"] == expected_kernel("cpu_avx512", "cpu_int8_weight", "cpu_avx2")
    auto = next(
        g for g in describe_checkpoint(model, dtype="bfloat16")["groups"] if g["pattern"] == "lm_head"
    )
    assert head["bytes"] < auto["bytes"] * 0.55  # int8 codes + a scale per row vs bf16
    with pytest.raises(AnyquantError, match="lm_head_dtype 'fp4' is not supported"):
        LLM(model, lm_head_dtype="fp4")


@pytest.mark.parametrize("head_dtype", ["int8", "int4"])
def test_a_head_stored_quantized_is_kept_as_stored(
    model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, head_dtype: str
) -> None:
    from anyquant.convert.quantize import quantize_checkpoint
    from anyquant.quant.formats.base import WriteOptions

    q = tmp_path / "q"
    quantize_checkpoint(model, q, "compressed-tensors", WriteOptions(scheme="W8A16"), quantize_lm_head=True)
    with caplog.at_level("WARNING", logger="anyquant.loading.loader"):
        llm = LLM(q, dtype="bfloat16", lm_head_dtype=head_dtype)
    assert "lm_head is stored quantized" in caplog.text
    stored = LLM(q, dtype="bfloat16")
    assert torch.equal(llm.logits(IDS), stored.logits(IDS))
