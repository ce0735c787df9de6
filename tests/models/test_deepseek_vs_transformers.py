"""DeepSeek-V2 / V3 (latent attention, dense-then-MoE stack), tiny and random, against transformers.

Each case is built with transformers' own config class, randomised (including V3's
`e_score_correction_bias`), saved in fp32 and compared with `AutoModelForCausalLM` on the same
directory: teacher-forced logits, greedy generation, and prefill vs token-by-token decode.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from anyquant import LLM, SamplingParams
from anyquant.engine.kv_cache import SequenceCache
from anyquant.errors import CheckpointError, UnsupportedError
from anyquant.layers.moe import SparseMoE
from anyquant.layers.rotary import RotaryEmbedding, rope_parameters
from anyquant.loading.loader import build_on_meta

transformers = pytest.importorskip("transformers")

COMMON: dict[str, Any] = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
# DeepSeek-V2's own YaRN settings (mscale == mscale_all_dim), scaled down; written in the old
# `rope_scaling` spelling that released V2 checkpoints use.
V2_YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "beta_fast": 32,
    "beta_slow": 1,
}
# mscale != mscale_all_dim so that both the cos/sin factor and the softmax factor matter.
V3_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,
    "beta_fast": 32,
    "beta_slow": 1,
}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # V2-Lite shape: full-rank q_proj, greedy softmax routing, two shared experts.
    "v2-lite": (
        "v2",
        dict(
            q_lora_rank=None,
            qk_nope_head_dim=32,
            v_head_dim=16,
            n_shared_experts=2,
            routed_scaling_factor=1.5,
        ),
    ),
    "v2-group-yarn": (
        "v2",
        dict(
            q_lora_rank=32,
            qk_nope_head_dim=16,
            v_head_dim=32,
            n_shared_experts=1,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            attention_bias=True,
            routed_scaling_factor=2.0,
        ),
    ),
    "v3": (
        "v3",
        dict(
            q_lora_rank=32, qk_nope_head_dim=16, v_head_dim=16, n_group=2, topk_group=1, norm_topk_prob=True
        ),
    ),
    "v3-yarn": (
        "v3",
        dict(
            q_lora_rank=None,
            qk_nope_head_dim=32,
            v_head_dim=32,
            n_group=2,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            rope_parameters=V3_YARN,
        ),
    ),
    # Every layer dense, and rotary on halves instead of adjacent pairs.
    "v3-dense-halves": (
        "v3",
        dict(
            q_lora_rank=32, qk_nope_head_dim=16, v_head_dim=32, first_k_dense_replace=3, rope_interleave=False
        ),
    ),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that any mismatch shows; a non-zero V3 correction bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            elif p.dim() >= 2:
                p.copy_(noise * p.shape[-1] ** -0.5)
            else:
                p.copy_(0.1 * noise)  # biases
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # Sigmoid scores live in (0, 1): a bias of this size reorders the experts.
                b.copy_((torch.rand(b.shape, generator=g) - 0.5) * 0.6)


def write_deepseek(path: Path, version: str, overrides: dict[str, Any], seed: int = 5) -> Path:
    fields = {**COMMON, **overrides}
    cls = transformers.DeepseekV2Config if version == "v2" else transformers.DeepseekV3Config
    model = transformers.AutoModelForCausalLM.from_config(cls(**fields), dtype=torch.float32)
    _randomise(model, seed)
    model.save_pretrained(path)
    return path


def _use_old_rope_spelling(path: Path, scaling: dict[str, Any]) -> None:
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = scaling
    config["rope_theta"] = 10000.0
    (path / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = {}
    for case, (version, overrides) in CASES.items():
        path = write_deepseek(tmp_path_factory.mktemp(case), version, overrides)
        if case == "v2-group-yarn":
            _use_old_rope_spelling(path, V2_YARN)
        paths[case] = path
    return paths


def _hf_model(path: Path) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def _hf_logits(path: Path, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return _hf_model(path)(torch.tensor([ids])).logits[0].float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


IDS = torch.randint(0, 300, (37,), generator=torch.Generator().manual_seed(0)).tolist()


def test_old_rope_spelling_reaches_transformers(checkpoints: dict[str, Path]) -> None:
    """Guards the yarn case itself: transformers must read `rope_scaling` as YaRN too."""
    config = transformers.AutoConfig.from_pretrained(checkpoints["v2-group-yarn"])
    assert config.rope_parameters["rope_type"] == "yarn"
    assert config.rope_parameters["mscale_all_dim"] == 0.707


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(checkpoints: dict[str, Path], case: str) -> None:
    path = checkpoints[case]
    ours = LLM(path, dtype="float32").logits(IDS)
    assert _rel(ours, _hf_logits(path, IDS)) < 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers(checkpoints: dict[str, Path], case: str) -> None:
    path = checkpoints[case]
    prompt = [256, 72, 101, 108, 108, 111]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    ours = LLM(path, dtype="float32").generate(prompt_token_ids=[prompt], sampling_params=params)[0].token_ids
    with torch.no_grad():
        hf = _hf_model(path).generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert ours == hf[0, len(prompt) :].tolist()


@pytest.mark.parametrize("case", ["v2-group-yarn", "v3-yarn"])
def test_prefill_equals_token_by_token_decode(checkpoints: dict[str, Path], case: str) -> None:
    llm = LLM(checkpoints[case], dtype="float32")
    ids = list(range(40, 60))
    full = llm.logits(ids)
    seq = SequenceCache(llm.model, len(ids), torch.float32)
    steps = [seq.forward([tok], pos)[0] for pos, tok in enumerate(ids)]
    assert torch.allclose(full, torch.stack(steps), atol=1e-5, rtol=1e-5)


def test_correction_bias_decides_v3_routing(checkpoints: dict[str, Path]) -> None:
    """Without the (selection-only) correction bias the V3 model no longer matches transformers."""
    path = checkpoints["v3"]
    llm = LLM(path, dtype="float32")
    routers = [m.gate for m in llm.model.modules() if isinstance(m, SparseMoE)]
    assert routers and all(r.e_score_correction_bias is not None for r in routers)
    for router in routers:
        assert router.e_score_correction_bias is not None
        router.e_score_correction_bias.data.zero_()
    assert _rel(llm.logits(IDS), _hf_logits(path, IDS)) > 1e-3


def _with_extra_tensors(src: Path, dst: Path, extra: dict[str, torch.Tensor]) -> Path:
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    save_file({**tensors, **extra}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def test_v3_mtp_block_is_ignored(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    src = checkpoints["v3"]
    mtp = {  # V3's multi-token-prediction block: stored as layer num_hidden_layers
        "model.layers.3.eh_proj.weight": torch.randn(64, 128),
        "model.layers.3.self_attn.q_a_proj.weight": torch.randn(32, 64),
    }
    path = _with_extra_tensors(src, tmp_path / "mtp", mtp)
    with_mtp = LLM(path, dtype="float32")
    assert not [name for name, _ in with_mtp.model.named_parameters() if "layers.3." in name]
    # Equal up to rounding only: re-saving moves every tensor to another file offset, and the
    # alignment of a memory-mapped weight can pick another GEMM code path (last-bit differences).
    torch.testing.assert_close(
        with_mtp.logits(IDS), LLM(src, dtype="float32").logits(IDS), rtol=1e-5, atol=1e-5
    )


def test_tensor_beyond_the_mtp_block_is_still_an_error(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = _with_extra_tensors(
        checkpoints["v3"], tmp_path / "extra", {"model.layers.4.x.weight": torch.ones(2)}
    )
    with pytest.raises(CheckpointError, match=r"model\.layers\.4\.x\.weight"):
        LLM(path, dtype="float32")


@pytest.mark.parametrize(
    "variant",
    [
        {"mscale": None, "mscale_all_dim": 0.8},  # no mscale: then mscale_all_dim plays no part here
        {"mscale": 1.0, "mscale_all_dim": 0.8, "truncate": False},
        {"beta_fast": 16, "beta_slow": 2, "attention_factor": 1.3},
    ],
)
def test_yarn_tables_match_transformers(variant: dict[str, Any]) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {k: v for k, v in {**V3_YARN, **variant}.items() if v is not None}
    config = transformers.DeepseekV3Config(**{**COMMON, "qk_nope_head_dim": 16, "rope_parameters": rope})
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    rotary = RotaryEmbedding(16, rope_parameters(config.to_dict()), 128, interleaved=True)
    assert torch.allclose(rotary.inv_freq, ref_inv, rtol=1e-6, atol=0)
    assert rotary.attn_factor == pytest.approx(ref_factor, rel=1e-12)


def _config(version: str, **overrides: Any) -> dict[str, Any]:
    arch = "DeepseekV2ForCausalLM" if version == "v2" else "DeepseekV3ForCausalLM"
    return {
        "architectures": [arch],
        **COMMON,
        "q_lora_rank": None,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "n_shared_experts": 1,
        **overrides,
    }


def test_moe_layer_freq_and_first_dense_layers() -> None:
    model = build_on_meta(_config("v2", num_hidden_layers=5, first_k_dense_replace=1, moe_layer_freq=2))
    sparse = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, SparseMoE)]
    assert sparse == [2, 4]


@pytest.mark.parametrize(
    ("version", "overrides", "error", "match"),
    [
        ("v2", {"norm_topk_prob": True}, UnsupportedError, "norm_topk_prob"),
        ("v2", {"topk_method": "noaux_tc"}, UnsupportedError, "topk_method"),
        ("v3", {"scoring_func": "softmax"}, UnsupportedError, "scoring_func"),
        ("v3", {"qk_rope_head_dim": 15}, CheckpointError, "qk_rope_head_dim"),
        ("v3", {"kv_lora_rank": None}, CheckpointError, "kv_lora_rank"),
        ("v3", {"n_group": 3}, CheckpointError, "n_group"),
    ],
)
def test_bad_configs_are_rejected(version: str, overrides: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build_on_meta(_config(version, **overrides))


# -- quantized -------------------------------------------------------------------------------


def _gptq_dequantize(tensors: dict[str, torch.Tensor], prefix: str, bits: int, v2: bool) -> torch.Tensor:
    """formats.md §3.2-3.4 written out independently: LSB-first bitstreams, v1 word offset, g_idx."""
    mask, per_word = (1 << bits) - 1, 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits

    def unpack(words: torch.Tensor) -> torch.Tensor:  # [..., W] int32 -> [..., W * per_word]
        w = words.to(torch.int64) & 0xFFFFFFFF
        return ((w[..., None] >> shifts) & mask).flatten(-2)

    qweight, qzeros = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"]
    scales, g_idx = tensors[f"{prefix}.scales"].double(), tensors[f"{prefix}.g_idx"].long()
    codes = unpack(qweight.T).T  # [K, N]
    if not v2:
        qzeros = ((qzeros.to(torch.int64) & 0xFFFFFFFF) + 0x11111111) & 0xFFFFFFFF
    zeros = unpack(qzeros)  # [groups, N]
    w = (codes - zeros[g_idx]).double() * scales[g_idx]  # [K, N]
    return w.T.contiguous()


def test_gptq_quantized_matches_transformers_on_dequantized_weights(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    quantize = pytest.importorskip("anyquant.convert.quantize")
    from anyquant.quant.formats.base import WriteOptions

    src, dst = checkpoints["v3"], tmp_path / "gptq"
    report = quantize.quantize_checkpoint(src, dst, "gptq", WriteOptions(bits=4, group_size=32))
    quantized = [r.prefix for r in report.layers if r.rel_error is not None]
    assert any(".experts." in p for p in quantized) and any("self_attn" in p for p in quantized)
    qconfig = json.loads((dst / "config.json").read_text())["quantization_config"]
    v2 = (qconfig.get("format") or qconfig.get("checkpoint_format") or "gptq") == "gptq_v2"
    stored = load_file(dst / "model.safetensors")
    dense = load_file(src / "model.safetensors")
    for prefix in quantized:
        dense[f"{prefix}.weight"] = _gptq_dequantize(stored, prefix, 4, v2).float()
    hf = _hf_model(src)
    # transformers keeps experts stacked in memory: [E, 2I, H] (gate rows, then up) and [E, H, I].
    per_expert = {n: t for n, t in dense.items() if ".experts." in n}
    plain = {n: t for n, t in dense.items() if n not in per_expert}
    missing, unexpected = hf.load_state_dict(plain, strict=False)
    assert not unexpected and all(m.endswith(("experts.gate_up_proj", "experts.down_proj")) for m in missing)
    with torch.no_grad():
        for name in per_expert:
            if not name.endswith(".gate_proj.weight"):
                continue
            layer, _, rest = name.partition(".experts.")
            e, p = int(rest.split(".")[0]), name.removesuffix(".gate_proj.weight")
            block = hf.get_submodule(f"{layer}.experts")
            block.gate_up_proj[e].copy_(torch.cat((per_expert[name], per_expert[f"{p}.up_proj.weight"])))
            block.down_proj[e].copy_(per_expert[f"{p}.down_proj.weight"])
        ref = hf(torch.tensor([IDS])).logits[0].float()
    ours = LLM(dst, dtype="float32").logits(IDS)
    assert _rel(ours, ref) < 1e-5
    # The quantization is visible: the unquantized model is clearly further away.
    assert _rel(LLM(src, dtype="float32").logits(IDS), ref) > 1e-3


def test_latent_cache_holds_one_latent_per_token(checkpoints: dict[str, Path]) -> None:
    """The cache keeps [kv latent, rope key] per token and layer, the value being a view of the
    key's latent (stored once), never per-head keys and values (the logits tests above check that
    it computes transformers' expanded attention), and `inspect` reports that size."""
    from anyquant.loading.describe import describe_checkpoint

    path = checkpoints["v3"]
    config = json.loads((path / "config.json").read_text())
    r, rope, layers = config["kv_lora_rank"], config["qk_rope_head_dim"], config["num_hidden_layers"]
    seq = SequenceCache(LLM(path, dtype="float32").model, 16, torch.float32)
    assert seq.cache.k.shape[:2] == (layers, 1) and seq.cache.k.shape[-1] == r + rope
    assert seq.cache.v.shape[:2] == (layers, 1) and seq.cache.v.shape[-1] == r
    assert seq.cache.v.untyped_storage().data_ptr() == seq.cache.k.untyped_storage().data_ptr()
    assert seq.cache.k.untyped_storage().nbytes() == seq.cache.k.numel() * 4  # nothing else allocated
    memory = describe_checkpoint(path, dtype="float32")["tensor_parallel"]["memory_per_rank"]
    assert memory["kv_cache_per_token"] == layers * (r + rope) * 4


