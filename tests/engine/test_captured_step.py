"""The captured (torch.compile'd) decode step against the eager one, family by family.

Every family with a tiny builder is captured whole (`fullgraph=True`: a graph break fails the
capture) and must pick the same greedy tokens as the eager engine for a batch padded to a bucket.
The families are traced with the "aot_eager" backend (the same Dynamo graph, functionalized, run
by aten: seconds per family); one family also runs Inductor's generated C++ (tens of seconds of
compiling on two cores, so it is marked slow).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from anyquant import LLM, SamplingParams
from anyquant.cli.main import build_parser
from anyquant.engine import capture
from anyquant.layers.linear import QuantLinear
from anyquant.utils.tiny_model import write_tiny_model

transformers = pytest.importorskip("transformers")

PROMPTS = [[256, 5, 6, 7, 8, 9], [256, 40, 41], [256, *range(60, 90)]]  # 3 sequences: bucket 4


def _moe(arch: str) -> Callable[[Path], Path]:
    def write(path: Path) -> Path:
        from anyquant.utils.tiny_moe import write_tiny_moe_model

        return write_tiny_moe_model(path, arch, seed=3)

    return write


def _quantized_mixtral(path: Path) -> Path:
    """GPTQ int4 (groups of 32): the C++ kernels (traced through their fake implementations) and,
    for the experts, the fused MoE call."""
    from anyquant.convert.quantize import quantize_checkpoint
    from anyquant.quant.formats.base import WriteOptions
    from anyquant.utils.tiny_moe import write_tiny_moe_model

    src = write_tiny_moe_model(path.with_name(path.name + "-src"), "mixtral", seed=3)
    quantize_checkpoint(src, path, "gptq", WriteOptions(bits=4, group_size=32))
    return path


def _deepseek(path: Path) -> Path:
    from tests.models.test_deepseek_vs_transformers import CASES, write_deepseek

    version, overrides = CASES["v3"]
    return write_deepseek(path, version, overrides)


FAMILIES: dict[str, Callable[[Path], Path]] = {
    "llama": lambda p: write_tiny_model(p, "llama", seed=1),
    "qwen2": lambda p: write_tiny_model(p, "qwen2", seed=2),
    "qwen3": lambda p: write_tiny_model(p, "qwen3", seed=3),
    # A window shorter than the longest prompt: windowed and full plans in one step.
    "mistral-sliding-window": lambda p: write_tiny_model(p, "mistral", seed=4, sliding_window=7),
    "mixtral": _moe("mixtral"),
    "qwen2_moe": _moe("qwen2_moe"),
    "mixtral-gptq-int4": _quantized_mixtral,
    "deepseek-mla": _deepseek,
}


def _greedy(llm: LLM, max_tokens: int = 10) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=params)]


def _compare(path: Path, backend: str) -> LLM:
    eager = LLM(path, dtype="float32", max_model_len=128, max_num_seqs=4, enforce_eager=True)
    compiled = LLM(path, dtype="float32", max_model_len=128, max_num_seqs=4, enforce_eager=True)
    assert compiled.engine.runner.capture(127, 4, backend=backend) is None  # no graph break
    captured = compiled.engine.runner.captured
    assert captured is not None and captured.buckets == (1, 2, 4)
    want = _greedy(eager)
    assert _greedy(compiled) == want
    assert captured.steps_run >= 9  # the decode steps took the captured path
    return compiled


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_captured_step_picks_the_eager_tokens(family: str, tmp_path: Path) -> None:
    llm = _compare(FAMILIES[family](tmp_path / family), "aot_eager")
    if family == "mixtral-gptq-int4":
        from anyquant.layers.moe import SparseMoE
        from anyquant.quant.kernels.avx512 import RepackedWeightOnlyKernel

        kernels = [
            m.kernel for m in llm.model.modules() if isinstance(m, QuantLinear) and m.kernel is not None
        ]
        # cpu_avx512 or cpu_avx2 experts: their fused call (moe_experts / moe_experts_avx2) was captured.
        if not any(isinstance(k, RepackedWeightOnlyKernel) for k in kernels):
            pytest.skip("the C++ kernels are unavailable here: nothing more than the other families")
        assert all(m.fused is not None for m in llm.model.modules() if isinstance(m, SparseMoE))


@pytest.mark.slow
def test_inductor_step_picks_the_eager_tokens(tmp_path: Path) -> None:
    _compare(FAMILIES["qwen2"](tmp_path / "qwen2"), "inductor")


@pytest.mark.slow
def test_long_context_with_a_shared_prefix_matches_transformers(tmp_path: Path) -> None:
    """Captured decode steps over 4200+ tokens of context (263+ pages, the matmul attention form,
    a prefix shared through the prefix cache) pick transformers' greedy tokens."""
    from tests.engine.test_paged_attention import _hf_choices

    path = write_tiny_model(tmp_path / "long", "qwen2", seed=5, max_position_embeddings=8192)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 256, (4200,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 17)]
    llm = LLM(path, dtype="float32", max_model_len=4300, max_num_seqs=2, enforce_eager=True)
    assert llm.engine.runner.capture(4299, 2, backend="aot_eager") is None
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
    assert llm.engine.scheduler.num_prefix_hit_tokens >= 4096
    captured = llm.engine.runner.captured
    assert captured is not None and captured.steps_run >= 5
    assert [_hf_choices(path, p, out) for p, out in zip(prompts, outs)] == outs


