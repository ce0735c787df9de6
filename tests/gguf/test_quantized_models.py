"""Whole models stored in every GGML type: our logits equal a float32 model whose weights are
gguf-py's own dequantization of the same blocks (kernels within float32 rounding of it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from anyquant import LLM
from anyquant.quant.formats.gguf_blocks import BLOCK_TYPES
from tests.gguf.fixtures import write_pair
from tests.helpers.cpu_kernels import expected_kernel

IDS = [5, 77, 256, 3, 190, 41, 258, 12]


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", sorted(BLOCK_TYPES))
def test_every_type_matches_its_dequantized_twin(tmp_path: Path, kind: str) -> None:
    path, twin = write_pair(tmp_path, "qwen2", kind)
    ours = LLM(str(path), dtype="float32")
    want = LLM(str(twin)).logits(IDS)
    got = ours.logits(IDS)
    assert _max_rel_diff(got, want) < 2e-5
    # The reference kernel dequantizes the canonical weight: the same bits as gguf-py's weights,
    # so only the matmul order differs.
    ref = LLM(str(path), dtype="float32", kernel="reference").logits(IDS)
    assert _max_rel_diff(ref, want) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2moe", "qwen3moe"])
def test_architectures(tmp_path: Path, arch: str) -> None:
    path, twin = write_pair(tmp_path, arch, "Q4_K")
    got = LLM(str(path), dtype="float32").logits(IDS)
    assert _max_rel_diff(got, LLM(str(twin)).logits(IDS)) < 2e-5


def test_llama3_rope_scaling_from_rope_freqs(tmp_path: Path) -> None:
    """Llama 3.x files carry their rope scaling only as llama.cpp's per-frequency divisors (head
    dim 64, theta 10000: frequencies fall in all three bands of the scaling)."""
    rope = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    path, twin = write_pair(tmp_path, "llama", "Q8_0", llama3_rope=rope)
    got = LLM(str(path), dtype="float32")
    assert got.loaded.config["rope_scaling"] == {"rope_type": "llama3", **rope}
    want = LLM(str(twin)).logits(IDS)
    assert _max_rel_diff(got.logits(IDS), want) < 2e-5


def test_tied_quantized_embedding_is_a_quantized_lm_head(tmp_path: Path) -> None:
    path, twin = write_pair(tmp_path, "qwen2", "Q6_K", tied=True)
    got = LLM(str(path), dtype="float32")
    head = next(p for p in got.loaded.plans if p.prefix == "lm_head")
    assert head.spec is not None and head.kernel.name == expected_kernel(
        "cpu_avx512", "reference", "cpu_avx2"
    )
    assert _max_rel_diff(got.logits(IDS), LLM(str(twin)).logits(IDS)) < 2e-5