@pytest.mark.parametrize("decode", ["auto", "torch"])
def test_latent_cache_over_scattered_pages_matches_transformers(
    checkpoints: dict[str, Path], decode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefill in two chunks (the second over a cached prefix, pages gathered out of order), then
    token-by-token decode (the C++ kernel where it runs, or the torch path), on the latent cache
    stored once: transformers' logits for every row."""
    from anyquant.engine.kv_cache import PagedAttention, PagedKVCache
    from anyquant.layers import decode_kernel

    monkeypatch.setattr(decode_kernel._Setting, "mode", decode)

    path = checkpoints["v3-yarn"]
    model = LLM(path, dtype="float32").model
    cache = PagedKVCache.for_model(model, 8, 4, torch.float32)
    assert cache.value_in_key
    pages = [5, 2, 7, 0, 3]
    ids = list(range(30, 47))
    rows = []
    with torch.inference_mode():
        for start, n in ((0, 6), (6, 7), (13, 1), (14, 1), (15, 1), (16, 1)):
            ctx = PagedAttention.for_sequences(cache, [(pages, start, n)])
            positions = torch.arange(start, start + n)
            rows.append(model(torch.tensor(ids[start : start + n]), positions, ctx))
    ours = torch.cat(rows)
    hf = _hf_logits(path, ids)
    assert _rel(ours, hf) < 1e-4, _rel(ours, hf)


def test_engine_prefix_hit_and_chunked_prefill_match_transformers(checkpoints: dict[str, Path]) -> None:
    """The engine on the latent cache: prompts prefilled in 8-token chunks beside other requests'
    decode rows, the second and third reusing the first's cached prefix pages, pick transformers'
    greedy tokens (teacher-forced on our sequence)."""
    from anyquant.engine.engine import Engine, EngineConfig

    path = checkpoints["v3-yarn"]
    llm = LLM(path, dtype="float32")
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, 300, (37,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, 300, (n,), generator=g).tolist() for n in (2, 11, 5)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    config = EngineConfig(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=8)
    engine = Engine(llm.model, None, config, torch.float32, torch.device("cpu"))
    tokens: dict[str, list[int]] = {}
    first = engine.add_request(prompts[0], params)
    tokens[first] = []
    while engine.has_unfinished():
        for delta in engine.step():
            tokens[delta.request_id] += delta.new_token_ids
    ids = [first] + [engine.add_request(p, params) for p in prompts[1:]]
    for rid in ids[1:]:
        tokens[rid] = []
    while engine.has_unfinished():
        for delta in engine.step():
            tokens[delta.request_id] += delta.new_token_ids
    assert engine.scheduler.num_prefix_hit_tokens >= 2 * 32  # two full 16-token pages, twice
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, rid in zip(prompts, ids):
        out = tokens[rid]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out[:-1]])).logits[0]
        assert logits[len(prompt) - 1 :].argmax(-1).tolist() == out


