"""The opt-in int4 LM head (`lm_head_dtype="int4"`): group-wise int4 codes quantized at load from
an unquantized (here tied) head, run by the quantized-weight CPU kernel.

The reference is float64 throughout: the head's input (captured at the head) times the int4 head
dequantized here by hand from its codes and scales, never by the code under test. A hidden size
of 136 is not a multiple of the group size, so the last group of each row is partial."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

from anyquant import LLM
from anyquant.cli import flags
from anyquant.cli.main import main as cli_main
from anyquant.errors import AnyquantError
from anyquant.loading import lm_head
from anyquant.loading.activations import INT8_PER_TOKEN, with_activations
from anyquant.loading.describe import describe_checkpoint
from anyquant.loading.lm_head import INT4_HEAD, held_bytes, quantize_rows
from anyquant.quant.algorithms.rtn import quantize_rtn
from anyquant.quant.kernels import avx2, avx2_a8, avx512, avx512_vnni
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight
from anyquant.utils.tiny_model import write_tiny_model
from tests.helpers.cpu_kernels import expected_kernel
from tests.helpers.errors import rel_err
from tests.helpers.lm_head import head_input_and_logits

IDS = [5, 99, 300, 17, 4, 1000, 2039, 0, 16, 15]
TABLE = "model.embed_tokens.weight"
HEAD_KERNEL = expected_kernel("cpu_avx512", "cpu_int4", "cpu_avx2")


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(
        tmp_path_factory.mktemp("int4head"),
        "llama",
        seed=7,
        hidden_size=136,
        head_dim=34,
        vocab_size=2040,
        tie_word_embeddings=True,
    )


def _dequantized(q: QuantWeight) -> torch.Tensor:
    """float64 [N, K] of uint4 group codes: (code - zero) * scale, zero 8 where none is stored."""
    n, k = q.shape
    g = q.spec.group_size
    cols = torch.arange(k) // g
    scale = q.scale.double().reshape(n, -1)[:, cols]
    zero = q.zero.double().reshape(n, -1)[:, cols] if q.zero is not None else 8.0
    return (q.data.double() - zero) * scale


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int4_head_is_the_float64_product_of_its_dequantized_codes(tied: Path, dtype: str) -> None:
    llm = LLM(tied, dtype=dtype, lm_head_dtype="int4", enforce_eager=True)
    kernel = llm.loaded.model.lm_head.kernel
    assert kernel.name == HEAD_KERNEL and kernel.spec == INT4_HEAD
    table = llm.loaded.checkpoint.read(TABLE)
    q = quantize_rows(table, INT4_HEAD)
    head = _dequantized(q)
    # The codes are round-to-nearest: each weight within half its group's step of the table.
    step = q.scale.double().reshape(q.shape[0], -1)[:, torch.arange(q.shape[1]) // INT4_HEAD.group_size]
    assert bool(((head - table.double()).abs() <= step / 2 * (1 + 1e-6)).all())
    x, logits = head_input_and_logits(llm, IDS)
    exact = x @ head.T
    # fp32 compute: fp32 products and sums; bf16: the logits rounded to bf16 (2^-9 relative).
    assert rel_err(logits, exact) < (1e-6 if dtype == "float32" else 4e-3)
    # ... and not the checkpoint's own head: the option took effect.
    assert rel_err(x @ table.double().T, exact) > 20 * rel_err(logits, exact)


def test_tied_embedding_keeps_the_table(tied: Path) -> None:
    llm = LLM(tied, dtype="bfloat16", lm_head_dtype="int4", enforce_eager=True)
    embedding = llm.loaded.model.body.embed_tokens
    assert type(embedding) is nn.Embedding
    table = llm.loaded.checkpoint.read(TABLE).to(torch.bfloat16)
    assert torch.equal(embedding.weight.detach(), table)
    ids = torch.tensor(IDS)
    assert torch.equal(embedding(ids), table[ids])


@pytest.mark.parametrize("asym", [False, True])
def test_rows_quantize_in_chunks_as_in_one_piece(asym: bool) -> None:
    spec = QuantSpec("uint4", "group", group_size=64, has_zero=asym)
    w = torch.randn(20000, 136, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    chunked, whole = quantize_rows(w, spec), quantize_rtn(w, spec)
    assert torch.equal(chunked.data, whole.data) and torch.equal(chunked.scale, whole.scale)
    assert (chunked.zero is None) == (not asym)
    if asym:
        assert chunked.zero is not None and whole.zero is not None
        assert torch.equal(chunked.zero, whole.zero)


def test_inspect_names_the_int4_head(tied: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = describe_checkpoint(tied, dtype="bfloat16", lm_head_dtype="int4")
    head = next(g for g in doc["groups"] if g["pattern"] == "lm_head")
    assert head["quantized_at_load"]["description"] == INT4_HEAD.describe()
    assert head["kernel"] == HEAD_KERNEL
    assert head["bytes"] == held_bytes(INT4_HEAD, 2040, 136)
    auto = next(g for g in describe_checkpoint(tied, dtype="bfloat16")["groups"] if g["pattern"] == "lm_head")
    assert head["bytes"] < auto["bytes"] * 0.35  # 4-bit codes + an fp32 scale per group vs fp32 stored

    assert cli_main(["inspect", str(tied), "--dtype", "bfloat16", "--lm-head-dtype", "int4"]) == 0
    out = capsys.readouterr().out
    assert f"quantized at load: {INT4_HEAD.describe()} (--lm-head-dtype)" in out
    assert f"kernel: {HEAD_KERNEL}" in out


def test_bad_values_fail_naming_the_choices(tied: Path) -> None:
    with pytest.raises(AnyquantError, match="lm_head_dtype 'int2' is not supported; choose auto, int8, int4"):
        LLM(tied, lm_head_dtype="int2")
    with pytest.raises(AnyquantError, match="choose auto, int8, int4"):
        describe_checkpoint(tied, lm_head_dtype="uint4")
    parser = argparse.ArgumentParser()
    flags.add_lm_head_dtype(parser)
    assert parser.parse_args(["--lm-head-dtype", "int4"]).lm_head_dtype == "int4"
    with pytest.raises(SystemExit):
        parser.parse_args(["--lm-head-dtype", "int2"])


def test_cli_choices_are_the_loaders() -> None:
    assert flags.LM_HEAD_DTYPE_CHOICES == lm_head.LM_HEAD_DTYPES


def test_instruction_set_kernels_accept_the_int4_head() -> None:
    """Whatever this CPU is, the AVX-512 and AVX2 kernels' own checks take the int4 head's spec
    (with and without int8 activations); only a missing instruction set may refuse it here."""
    shape = (151936, 2048)
    missing = (avx512._cpu_reason(), avx2._cpu_reason(), avx512_vnni._cpu_reason())
    for kernel, spec in (
        (avx512.Avx512WeightOnlyKernel, INT4_HEAD),
        (avx2.Avx2WeightOnlyKernel, INT4_HEAD),
        (avx512_vnni.Avx512VnniKernel, with_activations(INT4_HEAD, "lm_head", INT8_PER_TOKEN)),
        (avx2_a8.Avx2Int8ActivationKernel, with_activations(INT4_HEAD, "lm_head", INT8_PER_TOKEN)),
    ):
        assert spec is not None
        reason = kernel.cannot_run(spec, "lm_head", torch.device("cpu"), shape, torch.bfloat16)
        assert reason is None or reason in missing, (kernel.name, reason)
