"""lmdeploy smooth_quant: the real lmdeploy 0.18 fixture, writer round trips, detection, errors.

Oracles: the fixture written by lmdeploy itself, its unquantized bf16 original, and a float64
dequantizer written here from formats.md §7 (W[n, k] = weight[n, k] * scale[n, 0]).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from anyquant.errors import NumericsError, QuantConfigError, TensorError, UnsupportedError
from anyquant.loading.checkpoint import Checkpoint
from anyquant.quant.algorithms.rtn import quantize_rtn
from anyquant.quant.formats.base import WriteOptions
from anyquant.quant.registry import writer_class
from anyquant.quant.spec import ActQuant, QuantSpec
from tests.helpers.format_checkpoints import check_detection, checkpoint, load_layer, reader

FIXTURE = "llama-w8a8int8-smoothquant-lmdeploy"
ORIGINAL = "llama-bf16-original"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
INT8_SPEC = QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True, granularity="token"))
P = "model.layers.0.mlp.up_proj"


def linears(num_layers: int = 2) -> list[str]:
    return [f"model.layers.{i}.self_attn.{m}" for i in range(num_layers) for m in ATTN] + [
        f"model.layers.{i}.mlp.{m}" for i in range(num_layers) for m in MLP
    ]


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- the real lmdeploy checkpoint ------------------------------------------------------------------


def test_fixture_detection(third_party: Path) -> None:
    ckpt = Checkpoint(third_party / FIXTURE)
    fmt = reader(ckpt)
    assert fmt.name == "smooth_quant" and "int8" in fmt.describe()
    for prefix in linears():
        assert fmt.spec_for(prefix, "linear") == INT8_SPEC, prefix
        assert fmt.stored_names(prefix, INT8_SPEC).required == (f"{prefix}.weight", f"{prefix}.scale")
    assert fmt.spec_for("lm_head", "lm_head") is None
    assert fmt.spec_for("model.embed_tokens", "embedding") is None
    for norm in ("model.norm", "model.layers.0.input_layernorm", "model.layers.1.post_attention_layernorm"):
        assert fmt.spec_for(norm, "linear") is None
    assert fmt.notes == []


def test_fixture_decode_matches_float64_formula(third_party: Path) -> None:
    ckpt = Checkpoint(third_party / FIXTURE)
    fmt = reader(ckpt)
    raw = load_file(str(third_party / FIXTURE / "model.safetensors"))
    for prefix in linears():
        got = load_layer(fmt, ckpt, prefix)
        codes, scale = raw[f"{prefix}.weight"], raw[f"{prefix}.scale"]
        assert got.data.dtype == torch.int8 and torch.equal(got.data, codes)
        assert got.scale.shape == (codes.shape[0],) and got.scale.dtype == torch.float32
        ours = got.data.double() * got.scale.double().unsqueeze(-1)
        assert torch.equal(ours, codes.double() * scale.double())  # §7: weight[n, k] * scale[n, 0]
        # lmdeploy's scale is amax_row / 127, so every row's largest code is exactly ±127.
        assert bool((codes.abs().amax(dim=1) == 127).all()), prefix


def test_fixture_against_original_with_folded_smoothing(third_party: Path) -> None:
    """The dequantized weights are not the original's: SmoothQuant moved factors s between layers.

    For norm -> {q, k, v} and norm -> {gate, up}, column k of the linear is multiplied by s_k and
    the norm weight divided by it, so W[:, k] * norm[k] is invariant. For up -> down (and v -> o),
    row i of up (v) is divided by s_i and column i of down (o) multiplied by it, so
    ||down[:, i]|| * up[i, :] * norm is invariant (o: one v row serves every query head of its KV
    group). What remains is int8 per-channel rounding, about 0.7% relative here; without the
    folding the same comparison is off by ~10%, which is what proves smoothing is present.
    """
    ckpt = Checkpoint(third_party / FIXTURE)
    fmt = reader(ckpt)
    quant = load_file(str(third_party / FIXTURE / "model.safetensors"))
    orig = load_file(str(third_party / ORIGINAL / "model.safetensors"))
    heads_per_kv = 4 // 2  # num_attention_heads / num_key_value_heads of the fixture
    head_dim = 64

    def deq(prefix: str) -> Tensor:
        w = load_layer(fmt, ckpt, prefix)
        return w.data.double() * w.scale.double().unsqueeze(-1)

    for i in range(2):
        layer = f"model.layers.{i}"
        norms = {
            name: (quant[f"{layer}.{name}.weight"].double(), orig[f"{layer}.{name}.weight"].double())
            for name in ("input_layernorm", "post_attention_layernorm")
        }
        ours = {m: deq(f"{layer}.self_attn.{m}") for m in ATTN} | {m: deq(f"{layer}.mlp.{m}") for m in MLP}
        theirs = {m: orig[f"{layer}.self_attn.{m}.weight"].double() for m in ATTN} | {
            m: orig[f"{layer}.mlp.{m}.weight"].double() for m in MLP
        }
        assert rel(ours["q_proj"], theirs["q_proj"]) > 0.05  # smoothing really changed the weights
        for m, norm in [
            ("q_proj", "input_layernorm"),
            ("k_proj", "input_layernorm"),
            ("v_proj", "input_layernorm"),
            ("gate_proj", "post_attention_layernorm"),
        ]:
            nq, no = norms[norm]
            assert rel(ours[m] * nq, theirs[m] * no) < 0.012, (layer, m)
        nq, no = norms["post_attention_layernorm"]
        up_q = ours["down_proj"].norm(dim=0).unsqueeze(1) * ours["up_proj"] * nq
        up_o = theirs["down_proj"].norm(dim=0).unsqueeze(1) * theirs["up_proj"] * no
        assert rel(up_q, up_o) < 0.012, (layer, "up/down")
        # o column j reads v row kv(j): head h uses KV head h // heads_per_kv.
        j = torch.arange(ours["o_proj"].shape[1])
        kv_row = (j // head_dim) // heads_per_kv * head_dim + j % head_dim
        nq, no = norms["input_layernorm"]
        ov_q = ours["o_proj"].norm(dim=0).unsqueeze(1) * ours["v_proj"][kv_row] * nq
        ov_o = theirs["o_proj"].norm(dim=0).unsqueeze(1) * theirs["v_proj"][kv_row] * no
        assert rel(ov_q, ov_o) < 0.012, (layer, "v/o")


# -- writers -------------------------------------------------------------------------------------

WRITERS = [
    ("lmdeploy-int8", WriteOptions(), "int8", torch.int8, 127.0),
    ("lmdeploy-int8", WriteOptions(act="int8-dynamic"), "int8", torch.int8, 127.0),
    ("lmdeploy-fp8", WriteOptions(act="fp8-dynamic"), "float8_e4m3fn", torch.float8_e4m3fn, 448.0),
    (
        "lmdeploy-fp8",
        WriteOptions(extra={"quant_dtype": "float8_e5m2"}),
        "float8_e5m2",
        torch.float8_e5m2,
        57344.0,
    ),
]


@pytest.mark.parametrize(("name", "options", "quant_dtype", "dtype", "qmax"), WRITERS)
@pytest.mark.parametrize("shape", [(48, 80), (3, 24, 40)])
def test_writer_round_trip_is_exact(
    tmp_path: Path,
    name: str,
    options: WriteOptions,
    quant_dtype: str,
    dtype: torch.dtype,
    qmax: float,
    shape: tuple[int, ...],
) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    writer = writer_class(name)(options)
    spec = writer.spec_for(P, (shape[-2], shape[-1]), "linear")
    assert isinstance(spec, QuantSpec) and spec.granularity == "channel" and spec.act is not None
    assert spec.act.dynamic and spec.act.granularity == "token"
    q = quantize_rtn(w, spec, writer.scale_dtype(w.dtype)).validate(P)
    tensors = writer.encode(P, q)
    assert set(tensors) == {f"{P}.weight", f"{P}.scale"}
    # §7: scale = amax_row / qmax, F32 [N, 1]; int8 codes rounded to nearest.
    scale = tensors[f"{P}.scale"]
    expected_scale = (w.double().abs().amax(dim=-1, keepdim=True) / qmax).float()
    assert scale.dtype == torch.float32 and torch.equal(scale, expected_scale)
    codes = tensors[f"{P}.weight"]
    assert codes.dtype == dtype and codes.shape == w.shape
    if dtype == torch.int8:
        # Divided in float32 like the producers (float64 would move a few exact .5 ties).
        assert torch.equal(codes, torch.round(w.float() / scale).clamp(-128, 127).to(torch.int8))
    assert rel(codes.double() * scale.double(), w.double()) < (0.01 if dtype == torch.int8 else 0.1)
    skipped = "model.layers.0.mlp.gate"  # an MoE router: lmdeploy keeps it in float
    reason = writer.spec_for(skipped, (8, 48), "linear")
    assert isinstance(reason, str) and "router" in reason
    assert isinstance(writer.spec_for("lm_head", (1024, 48), "lm_head"), str)
    tensors[f"{skipped}.weight"] = torch.zeros(8, 48, dtype=torch.bfloat16)
    config = writer.quantization_config([skipped, "lm_head"])
    assert config == {
        "quant_method": "smooth_quant",
        "quant_dtype": quant_dtype,
        "modules_to_not_convert": [skipped],
    }
    ckpt = checkpoint(tmp_path, tensors, config)
    fmt = reader(ckpt)
    assert fmt.spec_for(skipped, "linear") is None
    got = load_layer(fmt, ckpt, P)
    assert got.spec == spec and got.shape == q.shape
    assert torch.equal(got.data.view(torch.uint8), q.data.view(torch.uint8)) and torch.equal(
        got.scale, q.scale
    )


def test_writer_config_without_skips_matches_lmdeploy(third_party: Path) -> None:
    writer = writer_class("lmdeploy-int8")(WriteOptions())
    writer.spec_for("lm_head", (1024, 256), "lm_head")
    expected = json.loads((third_party / FIXTURE / "config.json").read_text())["quantization_config"]
    assert writer.quantization_config(["lm_head"]) == expected


def test_writer_rejects_other_activation_schemes() -> None:
    with pytest.raises(UnsupportedError, match="int8-dynamic"):
        writer_class("lmdeploy-int8")(WriteOptions(act="int8-static"))
    with pytest.raises(UnsupportedError, match="fp8-dynamic"):
        writer_class("lmdeploy-fp8")(WriteOptions(act="int8-dynamic"))
    with pytest.raises(UnsupportedError, match="quant_dtype"):
        writer_class("lmdeploy-fp8")(WriteOptions(extra={"quant_dtype": "int8"}))
    grouped = quantize_rtn(torch.randn(8, 64), QuantSpec("int8", "group", group_size=32))
    with pytest.raises(UnsupportedError, match="channel"):
        writer_class("lmdeploy-int8")(WriteOptions()).encode(P, grouped)


# -- detection and errors --------------------------------------------------------------------------

I8, F32, F16 = torch.int8, torch.float32, torch.float16
INT8 = {"quant_method": "smooth_quant", "quant_dtype": "int8"}
FP8 = {"quant_method": "smooth_quant", "quant_dtype": "float8_e4m3fn"}

DETECTION: list[tuple[dict[str, Any], dict[str, tuple[torch.dtype, tuple[int, ...]]], str, Any]] = [
    (INT8, {"weight": (I8, (64, 32)), "scale": (F32, (64, 1))}, "linear", INT8_SPEC),
    (INT8, {"weight": (I8, (4, 64, 32)), "scale": (F32, (4, 64, 1))}, "experts", INT8_SPEC),
    (
        FP8,
        {"weight": (torch.float8_e4m3fn, (64, 32)), "scale": (F32, (64, 1))},
        "linear",
        QuantSpec("fp8_e4m3", "channel", act=ActQuant("fp8_e4m3", True, "token")),
    ),
    (
        {**FP8, "quant_dtype": "float8_e5m2"},
        {"weight": (torch.float8_e5m2, (64, 32)), "scale": (F32, (64, 1))},
        "linear",
        QuantSpec("fp8_e5m2", "channel", act=ActQuant("fp8_e5m2", True, "token")),
    ),
    (INT8, {"weight": (F16, (64, 32))}, "linear", None),
    (INT8, {"weight": (F16, (64, 32)), "scale": (F32, (0, 1))}, "linear", None),
    (INT8, {"scale": (F32, (64, 1))}, "lm_head", None),
    (INT8, {"weight": (F16, (64, 32)), "scale": (F32, (64, 1))}, "linear", (TensorError, "F16")),
    (INT8, {"weight": (I8, (64, 32))}, "linear", (TensorError, "scale")),
    (INT8, {"weight": (I8, (64, 32)), "scale": (F32, (64,))}, "linear", (TensorError, "[64, 1]")),
    (
        INT8,
        {"weight": (torch.float8_e4m3fn, (64, 32)), "scale": (F32, (64, 1))},
        "linear",
        (TensorError, "int8"),
    ),
    (FP8, {"weight": (I8, (64, 32)), "scale": (F32, (64, 1))}, "linear", (TensorError, "float8_e4m3fn")),
    (INT8, {"weight": (I8, (64, 32)), "scale": (F32, (64, 1))}, "embedding", (UnsupportedError, "embedding")),
]


@pytest.mark.parametrize(("config", "stored", "kind", "expected"), DETECTION)
def test_detection(
    tmp_path: Path, config: dict[str, Any], stored: dict[str, Any], kind: str, expected: Any
) -> None:
    check_detection(tmp_path, P, config, stored, kind, expected)


def test_config_variants(tmp_path: Path) -> None:
    tensors = {f"{P}.weight": torch.zeros(8, 8, dtype=I8), f"{P}.scale": torch.ones(8, 1)}
    with pytest.raises(QuantConfigError, match="quant_dtype"):
        reader(checkpoint(tmp_path / "a", tensors, {**INT8, "quant_dtype": "int4"}))
    with pytest.raises(QuantConfigError, match="modules_to_not_convert"):
        reader(checkpoint(tmp_path / "b", tensors, {**INT8, "modules_to_not_convert": "lora"}))
    legacy = reader(checkpoint(tmp_path / "c", tensors, {"quant_method": "smooth_quant"}))
    assert legacy.spec_for(P, "linear") == INT8_SPEC and any("int8" in n for n in legacy.notes)
    hinted = reader(checkpoint(tmp_path / "d", tensors, {**INT8, "modules_to_not_convert": ["up_proj"]}))
    assert hinted.spec_for(P, "linear") == INT8_SPEC and any(P in n for n in hinted.notes)


@pytest.mark.parametrize(
    ("suffix", "bad", "error", "text"),
    [
        ("scale", torch.tensor([[1.0]] * 7 + [[float("nan")]]), NumericsError, "NaN"),
        ("scale", torch.ones(8), TensorError, "[8, 1]"),
        ("scale", torch.ones(8, 1, dtype=torch.int32), TensorError, "dtype int32"),
        ("weight", torch.zeros(8, 16, dtype=torch.uint8), TensorError, "torch.int8"),
        ("weight", torch.zeros(8, dtype=torch.int8), TensorError, "[out, in]"),
    ],
)
def test_decode_rejects_bad_tensors(tmp_path: Path, suffix: str, bad: Tensor, error: type, text: str) -> None:
    tensors = {f"{P}.weight": torch.ones(8, 16, dtype=I8), f"{P}.scale": torch.ones(8, 1)}
    fmt = reader(checkpoint(tmp_path, tensors, INT8))
    spec = fmt.spec_for(P, "linear")
    assert spec is not None
    name = f"{P}.{suffix}"
    good = fmt.decode(P, spec, tensors)
    assert torch.equal(
        good.data.double() * good.scale.double().unsqueeze(-1), torch.ones(8, 16, dtype=torch.float64)
    )
    with pytest.raises(error) as info:
        fmt.decode(P, spec, {**tensors, name: bad})
    assert text in str(info.value) and name in str(info.value)