def test_latent_cache_bytes_and_pages_at_v3_shapes() -> None:
    """(kv_lora_rank + rope) x dtype size per token and layer, and a KV budget buys that many more
    pages than a cache storing the latent twice."""
    from anyquant.engine.engine import EngineConfig, kv_pages
    from anyquant.engine.kv_cache import PagedKVCache

    v3 = dict(
        num_attention_heads=128, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, hidden_size=7168
    )
    model = build_on_meta(_config("v3", q_lora_rank=64, v_head_dim=128, n_group=1, topk_group=1, **v3))
    layers = model.args.num_layers
    per_page = PagedKVCache.page_bytes_for_model(model, 16, torch.bfloat16)
    assert per_page == layers * 16 * 576 * 2  # 1152 bytes per token and layer
    twice = PagedKVCache.bytes_per_page(layers, 16, 1, 576, 512, torch.bfloat16)  # 2176 per token and layer
    config = EngineConfig(max_model_len=4096, kv_cache_gb=1.0)
    pages, pages_twice = kv_pages(config, per_page), kv_pages(config, twice)
    assert pages == 2**30 // per_page and pages_twice == 2**30 // twice
    assert pages >= 1.88 * pages_twice  # 2176 / 1152 = 1.89


def test_latent_cache_is_a_tenth_of_the_expanded_one_at_v3_shapes() -> None:
    """DeepSeek-V3's geometry: 576 cached values per token and layer (the value is the key's first
    512) against 128 heads x (192 + 128) expanded, 1.4 %."""
    v3 = dict(
        num_attention_heads=128, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, hidden_size=7168
    )
    model = build_on_meta(_config("v3", q_lora_rank=64, v_head_dim=128, n_group=1, topk_group=1, **v3))
    shape = model.cache_shape
    assert (shape.num_kv_heads, shape.k_dim, shape.v_dim, shape.value_in_key) == (1, 576, 512, True)
    expanded = 128 * ((128 + 64) + 128)
    assert shape.stored_width == 576 and shape.stored_width * 70 <= expanded