def test_no_compiler_falls_back_to_eager_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_tiny_model(tmp_path / "m", "llama")
    from torch._inductor import config as inductor_config

    no_compiler = inductor_config.patch({"cpp.cxx": (None, "no-such-c++-compiler")})
    with no_compiler, caplog.at_level(logging.WARNING, logger="anyquant.engine"):
        llm = LLM(path, dtype="float32", max_model_len=64, max_num_seqs=2, enforce_eager=False)
    assert llm.eager_reason is not None and "C++ compiler" in llm.eager_reason
    assert llm.engine.runner.captured is None
    assert "decode steps run eagerly" in caplog.text and "no-such-c++-compiler" in caplog.text
    assert "compiling" in llm.loaded.timings  # the load report shows the (short) attempt
    assert _greedy(llm, 3)  # and the engine runs


def test_a_failed_compile_falls_back_to_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: capture.CapturedDecode) -> float:
        raise RuntimeError("C++ compile failed: cc1plus: fatal error")

    monkeypatch.setattr(capture.CapturedDecode, "warm_up", broken)
    llm = LLM(
        write_tiny_model(tmp_path / "m", "llama"), dtype="float32", max_model_len=64, enforce_eager=False
    )
    assert llm.eager_reason == "torch.compile failed (RuntimeError: C++ compile failed: cc1plus: fatal error)"
    assert llm.engine.runner.captured is None


def test_enforce_eager_skips_compiling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(capture.ENFORCE_EAGER_ENV, raising=False)
    called = []
    monkeypatch.setattr(capture.CapturedDecode, "__init__", lambda *a, **k: called.append(1))
    llm = LLM(
        write_tiny_model(tmp_path / "m", "llama"), dtype="float32", max_model_len=64, enforce_eager=True
    )
    assert llm.eager_reason == "enforce_eager" and not called and "compiling" not in llm.loaded.timings
    monkeypatch.setenv(capture.ENFORCE_EAGER_ENV, "1")
    llm = LLM(write_tiny_model(tmp_path / "m", "llama"), dtype="float32", max_model_len=64)
    assert llm.eager_reason == "enforce_eager" and not called


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "m", "--prompt", "x", "--enforce-eager"],
        ["serve", "m", "--enforce-eager"],
        ["bench", "serve", "m", "--enforce-eager"],
    ],
)
def test_cli_takes_enforce_eager(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).enforce_eager is True


