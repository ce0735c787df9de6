"""An int8 KV cache decodes through the C++ kernel wherever it can run: the cache asks with its
queries' compute dtype and its own int8 dtype apart, and a decode step on int8 pages gives the
logits of the pure-torch path (dequantized rows through SDPA), an independent implementation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant import LLM
from anyquant.engine.kv_cache import PagedKVCache, SequenceCache
from anyquant.layers.decode_kernel import decode_kernel_mode, set_decode_kernel
from anyquant.quant.kernels import cpu_ext
from anyquant.utils.tiny_model import write_tiny_model
from tests.helpers.cpu_kernels import has_avx2

needs_kernel = pytest.mark.skipif(
    cpu_ext.unavailable_reason() is not None or not has_avx2(),
    reason="the C++ decode attention needs the extension and AVX2 + FMA + F16C",
)


def test_an_int8_cache_needs_its_queries_dtype() -> None:
    with pytest.raises(ValueError, match="compute dtype"):
        PagedKVCache(1, 4, 4, 2, 64, 64, torch.int8)


@needs_kernel
def test_the_kernel_takes_int8_caches_with_bf16_or_fp32_queries() -> None:
    for compute in (torch.bfloat16, torch.float32):
        cache = PagedKVCache(2, 4, 16, 2, 64, 64, torch.int8, compute_dtype=compute)
        assert cache.step_kernel_reason() is None, compute
    fp16 = PagedKVCache(2, 4, 16, 2, 64, 64, torch.int8, compute_dtype=torch.float16)
    assert "float16" in (fp16.step_kernel_reason() or "")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_decode_steps_match_the_torch_path(tmp_path: Path, dtype: torch.dtype) -> None:
    model = write_tiny_model(tmp_path, "qwen2", seed=5, hidden_size=128, head_dim=64)
    llm = LLM(model, dtype=str(dtype).removeprefix("torch."), kv_cache_dtype="int8", enforce_eager=True)
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]
    follow = [83, 27, 95]

    def decode_logits(mode: str) -> torch.Tensor:
        before = decode_kernel_mode()
        set_decode_kernel(mode)
        try:
            seq = SequenceCache(llm.model, len(prompt) + len(follow), torch.int8, compute_dtype=dtype)
            assert (seq.cache.step_kernel_reason() is None) == (mode == "auto")
            seq.forward(prompt, 0)
            rows = [seq.forward([t], len(prompt) + i) for i, t in enumerate(follow)]  # one-token steps
            return torch.cat(rows)
        finally:
            set_decode_kernel(before)

    kernel, torch_path = decode_logits("auto"), decode_logits("torch")
    rel = float((kernel - torch_path).norm() / torch_path.norm())
    # The first layer's outputs differ by fp32 rounding (the order of the sums) only, but every
    # later layer quantizes its new rows from them: a value on a rounding boundary moves by one
    # step (1/127 of its row's largest), so fp32 logits differ by ~1e-4 (measured 1.2e-4), not
    # ~1e-7 as with a float cache; a wrong scale or row would be off by far more. bf16: its roundings.
    assert rel < (1e-3 if dtype == torch.float32 else 2e-2), rel
