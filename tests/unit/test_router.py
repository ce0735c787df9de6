"""MoE routing rules and the sparse block, against direct per-token formulas and transformers' routers.

The direct formulas below are written from the routing definitions (softmax / sigmoid scores,
grouped top-k, correction bias for selection only, renormalisation, routed scaling) one token at
a time in float64, independently of anyquant's vectorised `route`.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from anyquant.errors import CheckpointError
from anyquant.layers.linear import QuantLinear
from anyquant.layers.moe import MIXTRAL_EXPERT_NAMES, Router, RoutingConfig, SparseMoE, route
from anyquant.quant.kernels.dense import DenseKernel

E, T, H = 8, 64, 16


def _direct_route(logits: Tensor, cfg: RoutingConfig, bias: Tensor | None) -> list[dict[int, float]]:
    """Per token: {expert id: weight}, from the definition."""
    out = []
    for row in logits.double().tolist():
        if cfg.scoring == "softmax":
            m = max(row)
            exp = [math.exp(v - m) for v in row]
            scores = [v / sum(exp) for v in exp]
        else:
            scores = [1.0 / (1.0 + math.exp(-v)) for v in row]
        choice = [s + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(scores)]
        eligible = list(range(cfg.num_experts))
        if cfg.n_group > 1:
            size = cfg.num_experts // cfg.n_group
            group_score = []
            for g in range(cfg.n_group):
                members = sorted(choice[g * size : (g + 1) * size], reverse=True)
                use_top2 = cfg.group_score == "top2_sum" or (
                    cfg.group_score is None and cfg.e_score_correction_bias
                )
                group_score.append(members[0] + members[1] if use_top2 else members[0])
            best = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
            eligible = [e for e in eligible if e // size in best]
        chosen = sorted(eligible, key=lambda e: -choice[e])[: cfg.top_k]
        weights = {e: scores[e] for e in chosen}
        if cfg.norm_topk_prob:
            total = sum(weights.values())
            weights = {e: w / total for e, w in weights.items()}
        out.append({e: w * cfg.routed_scaling_factor for e, w in weights.items()})
    return out


def _as_dicts(weights: Tensor, ids: Tensor) -> list[dict[int, float]]:
    return [dict(zip(i, w)) for i, w in zip(ids.tolist(), weights.tolist())]


def _assert_same_routing(
    got: list[dict[int, float]], want: list[dict[int, float]], tol: float = 1e-6
) -> None:
    for t, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w), (t, g, w)
        for e in w:
            assert abs(g[e] - w[e]) <= tol * max(1.0, abs(w[e])), (t, e, g[e], w[e])


CASES: dict[str, dict[str, Any]] = {
    "qwen-softmax-topk": dict(num_experts=E, top_k=2),
    "mixtral-softmax-renorm": dict(num_experts=E, top_k=2, norm_topk_prob=True),
    "deepseek-v2-group-max": dict(
        num_experts=E, top_k=3, n_group=4, topk_group=2, routed_scaling_factor=16.0
    ),
    "deepseek-v3-sigmoid-bias-groups": dict(
        num_experts=E,
        top_k=4,
        scoring="sigmoid",
        n_group=4,
        topk_group=2,
        e_score_correction_bias=True,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
    "sigmoid-bias-no-groups": dict(
        num_experts=E, top_k=2, scoring="sigmoid", e_score_correction_bias=True, norm_topk_prob=True
    ),
    "sigmoid-top2-override": dict(
        num_experts=E, top_k=2, scoring="sigmoid", n_group=2, topk_group=1, group_score="top2_sum"
    ),
    "softmax-bias-max-override": dict(
        num_experts=E, top_k=2, n_group=4, topk_group=2, e_score_correction_bias=True, group_score="max"
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_route_matches_direct_formula(case: str) -> None:
    cfg = RoutingConfig(**CASES[case])
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(T, E, generator=g) * 2.0
    bias = torch.randn(E, generator=g) * 0.3 if cfg.e_score_correction_bias else None
    weights, ids = route(logits, cfg, bias)
    assert weights.dtype == torch.float32 and ids.shape == (T, cfg.top_k)
    _assert_same_routing(_as_dicts(weights, ids), _direct_route(logits, cfg, bias))


def test_correction_bias_steers_selection_not_weights() -> None:
    cfg = RoutingConfig(4, 1, scoring="sigmoid", e_score_correction_bias=True)
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    weights, ids = route(logits, cfg, torch.tensor([5.0, 0.0, 0.0, 0.0]))
    assert ids.tolist() == [[0]]
    assert weights.tolist() == [[0.5]]  # sigmoid(0), not sigmoid(0) + 5


def test_groups_exclude_the_best_expert_of_a_weak_group() -> None:
    # Group 0 = experts 0-1 (one star, one dud), group 1 = experts 2-3 (two good ones).
    logits = torch.tensor([[3.0, -9.0, 2.5, 2.4]])
    v2 = RoutingConfig(4, 1, n_group=2, topk_group=1, group_score="max")
    v3 = RoutingConfig(4, 1, n_group=2, topk_group=1, group_score="top2_sum")
    assert route(logits, v2)[1].tolist() == [[0]]
    assert route(logits, v3)[1].tolist() == [[2]]


def _hf_config(cls_name: str, **fields: Any) -> Any:
    transformers = pytest.importorskip("transformers")
    return getattr(transformers, cls_name)(hidden_size=H, num_attention_heads=4, **fields)


def _hf_router(module: str, cls: str, config: Any, weight: Tensor, bias: Tensor | None = None) -> Any:
    mod = pytest.importorskip(f"transformers.models.{module}.modeling_{module}")
    router = getattr(mod, cls)(config)
    with torch.no_grad():
        router.weight.copy_(weight)
        if bias is not None:
            router.e_score_correction_bias.copy_(bias)
    return router


HF_ROUTERS: dict[str, tuple[str, str, str, dict[str, Any], dict[str, Any]]] = {
    # name: (module, router class, config class, hf config fields, our RoutingConfig fields)
    "mixtral": (
        "mixtral",
        "MixtralTopKRouter",
        "MixtralConfig",
        dict(num_local_experts=E, num_experts_per_tok=2),
        dict(num_experts=E, top_k=2, norm_topk_prob=True),
    ),
    "qwen2_moe": (
        "qwen2_moe",
        "Qwen2MoeTopKRouter",
        "Qwen2MoeConfig",
        dict(num_experts=E, num_experts_per_tok=3, norm_topk_prob=False),
        dict(num_experts=E, top_k=3),
    ),
    "qwen3_moe-norm": (
        "qwen3_moe",
        "Qwen3MoeTopKRouter",
        "Qwen3MoeConfig",
        dict(num_experts=E, num_experts_per_tok=3, norm_topk_prob=True),
        dict(num_experts=E, top_k=3, norm_topk_prob=True),
    ),
    "deepseek_v2-group": (
        "deepseek_v2",
        "DeepseekV2TopkRouter",
        "DeepseekV2Config",
        dict(
            n_routed_experts=E,
            num_experts_per_tok=3,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=16.0,
        ),
        dict(num_experts=E, top_k=3, n_group=4, topk_group=2, routed_scaling_factor=16.0),
    ),
    "deepseek_v3": (
        "deepseek_v3",
        "DeepseekV3TopkRouter",
        "DeepseekV3Config",
        dict(
            n_routed_experts=E,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
        dict(
            num_experts=E,
            top_k=4,
            scoring="sigmoid",
            n_group=4,
            topk_group=2,
            e_score_correction_bias=True,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(HF_ROUTERS))
def test_route_matches_transformers_router(name: str) -> None:
    module, cls, config_cls, hf_fields, ours = HF_ROUTERS[name]
    cfg = RoutingConfig(**ours)
    g = torch.Generator().manual_seed(11)
    weight = torch.randn(E, H, generator=g) * 0.5
    bias = torch.randn(E, generator=g) * 0.3 if cfg.e_score_correction_bias else None
    x = torch.randn(T, H, generator=g)
    hf_config = _hf_config(config_cls, **hf_fields)
    router = _hf_router(module, cls, hf_config, weight, bias)
    with torch.no_grad():
        _, hf_weights, hf_ids = router(x)
    weights, ids = route(x @ weight.T, cfg, bias)
    _assert_same_routing(_as_dicts(weights, ids), _as_dicts(hf_weights.float(), hf_ids), tol=1e-5)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(num_experts=0, top_k=1), "num_experts"),
        (dict(num_experts=4, top_k=5), "num_experts_per_tok"),
        (dict(num_experts=4, top_k=0), "num_experts_per_tok"),
        (dict(num_experts=6, top_k=2, n_group=4), "n_group"),
        (dict(num_experts=8, top_k=2, n_group=4, topk_group=5), "topk_group"),
        (dict(num_experts=8, top_k=5, n_group=4, topk_group=2), "num_experts_per_tok"),
        (dict(num_experts=4, top_k=1, n_group=4, topk_group=1, group_score="top2_sum"), "n_group"),
        (dict(num_experts=4, top_k=1, scoring="tanh"), "scoring_func"),
    ],
)
def test_bad_routing_config_names_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(CheckpointError, match=f"'{field}'"):
        RoutingConfig(**fields)


def _set_weight(layer: QuantLinear, weight: Tensor) -> None:
    kernel = DenseKernel(layer.shape, weight.dtype)
    kernel.load(weight)
    layer.set_kernel(kernel)


def test_router_declares_correction_bias_only_when_configured() -> None:
    plain = Router("m.gate", H, RoutingConfig(E, 2))
    biased = Router("m.gate", H, RoutingConfig(E, 2, scoring="sigmoid", e_score_correction_bias=True))
    assert plain.kind == biased.kind == "router"
    assert [n for n, _ in plain.named_parameters()] == []
    assert [n for n, _ in biased.named_parameters()] == ["e_score_correction_bias"]
    assert biased.e_score_correction_bias is not None and biased.e_score_correction_bias.shape == (E,)


def test_router_computes_fp32_logits_from_low_precision_input() -> None:
    router = Router("m.gate", H, RoutingConfig(E, 2))
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(E, H, generator=g)
    _set_weight(router, weight)
    x = torch.randn(5, H, generator=g).to(torch.bfloat16)
    logits = router(x)
    assert logits.dtype == torch.float32
    want = x.double() @ weight.double().T
    assert torch.allclose(logits.double(), want, atol=1e-5)


def _random_moe(shared: bool) -> SparseMoE:
    cfg = RoutingConfig(E, 2, norm_topk_prob=True)
    moe = SparseMoE(
        "model.layers.0.mlp", H, 12, cfg, shared_name="shared_expert", shared_size=20, shared_gate=shared
    )
    g = torch.Generator().manual_seed(5)
    for module in moe.modules():
        if isinstance(module, QuantLinear):
            _set_weight(module, torch.randn(module.shape, generator=g) * 0.4)
    return moe


def _mlp64(x: Tensor, mlp: Any) -> Tensor:
    def w(layer: QuantLinear) -> Tensor:
        assert isinstance(layer.kernel, DenseKernel)
        return layer.kernel.weight.double()

    a = x @ w(mlp.gate_proj).T
    return (a * torch.sigmoid(a) * (x @ w(mlp.up_proj).T)) @ w(mlp.down_proj).T


@pytest.mark.parametrize("shared", [False, True])
def test_sparse_moe_matches_direct_sum_and_runs_each_expert_once(shared: bool) -> None:
    """shared: the shared expert is sigmoid-gated (Qwen2-MoE), else always on (DeepSeek)."""
    moe = _random_moe(shared)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(9))
    calls = [0] * E
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda *_, e=e: calls.__setitem__(e, calls[e] + 1))
    with torch.no_grad():
        got = moe(x)
    assert got.dtype == torch.float32 and got.shape == (T, H)

    x64 = x.double()
    assert isinstance(moe.gate.kernel, DenseKernel)
    routing = _direct_route(x64 @ moe.gate.kernel.weight.double().T, moe.routing, None)
    want = torch.zeros(T, H, dtype=torch.float64)
    for t, chosen in enumerate(routing):
        for e, weight in chosen.items():
            want[t] += weight * _mlp64(x64[t : t + 1], moe.experts[e])[0]
    # Always a shared expert: sigmoid-gated (Qwen2-MoE) or plain (DeepSeek).
    assert moe.shared_expert is not None
    shared_out = _mlp64(x64, moe.shared_expert)
    if shared:
        assert moe.shared_expert_gate is not None
        gate_w = moe.shared_expert_gate.kernel.weight.double()  # type: ignore[union-attr]
        shared_out = torch.sigmoid(x64 @ gate_w.T) * shared_out
    else:
        assert moe.shared_expert_gate is None
    want += shared_out
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    selected = {e for chosen in routing for e in chosen}
    assert calls == [1 if e in selected else 0 for e in range(E)]


def test_sparse_moe_empty_input() -> None:
    moe = _random_moe(shared=True)
    with torch.no_grad():
        out = moe(torch.zeros(0, H))
    assert out.shape == (0, H)


def test_checkpoint_prefixes_and_kinds() -> None:
    moe = SparseMoE(
        "model.layers.2.block_sparse_moe", H, 12, RoutingConfig(4, 2), "silu", MIXTRAL_EXPERT_NAMES
    )
    prefixes = {m.prefix: m.kind for m in moe.modules() if isinstance(m, QuantLinear)}
    assert prefixes["model.layers.2.block_sparse_moe.gate"] == "router"
    for e in range(4):
        for n in ("w1", "w2", "w3"):
            assert prefixes[f"model.layers.2.block_sparse_moe.experts.{e}.{n}"] == "experts"
    assert len(prefixes) == 1 + 4 * 3
    qwen2 = SparseMoE("p.mlp", H, 12, RoutingConfig(4, 2), "silu", shared_name="shared_expert", shared_size=8,
                      shared_gate=True)  # fmt: skip
    kinds = {m.prefix: m.kind for m in qwen2.modules() if isinstance(m, QuantLinear)}
    assert kinds["p.mlp.shared_expert_gate"] == "router"
    assert kinds["p.mlp.shared_expert.down_proj"] == "linear"
    with pytest.raises(CheckpointError, match="moe_intermediate_size"):
        SparseMoE("p.mlp", H, 0, RoutingConfig(4, 2))