@pytest.mark.slow
def test_a_failing_compiled_step_falls_back_to_eager(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_tiny_model(tmp_path / "m", "llama")
    want = _greedy(LLM(path, dtype="float32", max_model_len=128, max_num_seqs=4, enforce_eager=True))
    llm = LLM(path, dtype="float32", max_model_len=128, max_num_seqs=4, enforce_eager=True)
    runner = llm.engine.runner
    assert runner.capture(127, 4, backend="aot_eager") is None

    def broken(*args: object) -> None:
        raise RuntimeError("recompile failed")

    runner.captured.run = broken  # type: ignore[union-attr, method-assign]
    with caplog.at_level(logging.ERROR, logger="anyquant.engine"):
        assert _greedy(llm) == want
    assert runner.captured is None and "recompile failed" in caplog.text


def test_buckets_cover_max_num_seqs() -> None:
    assert capture.bucket_sizes(1) == (1,)
    assert capture.bucket_sizes(5) == (1, 2, 4, 8)
    assert capture.bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 64)


@pytest.mark.slow
def test_padding_rows_store_nothing(tmp_path: Path) -> None:
    """The captured forward is fed host tensors of the bucket's size: token ids, positions and
    slots (-1 for padding rows, which store nothing)."""
    llm = LLM(write_tiny_model(tmp_path / "m", "llama"), dtype="float32", max_model_len=64, max_num_seqs=4)
    runner = llm.engine.runner
    assert runner.capture(63, 4, backend="aot_eager") is None
    captured = runner.captured
    assert captured is not None
    before = runner.cache.k.clone()
    logits = captured.run(
        [5, 6, 7], [0, 0, 0], torch.tensor([0, 1, 2]), torch.zeros(3, 1, dtype=torch.long), [1, 1, 1]
    )
    assert logits.shape == (3, 259) and logits.dtype == torch.float32
    changed = (runner.cache.k != before).any(dim=(0, 1, 3))
    assert changed[:3].all() and not changed[3:].any()  # the padding row (slot -1) wrote nothing


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["auto", "torch"])
def test_growing_contexts_and_changing_batches_do_not_recompile(
    attention: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode steps whose contexts cross page boundaries (16 slots a page, 3 to 70 tokens) and
    whose batches move between the buckets of one compiled function (3 sequences in bucket 4, 2 in
    bucket 2) and to batch 1 run the graphs compiled at warm-up: Dynamo compiles no frame and
    adds no graph (its counters), and the tokens are the eager engine's. Where the C++ decode
    kernel runs ("auto"), every attention layer is the one `paged_decode_step` call on tensor
    inputs; "torch" captures the pure-torch attention op with its per-step plan instead."""
    from torch._dynamo.utils import counters

    from anyquant.layers import decode_kernel

    monkeypatch.setattr(decode_kernel._Setting, "mode", attention)
    path = FAMILIES["qwen2"](tmp_path / "qwen2")
    eager = LLM(path, dtype="float32", max_model_len=128, max_num_seqs=4, enforce_eager=True)
    compiled = LLM(path, dtype="float32", max_model_len=128, max_num_seqs=4, enforce_eager=True)
    assert compiled.engine.runner.capture(127, 4, backend="aot_eager") is None
    captured = compiled.engine.runner.captured
    assert captured is not None and captured.graphs_per_function() == [1, 1]
    if attention == "torch":
        assert captured.attention_reason == "ANYQUANT_DECODE_ATTENTION=torch"
    elif decode_kernel._cpu_reason() is None:
        assert captured.attention_reason is None  # the fused C++ op is the step's attention
    frames = dict(counters["frames"])
    graphs = counters["stats"]["unique_graphs"]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for prompts in (PROMPTS, PROMPTS[:2], PROMPTS[2:]):
        steps = captured.steps_run

        def greedy(llm: LLM, prompts: list[list[int]] = prompts) -> list[list[int]]:
            return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]

        assert greedy(compiled) == greedy(eager)
        assert captured.steps_run - steps >= 39
    assert dict(counters["frames"]) == frames and counters["stats"]["unique_graphs"] == graphs
    assert captured.graphs_per_function() == [1, 1]
