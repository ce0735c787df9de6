"""Which device each engine piece uses for a CUDA model, checked without a GPU: the KV-cache budget
comes from free device memory, the cache is allocated on the model's device, tensor-parallel ranks
take NCCL and one GPU each. (What runs on a real GPU is tests/cuda/.)"""

from __future__ import annotations

import pytest
import torch

from anyquant.engine.engine import EngineConfig, kv_pages
from anyquant.engine.kv_cache import PagedKVCache
from anyquant.parallel.state import collective_backend
from anyquant.workers.worker import LoadRequest, device_for


def test_kv_budget_on_cuda_is_a_fraction_of_free_device_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[torch.device] = []

    def mem_get_info(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return 1000 * 4096, 80 * 2**30  # free, total

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    config = EngineConfig(max_model_len=4096, max_num_seqs=64, kv_cache_fraction=0.5)
    assert kv_pages(config, 4096, torch.device("cuda:1")) == 500  # half of 1000 pages' worth
    assert asked == [torch.device("cuda:1")]


def test_kv_cache_is_allocated_on_the_model_device() -> None:
    # The meta device stands in for a GPU: allocation placement and dtype only, no values.
    cache = PagedKVCache(2, 4, 16, 2, 32, 32, torch.float16, torch.device("meta"))
    assert cache.k.device.type == cache.v.device.type == "meta"
    assert cache.k.dtype == torch.float16 and cache.k.shape == (2, 2, 64, 32)


def test_tensor_parallel_ranks_take_nccl_and_one_gpu_each(monkeypatch: pytest.MonkeyPatch) -> None:
    assert collective_backend(torch.device("cpu")) == "gloo"
    bound: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    assert collective_backend(torch.device("cuda:1")) == "nccl"
    assert bound == [torch.device("cuda:1")]
    request = LoadRequest(path="m", device="cuda", dtype="auto", kernel=None)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert [device_for(request, rank) for rank in range(3)] == ["cuda:0", "cuda:1", "cuda:2"]
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun: the rank's GPU on its own machine
    assert device_for(request, 7) == "cuda:3"
    assert device_for(LoadRequest(path="m", device="cuda:2", dtype="auto", kernel=None), 0) == "cuda:2"
