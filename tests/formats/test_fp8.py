"""HF fine-grained FP8 (block and per-tensor) and fbgemm_fp8: readers, writers, detection, errors.

Oracles: transformers 5.23's own FP8 quantizer and dequantizers (formats.md §12.6), a float64
dequantizer written here from formats.md §5/§6, and transformers' pure-PyTorch per-row FP8
quantizer for the fbgemm row-wise formula.
"""

from __future__ import annotations

import math
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from anyquant.errors import NumericsError, QuantConfigError, TensorError, UnsupportedError
from anyquant.quant.algorithms.rtn import quantize_rtn
from anyquant.quant.formats.base import FormatWriter, QuantFormat, WriteOptions
from anyquant.quant.registry import writer_class
from anyquant.quant.spec import ActQuant, QuantSpec
from tests.helpers.format_checkpoints import check_detection, checkpoint, load_layer, reader

P = "model.layers.0.mlp.down_proj"
E4M3 = torch.float8_e4m3fn


# -- helpers ------------------------------------------------------------------------------------


def dense64(codes: Tensor, scale: Tensor, block: tuple[int, int]) -> Tensor:
    """formats.md §5.1: W[n, k] = float(weight[n, k]) * scale[n // bn, k // bk], in float64."""
    n, k = codes.shape[-2:]
    rows, cols = torch.arange(n) // block[0], torch.arange(k) // block[1]
    return codes.double() * scale.double()[..., rows, :][..., cols]


def block_amax_over_448(w: Tensor, block: tuple[int, int]) -> Tensor:
    """Expected weight_scale_inv: amax(|W|) of every (possibly ragged) block / 448, float64 -> f32."""
    n, k = w.shape
    bn, bk = block
    out = torch.empty(math.ceil(n / bn), math.ceil(k / bk), dtype=torch.float64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk].double().abs().max() / 448.0
    return out.float()


