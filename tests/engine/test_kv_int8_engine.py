"""`kv_cache_dtype="int8"` through the engine: quality against the float cache, the engine's page
moves (prefix caching, preemption, chunked prefill, batching) on int8 pages, the captured decode
step, the KV budget in int8 bytes, and clear refusals (unknown values, latent attention)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant import LLM, SamplingParams
from anyquant.engine.engine import Engine, EngineConfig
from anyquant.errors import AnyquantError, NumericsError, UnsupportedError
from anyquant.utils.tiny_model import write_tiny_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
# The int8 cache's logits may differ from the float cache's by at most this fraction of the
# float logits' standard deviation. Each cached value is off by at most amax / 254 of its row
# (0.4 % of the row's largest value); through two layers of attention on this random-weight model
# the logits moved by at most 3.4 % of their spread (rms 0.5-0.8 %; measured over 8 prompts of
# 9-36 tokens and two model seeds): 5 % leaves room for other prompts and still fails a cache read
# with a wrong scale or the wrong rows.
LOGIT_BUDGET = 0.05


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("kv8"), "qwen2", seed=21)


def _prompts(n: int, seed: int = 0, longest: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (int(torch.randint(2, longest, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def _tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]


def test_int8_logits_stay_within_budget_and_pick_the_float_caches_tokens(tiny: Path) -> None:
    flt = LLM(tiny, dtype="float32", enforce_eager=True)
    q8 = LLM(tiny, dtype="float32", kv_cache_dtype="int8", enforce_eager=True)
    assert q8.engine.runner.cache.k.dtype == torch.int8 and flt.engine.runner.cache.k.dtype == torch.float32
    # A random-weight model's logits are flat (top-2 margins of 0.2-5 % of their spread are
    # common): prompt seed 7 is one whose 5 greedy steps all win by more than twice the budget.
    prompts = _prompts(3, seed=7)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    want = _tokens(flt, prompts, params)
    for prompt, out in zip(prompts, want):
        ref = flt.logits(prompt + out[:-1])
        got = q8.logits(prompt + out[:-1])
        budget = LOGIT_BUDGET * float(ref.std())
        diff = float((got - ref).abs().max())
        assert 0 < diff <= budget  # quantized (not the float cache), and within the budget
        # Equal tokens are a meaningful check only where the float choice wins by more than the
        # budget allows the int8 logits to move (2 x: the best and the runner-up both move).
        top2 = ref[len(prompt) - 1 :].topk(2, dim=-1).values
        assert bool((top2[:, 0] - top2[:, 1] > 2 * budget).all()), "pick another seed: margins too small"
    assert _tokens(q8, prompts, params) == want  # the engine's int8 prefill and decode steps


def test_batching_prefix_cache_and_teacher_forcing_agree_on_int8(tiny: Path) -> None:
    llm = LLM(tiny, dtype="float32", kv_cache_dtype="int8", enforce_eager=True)
    prompts = _prompts(6, seed=2)
    together = _tokens(llm, prompts)
    assert together == [_tokens(llm, [p])[0] for p in prompts]
    # a prompt that shares 48 tokens (3 pages) with one served before: the hit reads int8 pages
    prompt = [*(_prompts(1, seed=3, longest=60)[0] + list(range(50)))[:48], 7, 8, 9]
    first = _tokens(llm, [prompt])[0]
    hits = llm.engine.scheduler.num_prefix_hit_tokens
    second = _tokens(llm, [prompt])[0]
    assert llm.engine.scheduler.num_prefix_hit_tokens >= hits + 48
    assert second == first
    prompt = prompts[0]
    logits = llm.logits(prompt + together[0][:-1])  # the teacher-forced pass, its own int8 cache
    assert logits[len(prompt) - 1 :].argmax(-1).tolist() == together[0]


def test_preemption_and_chunked_prefill_on_int8_pages_change_nothing(tiny: Path) -> None:
    llm = LLM(tiny, dtype="float32", kv_cache_dtype="int8", enforce_eager=True)
    prompts = _prompts(8, seed=4)
    want = [_tokens(llm, [p])[0] for p in prompts]
    per_page = llm.engine.runner.cache.k[:, :, :16].nbytes + llm.engine.runner.cache.v[:, :, :16].nbytes
    # 6 pages for 8 requests of up to 51 tokens, prefill chunks of 8 tokens
    config = EngineConfig(
        max_model_len=128,
        max_num_seqs=8,
        max_num_batched_tokens=8,
        kv_cache_gb=6 * per_page / 2**30,
        kv_cache_dtype="int8",
    )
    engine = Engine(llm.model, llm.tokenizer, config, torch.float32, llm.device)
    assert engine.allocator.num_pages == 6
    rids = [engine.add_request(p, GREEDY) for p in prompts]
    tokens: dict[str, list[int]] = {rid: [] for rid in rids}
    while engine.has_unfinished():
        for delta in engine.step():
            tokens[delta.request_id] += delta.new_token_ids
    assert engine.scheduler.num_preemptions > 0
    assert [tokens[r] for r in rids] == want


def test_captured_int8_step_picks_the_eager_tokens(tiny: Path) -> None:
    prompts = [[256, 5, 6, 7, 8, 9], [256, 40, 41], [256, *range(60, 90)]]  # bucket 4
    eager = LLM(
        tiny, dtype="float32", max_model_len=128, max_num_seqs=4, enforce_eager=True, kv_cache_dtype="int8"
    )
    compiled = LLM(
        tiny, dtype="float32", max_model_len=128, max_num_seqs=4, enforce_eager=True, kv_cache_dtype="int8"
    )
    assert compiled.engine.runner.capture(127, 4, backend="aot_eager") is None  # no graph break
    captured = compiled.engine.runner.captured
    assert captured is not None
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    assert _tokens(compiled, prompts, params) == _tokens(eager, prompts, params)
    assert captured.steps_run >= 9


@pytest.mark.parametrize("head_dim", [16, 128])
def test_the_same_budget_holds_the_int8_pages(tmp_path: Path, head_dim: int) -> None:
    path = write_tiny_model(tmp_path / "m", "llama", head_dim=head_dim)
    # 2 layers x 16 tokens x 2 KV heads x (key + value): bf16 2 bytes a value; int8 1 byte a
    # value and 4 bytes of scale a row
    bf16_page = 2 * 16 * 2 * 2 * head_dim * 2
    int8_page = 2 * 16 * 2 * 2 * (head_dim + 4)
    budget = 1 << 20
    pages = {
        kv: LLM(
            path, dtype="bfloat16", kv_cache_gb=budget / 2**30, kv_cache_dtype=kv, enforce_eager=True
        ).engine.num_kv_pages
        for kv in ("auto", "int8")
    }
    assert pages == {"auto": budget // bf16_page, "int8": budget // int8_page}
    if head_dim == 128:  # 1.94x the tokens in the same budget
        assert pages["int8"] >= 1.9 * pages["auto"]

    from anyquant.loading.describe import describe_checkpoint

    for kv, page in (("auto", bf16_page), ("int8", int8_page)):
        mem = describe_checkpoint(path, dtype="bfloat16", max_model_len=100, kv_cache_dtype=kv)
        per_rank = mem["tensor_parallel"]["memory_per_rank"]
        assert per_rank["kv_cache_per_token"] == page // 16
        assert per_rank["kv_cache_dtype"] == ("bfloat16" if kv == "auto" else "int8")


def test_unknown_kv_cache_dtypes_are_refused_by_name(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(
        AnyquantError, match="kv_cache_dtype 'fp8' is not supported; choose one of auto, int8"
    ):
        LLM(tiny, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype 'q8_0' is not supported"):
        EngineConfig(max_model_len=64, kv_cache_dtype="q8_0")

    from anyquant.cli.flags import KV_CACHE_DTYPE_CHOICES
    from anyquant.cli.llm_options import llm_options
    from anyquant.cli.main import build_parser
    from anyquant.layers.kv_quant import KV_CACHE_DTYPES

    assert KV_CACHE_DTYPE_CHOICES == KV_CACHE_DTYPES
    parser = build_parser()
    for command in (
        ["generate", "m", "--prompt", "x"],
        ["serve", "m"],
        ["bench", "offline", "m"],
        ["bench", "serve", "m"],
        ["inspect", "m"],
    ):
        args = parser.parse_args([*command, "--kv-cache-dtype", "int8"])
        assert args.kv_cache_dtype == "int8"
        if command[0] in ("generate", "serve"):
            assert llm_options(args)["kv_cache_dtype"] == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "m", "--prompt", "x", "--kv-cache-dtype", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_latent_attention_refuses_an_int8_cache(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from anyquant.loading.describe import describe_checkpoint
    from tests.models.test_deepseek_vs_transformers import CASES, write_deepseek

    version, overrides = CASES["v3"]
    path = write_deepseek(tmp_path / "ds", version, overrides)
    message = "kv_cache_dtype='int8' is not supported for DeepseekV3ForCausalLM: its latent attention"
    with pytest.raises(UnsupportedError, match=message):
        LLM(path, dtype="float32", kv_cache_dtype="int8", enforce_eager=True)
    with pytest.raises(UnsupportedError, match=message):
        describe_checkpoint(path, kv_cache_dtype="int8")
    assert LLM(path, dtype="float32", enforce_eager=True).engine.runner.cache.k.dtype == torch.float32


def test_a_non_finite_key_row_reaches_the_numeric_guard(tiny: Path) -> None:
    """A key row with an inf is stored with a NaN scale: it reads back as NaN and the step's
    logits are reported as non-finite, never attended as a finite wrong row."""
    llm = LLM(tiny, dtype="float32", kv_cache_dtype="int8", enforce_eager=True, merge_projections=False)
    k_proj = next(m for n, m in llm.loaded.model.named_modules() if n.endswith("layers.0.self_attn.k_proj"))

    def poison(module: torch.nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[0, 0] = float("inf")  # the first token's first key value
        return out

    handle = k_proj.register_forward_hook(poison)
    try:
        with pytest.raises(NumericsError, match="non-finite logits"):
            llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=GREEDY)
        cache = llm.engine.runner.cache.k[0]
        assert bool((cache[..., -4:].contiguous().view(torch.float32).isnan()).any())
    finally:
        handle.remove()
    assert _tokens(llm, [[1, 2, 3]])[0]  # the engine goes on once the row is healthy again