def random_fp8(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return (torch.randn(shape, generator=gen) * 100).clamp(-448, 448).to(E4M3)


def same_bits(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def write_with(
    name: str, w: Tensor, options: WriteOptions, prefix: str = P
) -> tuple[FormatWriter, dict[str, Tensor]]:
    writer = writer_class(name)(options)
    spec = writer.spec_for(prefix, (w.shape[-2], w.shape[-1]), "linear")
    assert isinstance(spec, QuantSpec), spec
    q = quantize_rtn(w, spec, writer.scale_dtype(w.dtype))
    if spec.act is not None and not spec.act.dynamic:
        q.input_scale = writer.input_scale(prefix)
    return writer, writer.encode(prefix, q.validate(prefix))


def transformers_fp8(scale_fmt: str = "float") -> types.SimpleNamespace:
    """transformers 5.23's FP8 quantize / dequantize ops, driven on CPU without a model."""
    fg = pytest.importorskip("transformers.integrations.finegrained_fp8")
    from transformers.utils.quantization_config import FineGrainedFP8Config

    try:
        hf_quantizer = types.SimpleNamespace(
            quantization_config=FineGrainedFP8Config(weight_block_size=(128, 128), scale_fmt=scale_fmt)
        )
        quantize, dequantize = fg.Fp8Quantize(hf_quantizer), fg.Fp8Dequantize(hf_quantizer)
    except Exception as exc:  # a future transformers may change these internals
        pytest.skip(f"transformers' FP8 ops are not usable here: {exc}")
    return types.SimpleNamespace(
        quantize=quantize, dequantize=dequantize, dequantize_ragged=fg._dequantize_fp8_weight
    )


BLOCK_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


# -- block FP8 against transformers (formats.md §12.6) -----------------------------------------------


def test_block_writer_matches_transformers_quantizer() -> None:
    hf = transformers_fp8()
    w = (torch.randn(256, 384, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    theirs = hf.quantize.convert({f"{P}.weight": w})
    _, ours = write_with("fp8-block", w, WriteOptions())
    assert set(ours) == set(theirs) == {f"{P}.weight", f"{P}.weight_scale_inv"}
    s_ours, s_theirs = ours[f"{P}.weight_scale_inv"], theirs[f"{P}.weight_scale_inv"]
    assert s_ours.dtype == s_theirs.dtype == torch.float32 and s_ours.shape == s_theirs.shape == (2, 3)
    # Ours is amax/448 exactly (the spec's formula); transformers computes 1 / (448 / amax), which
    # lands within one float32 ulp of it.
    assert torch.equal(s_ours, block_amax_over_448(w, (128, 128)))
    assert torch.all((s_ours - s_theirs).abs() <= torch.finfo(torch.float32).eps * s_ours)
    # Codes: that ulp (and transformers' multiply-by-reciprocal) moves a few codes across a
    # rounding boundary, always to the neighbouring fp8 value.
    q_ours, q_theirs = ours[f"{P}.weight"], theirs[f"{P}.weight"]
    assert q_ours.dtype == q_theirs.dtype == E4M3
    differ = q_ours.view(torch.uint8) != q_theirs.view(torch.uint8)
    assert int(differ.sum()) <= q_ours.numel() // 1000
    steps = q_ours.view(torch.uint8)[differ].int() - q_theirs.view(torch.uint8)[differ].int()
    assert bool((steps.abs() == 1).all())


def test_decode_of_transformers_block_output_equals_their_dequantizer(tmp_path: Path) -> None:
    hf = transformers_fp8()
    w = (torch.randn(256, 384, generator=torch.Generator().manual_seed(1)) * 0.05).to(torch.bfloat16)
    tensors = hf.quantize.convert({f"{P}.weight": w})
    ckpt = checkpoint(tmp_path, tensors, BLOCK_CONFIG)
    fmt = reader(ckpt)
    got = load_layer(fmt, ckpt, P)
    assert got.spec == QuantSpec(
        "fp8_e4m3", "block", block_shape=(128, 128), act=ActQuant("fp8_e4m3", True, "group", group_size=128)
    )
    assert same_bits(got.data, tensors[f"{P}.weight"]) and torch.equal(
        got.scale, tensors[f"{P}.weight_scale_inv"]
    )
    theirs = hf.dequantize._dequantize_one(
        tensors[f"{P}.weight"], tensors[f"{P}.weight_scale_inv"], torch.float32
    )
    assert torch.equal(dense64(got.data, got.scale, (128, 128)).float(), theirs)


def test_ragged_blocks_576x200(tmp_path: Path) -> None:
    hf = transformers_fp8()
    w = (torch.randn(576, 200, generator=torch.Generator().manual_seed(2)) * 0.1).to(torch.bfloat16)
    writer, tensors = write_with("fp8-block", w, WriteOptions())
    scale = tensors[f"{P}.weight_scale_inv"]
    assert scale.shape == (5, 2) and torch.equal(scale, block_amax_over_448(w, (128, 128)))
    ckpt = checkpoint(tmp_path, tensors, writer.quantization_config([]))
    got = load_layer(reader(ckpt), ckpt, P)
    assert same_bits(got.data, tensors[f"{P}.weight"]) and torch.equal(got.scale, scale)
    expected = dense64(got.data, got.scale, (128, 128))
    theirs = hf.dequantize_ragged(tensors[f"{P}.weight"].clone(), scale, [128, 128], torch.float32)
    assert torch.equal(expected.float(), theirs)
    # The weight is reproduced to fp8 precision (3 mantissa bits: relative step 2^-3 at worst).
    assert float((expected - w.double()).abs().max()) <= float(w.double().abs().max()) / 16


def test_ue8m0_scales_as_e8m0_and_as_u8_bytes(tmp_path: Path) -> None:
    hf = transformers_fp8("ue8m0")
    w = (torch.randn(256, 256, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    tensors = hf.quantize.convert({f"{P}.weight": w})
    e8m0 = tensors[f"{P}.weight_scale_inv"]
    assert e8m0.dtype == torch.float8_e8m0fnu
    exponents = e8m0.view(torch.uint8)
    expected_scale = torch.tensor(
        [[math.ldexp(1.0, int(e) - 127) for e in row] for row in exponents.tolist()]
    )
    theirs = hf.dequantize._dequantize_one(tensors[f"{P}.weight"], exponents, torch.float32)
    for stored_scale in (e8m0, exponents):  # F8_E8M0 and raw U8 exponent bytes
        config = {**BLOCK_CONFIG, "scale_fmt": "ue8m0"}
        ckpt = checkpoint(
            tmp_path / str(stored_scale.dtype), {**tensors, f"{P}.weight_scale_inv": stored_scale}, config
        )
        got = load_layer(reader(ckpt), ckpt, P)
        assert dict(got.spec.extra)["scale_fmt"] == "ue8m0"
        assert got.scale.dtype == torch.float32 and torch.equal(got.scale, expected_scale)
        assert torch.equal(dense64(got.data, got.scale, (128, 128)).float(), theirs)


# -- per-tensor FP8 ------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_name", ["weight_scale", "weight_scale_inv"])
@pytest.mark.parametrize("scale_shape", [(), (1,)])
@pytest.mark.parametrize("input_name", [None, "input_scale", "activation_scale"])
def test_per_tensor_names_and_scalar_shapes(
    tmp_path: Path, scale_name: str, scale_shape: tuple[int, ...], input_name: str | None
) -> None:
    gen = torch.Generator().manual_seed(4)
    codes = random_fp8((48, 80), gen)
    tensors = {f"{P}.weight": codes, f"{P}.{scale_name}": torch.full(scale_shape, 0.0123)}
    if input_name:
        tensors[f"{P}.{input_name}"] = torch.full(scale_shape, 0.75)
    config = {"quant_method": "fp8", "activation_scheme": "static" if input_name else "dynamic"}
    ckpt = checkpoint(tmp_path, tensors, config)
    got = load_layer(reader(ckpt), ckpt, P)
    assert got.spec == QuantSpec("fp8_e4m3", "tensor", act=ActQuant("fp8_e4m3", input_name is None, "tensor"))
    assert got.scale.shape == () and got.scale.dtype == torch.float32
    assert torch.equal(
        dense64(got.data, got.scale.reshape(1, 1), (48, 80)), codes.double() * float(torch.tensor(0.0123))
    )
    if input_name:
        assert got.input_scale is not None and got.input_scale.shape == () and float(got.input_scale) == 0.75
    else:
        assert got.input_scale is None


def test_block_config_with_static_activation_scale(tmp_path: Path) -> None:
    codes = random_fp8((130, 64), torch.Generator().manual_seed(5))
    tensors = {
        f"{P}.weight": codes,
        f"{P}.weight_scale_inv": torch.tensor([[0.5], [0.25]]),
        f"{P}.activation_scale": torch.tensor(0.125),
    }
    ckpt = checkpoint(tmp_path, tensors, {**BLOCK_CONFIG, "activation_scheme": "static"})
    got = load_layer(reader(ckpt), ckpt, P)
    assert got.spec.act == ActQuant("fp8_e4m3", dynamic=False, granularity="tensor")
    assert got.input_scale is not None and float(got.input_scale) == 0.125
    expected = codes.double() * torch.cat([torch.full((128, 1), 0.5), torch.full((2, 1), 0.25)]).double()
    assert torch.equal(dense64(got.data, got.scale, (128, 128)), expected)


# -- fbgemm_fp8 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_fbgemm_decode_per_row(tmp_path: Path, scale_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(6)
    codes = random_fp8((40, 72), gen)
    scale = (torch.rand(40, 1, generator=gen) + 0.01).to(scale_dtype)
    config = {
        "quant_method": "fbgemm_fp8",
        "activation_scale_ub": 1200.0,
        "modules_to_not_convert": ["lm_head"],
    }
    ckpt = checkpoint(tmp_path, {f"{P}.weight": codes, f"{P}.weight_scale": scale}, config)
    fmt = reader(ckpt)
    got = load_layer(fmt, ckpt, P)
    assert got.spec == QuantSpec(
        "fp8_e4m3", "channel", act=ActQuant("fp8_e4m3", dynamic=True, granularity="token")
    )
    assert dict(got.spec.extra)["activation_scale_ub"] == "1200"
    assert getattr(fmt, "activation_scale_ub", None) == 1200.0
    # formats.md §6: W[n, k] = float(weight[n, k]) * weight_scale[n, 0]
    assert torch.equal(codes.double() * scale.double(), dense64(got.data, got.scale.unsqueeze(-1), (1, 72)))


def test_fbgemm_writer_matches_per_row_reference() -> None:
    ct = pytest.importorskip("transformers.integrations.compressed_tensors")
    per_row = getattr(ct, "quantize_fp8_per_row", None)
    if per_row is None:
        pytest.skip("transformers has no pure-PyTorch quantize_fp8_per_row")
    w = (torch.randn(96, 160, generator=torch.Generator().manual_seed(7)) * 0.03).to(torch.bfloat16)
    w[5] = 0  # an all-zero row: any positive scale reproduces it (theirs 1/448, ours 1)
    codes, scales = per_row(w)
    _, ours = write_with("fbgemm-fp8", w, WriteOptions())
    assert same_bits(ours[f"{P}.weight"], codes)
    assert not bool(codes[5].float().any())
    mine = ours[f"{P}.weight_scale"]
    nonzero = torch.arange(96) != 5
    assert mine.shape == (96, 1) and torch.equal(mine[nonzero], scales.reshape(96, 1)[nonzero])
    assert float(mine[5]) > 0


# -- writer round trips ---------------------------------------------------------------------------

ROUND_TRIPS = [
    ("fp8-block", WriteOptions(), (200, 96), "modules_to_not_convert"),
    ("fp8-block", WriteOptions(block_size=(64, 32)), (3, 100, 70), "modules_to_not_convert"),
    ("fp8", WriteOptions(), (64, 48), "ignored_layers"),
    ("fp8", WriteOptions(act="fp8-static", extra={"act_amax": {P: 3.5}}), (64, 48), "ignored_layers"),
    ("fp8", WriteOptions(), (2, 64, 48), "ignored_layers"),
    ("fbgemm-fp8", WriteOptions(extra={"activation_scale_ub": 800.0}), (72, 40), "modules_to_not_convert"),
]


@pytest.mark.parametrize(("name", "options", "shape", "skip_key"), ROUND_TRIPS)
def test_writer_round_trip_is_exact(
    tmp_path: Path, name: str, options: WriteOptions, shape: tuple[int, ...], skip_key: str
) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    writer = writer_class(name)(options)
    spec = writer.spec_for(P, (shape[-2], shape[-1]), "linear")
    assert isinstance(spec, QuantSpec)
    q = quantize_rtn(w, spec, writer.scale_dtype(w.dtype))
    if spec.act is not None and not spec.act.dynamic:
        q.input_scale = writer.input_scale(P)
        assert q.input_scale is not None and float(q.input_scale) == 3.5 / 448
    tensors = writer.encode(P, q.validate(P))
    skipped = "model.layers.0.mlp.gate_proj"
    tensors[f"{skipped}.weight"] = torch.zeros(8, 8, dtype=torch.bfloat16)
    config = writer.quantization_config([skipped])
    assert config[skip_key] == [skipped]
    ckpt = checkpoint(tmp_path, tensors, config)
    fmt = reader(ckpt)
    assert fmt.spec_for(skipped, "linear") is None
    got = load_layer(fmt, ckpt, P)
    assert got.spec == spec and got.shape == q.shape
    assert same_bits(got.data, q.data) and torch.equal(got.scale, q.scale)
    assert (got.input_scale is None) == (q.input_scale is None)
    if q.input_scale is not None:
        assert got.input_scale is not None and torch.equal(got.input_scale, q.input_scale)


def test_block_writer_config_is_transformers_descriptor() -> None:
    writer = writer_class("fp8-block")(WriteOptions())
    assert writer.quantization_config([]) == BLOCK_CONFIG
    assert isinstance(writer.spec_for("model.embed_tokens", (10, 8), "embedding"), str)
    assert writer_class("fp8")(WriteOptions(act="fp8-static")).input_scale(P) is None  # no calibration data


# -- detection ------------------------------------------------------------------------------------

F8, F32, BF16 = E4M3, torch.float32, torch.bfloat16
PER_TENSOR = {"quant_method": "fp8", "activation_scheme": "dynamic"}
STATIC = {"quant_method": "fp8", "activation_scheme": "static"}
FBGEMM = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}
DYN_GROUP = ActQuant("fp8_e4m3", True, "group", group_size=128)
BLOCK_SPEC = QuantSpec("fp8_e4m3", "block", block_shape=(128, 128), act=DYN_GROUP)
TENSOR_DYN = QuantSpec("fp8_e4m3", "tensor", act=ActQuant("fp8_e4m3", True, "tensor"))
TENSOR_STATIC = QuantSpec("fp8_e4m3", "tensor", act=ActQuant("fp8_e4m3", False, "tensor"))

# (config, {suffix: (dtype, shape)}, kind, expected spec / None / (error, text in message))
DETECTION: list[tuple[dict[str, Any], dict[str, tuple[torch.dtype, tuple[int, ...]]], str, Any]] = [
    (BLOCK_CONFIG, {"weight": (F8, (256, 384)), "weight_scale_inv": (F32, (2, 3))}, "linear", BLOCK_SPEC),
    (BLOCK_CONFIG, {"weight": (F8, (256, 384)), "weight_scale_inv": (BF16, (2, 3))}, "lm_head", BLOCK_SPEC),
    (
        BLOCK_CONFIG,
        {"weight": (F8, (4, 256, 128)), "weight_scale_inv": (F32, (4, 2, 1))},
        "experts",
        BLOCK_SPEC,
    ),
    (BLOCK_CONFIG, {"weight": (BF16, (256, 384))}, "linear", None),
    (BLOCK_CONFIG, {"weight": (BF16, (256, 384)), "weight_scale_inv": (F32, (0,))}, "linear", None),
    (BLOCK_CONFIG, {"weight_scale_inv": (F32, (2, 3))}, "lm_head", None),  # tied: no weight of its own
    (
        BLOCK_CONFIG,
        {"weight": (F8, (256, 384)), "weight_scale_inv": (F32, (0, 3))},
        "linear",
        (TensorError, "without"),
    ),
    (
        BLOCK_CONFIG,
        {"weight": (F8, (256, 384)), "weight_scale_inv": (F32, (2, 2))},
        "linear",
        (TensorError, "[2, 3]"),
    ),
    (
        BLOCK_CONFIG,
        {"weight": (BF16, (256, 384)), "weight_scale_inv": (F32, (2, 3))},
        "linear",
        (TensorError, "BF16"),
    ),
    (
        BLOCK_CONFIG,
        {"weight": (torch.float8_e5m2, (256, 384)), "weight_scale_inv": (F32, (2, 3))},
        "linear",
        (TensorError, "F8_E5M2"),
    ),
    (
        BLOCK_CONFIG,
        {"weight": (F8, (256, 384)), "weight_scale_inv": (F32, (2, 3)), "weight_scale": (F32, ())},
        "linear",
        (TensorError, "both"),
    ),
    (
        BLOCK_CONFIG,
        {"weight": (F8, (256, 384)), "weight_scale_inv": (F32, (2, 3))},
        "embedding",
        (UnsupportedError, "embedding"),
    ),
    (PER_TENSOR, {"weight": (F8, (64, 32)), "weight_scale": (F32, ())}, "linear", TENSOR_DYN),
    (
        PER_TENSOR,
        {"weight": (F8, (64, 32)), "weight_scale_inv": (F32, (1,)), "input_scale": (F32, ())},
        "linear",
        TENSOR_DYN,
    ),
    (
        PER_TENSOR,
        {"weight": (F8, (64, 32)), "weight_scale": (F32, (64, 1))},
        "linear",
        (TensorError, "per-tensor"),
    ),
    (
        STATIC,
        {"weight": (F8, (64, 32)), "weight_scale": (F32, (1,)), "input_scale": (F32, (1,))},
        "linear",
        TENSOR_STATIC,
    ),
    (
        STATIC,
        {"weight": (F8, (64, 32)), "weight_scale": (F32, ())},
        "linear",
        (TensorError, "activation_scale"),
    ),
    (
        FBGEMM,
        {"weight": (F8, (64, 32)), "weight_scale": (F32, (64, 1))},
        "linear",
        QuantSpec("fp8_e4m3", "channel", act=ActQuant("fp8_e4m3", True, "token")),
    ),
    (FBGEMM, {"weight": (F8, (64, 32)), "weight_scale": (F32, (64,))}, "linear", (TensorError, "[64, 1]")),
    (FBGEMM, {"weight": (BF16, (64, 32))}, "linear", None),
    (
        FBGEMM,
        {"weight": (F8, (2, 64, 32)), "weight_scale": (F32, (2, 64, 1))},
        "experts",
        (UnsupportedError, "Llama-4"),
    ),
]


@pytest.mark.parametrize(("config", "stored", "kind", "expected"), DETECTION)
def test_detection(
    tmp_path: Path, config: dict[str, Any], stored: dict[str, Any], kind: str, expected: Any
) -> None:
    check_detection(tmp_path, P, config, stored, kind, expected)


def test_skip_list_is_only_a_hint(tmp_path: Path) -> None:
    tensors = {f"{P}.weight": torch.zeros(64, 32, dtype=F8), f"{P}.weight_scale_inv": torch.ones(1, 1)}
    config = {**BLOCK_CONFIG, "modules_to_not_convert": ["mlp.down_proj"]}
    fmt = reader(checkpoint(tmp_path, tensors, config))
    assert fmt.spec_for(P, "linear") == BLOCK_SPEC
    assert any(P in note and "modules_to_not_convert" in note for note in fmt.notes)


def test_kv_cache_scales_are_ignored_tensors(tmp_path: Path) -> None:
    fmt = reader(checkpoint(tmp_path, {"x.weight": torch.zeros(2, 2)}, PER_TENSOR))
    ignored = fmt.ignored_tensor  # type: ignore[attr-defined]
    for suffix in ("k_scale", "v_scale", "kv_scale"):
        assert ignored(f"model.layers.0.self_attn.{suffix}")
    assert not ignored(f"{P}.weight_scale") and not ignored(f"{P}.input_scale")


# -- rejected configurations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({**BLOCK_CONFIG, "fmt": "e5m2"}, "fmt"),
        ({**BLOCK_CONFIG, "fmt": "int4"}, "fmt"),
        ({**BLOCK_CONFIG, "weight_block_size": [128]}, "weight_block_size"),
        ({**BLOCK_CONFIG, "weight_block_size": [0, 128]}, "weight_block_size"),
        ({**BLOCK_CONFIG, "weight_block_size": "128x128"}, "weight_block_size"),
        ({**BLOCK_CONFIG, "activation_scheme": "per-token"}, "activation_scheme"),
        ({**BLOCK_CONFIG, "scale_fmt": "mx"}, "scale_fmt"),
        ({**BLOCK_CONFIG, "expert_dtype": "fp4"}, "expert_dtype"),
        ({**BLOCK_CONFIG, "modules_to_not_convert": "lm_head"}, "modules_to_not_convert"),
        ({**FBGEMM, "activation_scale_ub": -1.0}, "activation_scale_ub"),
        ({**FBGEMM, "activation_scale_ub": "big"}, "activation_scale_ub"),
    ],
)
def test_rejected_configs(tmp_path: Path, config: dict[str, Any], field: str) -> None:
    ckpt = checkpoint(tmp_path, {"x.weight": torch.zeros(2, 2)}, config)
    with pytest.raises(QuantConfigError, match=field):
        reader(ckpt)


def test_rejected_writer_options() -> None:
    with pytest.raises(UnsupportedError, match="int8-dynamic"):
        writer_class("fp8-block")(WriteOptions(act="int8-dynamic"))
    with pytest.raises(UnsupportedError, match="fp8-static"):
        writer_class("fbgemm-fp8")(WriteOptions(act="fp8-static"))
    with pytest.raises(QuantConfigError, match="block size"):
        writer_class("fp8-block")(WriteOptions(block_size=(0, 128)))
    with pytest.raises(UnsupportedError, match="activation_scale_ub"):
        writer_class("fbgemm-fp8")(WriteOptions(extra={"activation_scale_ub": 0}))
    wrong = quantize_rtn(torch.randn(16, 16), QuantSpec("fp8_e4m3", "tensor"))
    with pytest.raises(UnsupportedError, match="block"):
        writer_class("fp8-block")(WriteOptions()).encode(P, wrong)


# -- bad tensors at decode -----------------------------------------------------------------------


def _block_layer(tmp_path: Path) -> tuple[QuantFormat, QuantSpec, dict[str, Tensor]]:
    tensors = {
        f"{P}.weight": random_fp8((130, 64), torch.Generator().manual_seed(9)),
        f"{P}.weight_scale_inv": torch.ones(2, 1),
    }
    fmt = reader(checkpoint(tmp_path, tensors, BLOCK_CONFIG))
    spec = fmt.spec_for(P, "linear")
    assert spec is not None
    return fmt, spec, tensors


@pytest.mark.parametrize(
    ("suffix", "bad", "error", "text"),
    [
        ("weight_scale_inv", torch.tensor([[1.0], [float("nan")]]), NumericsError, "NaN"),
        ("weight_scale_inv", torch.tensor([[1.0], [float("inf")]]), NumericsError, "NaN or Inf"),
        (
            "weight_scale_inv",
            torch.tensor([[255], [127]], dtype=torch.uint8),
            NumericsError,
            "NaN",
        ),  # e8m0 NaN byte
        ("weight_scale_inv", torch.ones(1, 2), TensorError, "[2, 1]"),
        ("weight_scale_inv", torch.ones(2, 1, dtype=torch.int32), TensorError, "dtype int32"),
        ("weight", torch.zeros(130, 64, dtype=torch.int8), TensorError, "float8_e4m3fn"),
        ("weight", torch.full((130, 64), float("nan")).to(E4M3), NumericsError, "NaN"),
    ],
)
def test_decode_rejects_bad_tensors(tmp_path: Path, suffix: str, bad: Tensor, error: type, text: str) -> None:
    fmt, spec, tensors = _block_layer(tmp_path)
    name = f"{P}.{suffix}"
    with pytest.raises(error) as info:
        fmt.decode(P, spec, {**tensors, name: bad})
    assert text in str(info.value) and name in str(info.value)


def test_decode_names_missing_tensor(tmp_path: Path) -> None:
    fmt, spec, tensors = _block_layer(tmp_path)
    with pytest.raises(TensorError, match="weight_scale_inv"):
        fmt.decode(P, spec, {f"{P}.weight": tensors[f"{P}.weight"]})


def test_fbgemm_decode_rejects_bad_scale(tmp_path: Path) -> None:
    codes = random_fp8((8, 16), torch.Generator().manual_seed(10))
    tensors = {f"{P}.weight": codes, f"{P}.weight_scale": torch.ones(8, 1)}
    fmt = reader(checkpoint(tmp_path, tensors, FBGEMM))
    spec = fmt.spec_for(P, "linear")
    assert spec is not None
    name = f"{P}.weight_scale"
    with pytest.raises(NumericsError, match=name.replace(".", r"\.")):
        fmt.decode(P, spec, {**tensors, name: torch.full((8, 1), float("nan"))})
    with pytest.raises(TensorError, match=r"\[8, 1\]"):
        fmt.decode(P, spec, {**tensors, name: torch.ones(8)})
