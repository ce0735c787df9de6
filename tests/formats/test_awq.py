"""AWQ reader and writers against formats.md §2 and §12, independent dequantizers and real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from anyquant.errors import NumericsError, QuantConfigError, TensorError, UnsupportedError
from anyquant.loading.checkpoint import Checkpoint
from anyquant.quant.algorithms.rtn import quantize_rtn
from anyquant.quant.formats.awq import AwqFormat, AwqGemmWriter, AwqGemvWriter
from anyquant.quant.formats.base import WriteOptions
from anyquant.quant.registry import format_class, writer_class
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight
from tests.helpers import quant_weights
from tests.helpers.spec_vectors import (
    checksums,
    hcode,
    index_of,
    index_of_shapes,
    scale,
    word_rows,
    zero_awq,
)

AWQ_CFG = {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4, "version": "gemm"}
P = "model.layers.0.mlp.down_proj"
POS = [0, 4, 1, 5, 2, 6, 3, 7]  # formats.md §0.2 b: logical column n sits in field POS[n % 8]


# -- independent float64 dequantizers of the packed tensors (formats.md §2.2, §2.3) --------------
def _u32(t: Tensor) -> Tensor:
    return t.to(torch.int64) & 0xFFFFFFFF


def gemm_fields(packed: Tensor) -> Tensor:
    """[R, N/8] int32 interleaved words -> [R, N] nibble values."""
    n = torch.arange(packed.shape[1] * 8)
    shift = 4 * torch.tensor(POS)[n % 8]
    return (_u32(packed)[:, n // 8] >> shift) & 0xF


def dequant_gemm(qweight: Tensor, qzeros: Tensor, scales: Tensor, group: int) -> Tensor:
    codes = gemm_fields(qweight)  # [K, N]
    zeros = gemm_fields(qzeros)  # [ng, N]
    g = torch.arange(codes.shape[0]) // group
    return ((codes - zeros[g]).double() * scales.double()[g]).T  # [N, K]


def seq_fields(packed: Tensor, count: int) -> Tensor:
    """[R, W] int32 words, 8 sequential nibbles per word along the last dim -> [R, count]."""
    j = torch.arange(count)
    return (_u32(packed)[:, j // 8] >> (4 * (j % 8))) & 0xF


def dequant_gemv(qweight: Tensor, qzeros: Tensor, scales: Tensor, group: int) -> Tensor:
    k = qweight.shape[1] * 8
    codes = seq_fields(qweight, k)  # [N, K]
    g = torch.arange(k) // group
    zeros = seq_fields(qzeros, int(g.max()) + 1)  # [N, ng]
    return (codes - zeros[:, g]).double() * scales.double()[:, g]


def canonical_dense(w: QuantWeight) -> Tensor:
    """float64 (code - zero) * scale straight from the canonical fields (no anyquant math)."""
    n, k = w.shape
    group = w.spec.group_size if w.spec.granularity == "group" else k
    g = torch.arange(k) // group
    sc = w.scale.reshape(n, -1).double()
    zero = w.zero.reshape(n, -1) if w.zero is not None else torch.full(sc.shape, 8)
    return (w.data.to(torch.int64) - zero[:, g]).double() * sc[:, g]


def layer_tensors(prefix: str, **tensors: Tensor) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def fmt(cfg: dict, tensors: dict[str, Tensor] | None = None) -> AwqFormat:
    f = AwqFormat.from_checkpoint(cfg, index_of(tensors or {}), "test")
    assert isinstance(f, AwqFormat)
    return f


# -- §12.1 AWQ-GEMM ------------------------------------------------------------------------------
GEMM_QWEIGHT = [
    [0x3D628715, 0x53D937F0, 0xCC2240F0, 0xBC4277F1],
    [0x91EF6241, 0x4EB53633, 0xE7B299B0, 0x32D2C0DC],
    [0x7D53658D, 0x79ED8C1C, 0x39939717, 0x269D7211],
    [0xE39ABEE1, 0xE22A6BF8, 0xD1781C78, 0x9447DB1B],
    [0xBAAEA890, 0xA2ED75B3, 0x214800DF, 0xEAA753D5],
    [0xE0FA8258, 0xCD9AE49D, 0x95AF1D5F, 0x8C69D497],
    [0xD9DE4D86, 0xA3791359, 0xFC392324, 0xD14FC732],
    [0x202E6123, 0x769C92F4, 0x2653FA59, 0x77208E23],
    [0x65D7F5A7, 0x884B747B, 0x3276C6DA, 0xC34903B4],
    [0x2EC3F5A7, 0x648FDE08, 0x74FC6E7F, 0xAD900611],
    [0xD3384722, 0x6445F059, 0x16795929, 0x6396EB34],
    [0x8F5AF402, 0x8B44C3D5, 0x796BA062, 0x0FB74C8B],
    [0x52A4C528, 0xFE1D3487, 0x83E453E6, 0xE619B9C1],
    [0x3A63FBB8, 0x3213D2E4, 0xED0B08CE, 0x07E4943A],
    [0x9A52A46C, 0x85D96890, 0x9BF504F4, 0xB49D8AA9],
    [0x3E9F53D2, 0x5D4BDB22, 0x6E9EC557, 0xB96D2D3B],
]
GEMM_QZEROS = [
    [0x39F5E4A0, 0xB17D6C28, 0x39F5E4A0, 0xB17D6C28],
    [0xA06C5B17, 0x28E4D39F, 0xA06C5B17, 0x28E4D39F],
]
GEMM_ROW0 = [0.15625, 0.03125, 0.40625, 0.03125, 0.0, 0.25, 0.1875, 0.09375, 0.0, 0.0, -0.625, -0.625,
             0.125, 0.125, 0.625, -0.625]  # fmt: skip
GEMM_COL0 = [0.15625, -0.5625, -1.125, -0.5625, 0.65625, 0.625, -0.5625, 0.0, -1.5, -0.5, 0.8125, 1.3125,
             -0.78125, 0.1875, -0.09375, -1.125, 0.0, -0.1875, 1.09375, -2.03125, -0.375, 0.09375, -1.875,
             1.125, -0.4375, -2.40625, 2.03125, -0.28125, -0.15625, 2.0625, 0.125, 0.0]  # fmt: skip


def gemm_vector(scale_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    scales = torch.tensor([[scale(n, g) for n in range(32)] for g in range(2)], dtype=scale_dtype)
    return layer_tensors(P, qweight=word_rows(GEMM_QWEIGHT), qzeros=word_rows(GEMM_QZEROS), scales=scales)


def generator_weight(n: int, k: int, group: int, zero_fn) -> QuantWeight:  # type: ignore[no-untyped-def]
    ng = k // group
    codes = torch.tensor([[hcode(i, j, 15) for j in range(k)] for i in range(n)], dtype=torch.uint8)
    scales = torch.tensor([[scale(i, g) for g in range(ng)] for i in range(n)], dtype=torch.float32)
    zeros = torch.tensor([[zero_fn(i, g) for g in range(ng)] for i in range(n)], dtype=torch.int32)
    spec = QuantSpec("uint4", "group", group_size=group, has_zero=True)
    return QuantWeight(spec, (n, k), codes, scales, zeros).validate("generator")


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])  # AutoAWQ F16, lmdeploy BF16
def test_gemm_vector_decodes_exactly(scale_dtype: torch.dtype) -> None:
    tensors = gemm_vector(scale_dtype)
    f = fmt({**AWQ_CFG, "group_size": 8}, tensors)
    spec = f.spec_for(P, "linear")
    assert spec == QuantSpec("uint4", "group", group_size=8, has_zero=True)
    w = f.decode(P, spec, tensors)
    assert w.shape == (32, 16)
    assert w.data[:, 0].tolist()[:8] == [0x5, 0x2, 0x1, 0x6, 0x7, 0xD, 0x8, 0x3]
    expected = generator_weight(32, 16, 8, zero_awq)
    assert torch.equal(w.data, expected.data) and torch.equal(w.zero, expected.zero)  # type: ignore[arg-type]
    dense = canonical_dense(w)
    assert dense[0].tolist() == GEMM_ROW0
    assert dense[:, 0].tolist() == GEMM_COL0
    assert checksums(dense) == (-22.09375, -949.625)
    # The test's own packed-tensor dequantizer agrees with the listed vector too.
    assert torch.equal(
        dequant_gemm(tensors[f"{P}.qweight"], tensors[f"{P}.qzeros"], tensors[f"{P}.scales"], 8), dense
    )


def test_gemm_writer_reproduces_vector_words() -> None:
    writer = AwqGemmWriter(WriteOptions(bits=4, group_size=8))
    out = writer.encode(P, generator_weight(32, 16, 8, zero_awq))
    ref = gemm_vector()
    assert set(out) == set(ref)
    for name, t in ref.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name


# -- §12.2 AWQ-GEMV ------------------------------------------------------------------------------
GEMV_QWEIGHT = [
    [0x36801D15, 0x2C882277, 0x5C1C3989, 0x4D5327E3, 0xCFEF9A7E, 0x1DFCFDD0, 0x17010615, 0xD03DF6CC],
    [0xEEAEA3F2, 0xF234A837, 0x0E6D9416, 0xA52A24E6, 0x55A5136F, 0x7C2183B6, 0xBFB0AFDD, 0xA9F8A124],
    [0x2859E841, 0xD6B202AA, 0x988DD119, 0xFB5822F7, 0x6EA6467B, 0x61F9A2E7, 0xA6A80E8D, 0x908A5EC4],
    [0x2DFA95E6, 0x956A53CD, 0x50404ADC, 0x8CD9C4A9, 0xCE3F3A89, 0x025569D3, 0xA0DFEFC7, 0xD5650D76],
    [0x1D28E527, 0x34B54755, 0x5FE2CBBC, 0xFC66EBAD, 0x698F45E6, 0xDC2B626D, 0xC9A0E367, 0x258C77F1],
    [0x090A3D1D, 0xEAA2F3E5, 0x4D927098, 0xB3D935F0, 0x28422820, 0x14D160EB, 0x2E54083B, 0xA1369255],
    [0x648AB668, 0x5AFCF4FF, 0xD6228DD8, 0x58DA82FB, 0xFEE92D6B, 0x3035B367, 0xEA025054, 0x206424CC],
    [0x2DEBE793, 0x39358D26, 0x792089E1, 0xD920C08A, 0x8B5B6934, 0x426A34EC, 0xD3DB8D76, 0x541F0E1C],
]
GEMV_ZEROS_WORD0 = [0x70, 0xC5, 0x1A, 0x6F, 0xB4, 0x09, 0x5E, 0xA3]


def gemv_vector() -> dict[str, Tensor]:
    qzeros = word_rows([[z, 0, 0, 0] for z in GEMV_ZEROS_WORD0])
    scales = torch.zeros(8, 32, dtype=torch.float16)
    for n in range(8):
        for g in range(2):
            scales[n, g] = scale(n, g)
    return layer_tensors(P, qweight=word_rows(GEMV_QWEIGHT), qzeros=qzeros, scales=scales)


def test_gemv_vector_decodes_exactly() -> None:
    tensors = gemv_vector()
    f = fmt({**AWQ_CFG, "group_size": 32, "version": "gemv"}, tensors)
    spec = f.spec_for(P, "linear")
    assert spec == QuantSpec("uint4", "group", group_size=32, has_zero=True)
    w = f.decode(P, spec, tensors)  # type: ignore[arg-type]
    expected = generator_weight(8, 64, 32, zero_awq)
    assert torch.equal(w.data, expected.data) and torch.equal(w.zero, expected.zero)  # type: ignore[arg-type]
    assert torch.equal(w.scale, expected.scale)
    dense = canonical_dense(w)
    assert checksums(dense) == (57.96875, 5037.9375)
    assert torch.equal(
        dequant_gemv(tensors[f"{P}.qweight"], tensors[f"{P}.qzeros"], tensors[f"{P}.scales"], 32), dense
    )


def test_gemv_writer_reproduces_vector_words() -> None:
    out = AwqGemvWriter(WriteOptions(bits=4, group_size=32)).encode(P, generator_weight(8, 64, 32, zero_awq))
    for name, t in gemv_vector().items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name


# -- random grid: writer -> reader -> independent dequantizer -------------------------------------
def random_weight(n: int, k: int, group: int, seed: int, sym: bool = False) -> QuantWeight:
    if group == -1:
        spec = QuantSpec("uint4", "channel", has_zero=not sym)
    else:
        spec = QuantSpec("uint4", "group", group_size=group, has_zero=not sym)
    return quant_weights.random_weight(spec, n, k, seed, f16_exact=True)  # AWQ stores F16 scales


@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("layout", ["gemm", "gemv"])
def test_random_encode_decode_matches_independent_dequant(group: int, layout: str) -> None:
    n, k = 40, 256  # N = 40: a multiple of 8 but not of 32 (lmdeploy-style, GEMM)
    original = random_weight(n, k, group, seed=group + 7 * len(layout))
    writer = writer_class("awq" if layout == "gemm" else "awq-gemv")(WriteOptions(bits=4, group_size=group))
    assert writer.spec_for(P, (n, k), "linear") == original.spec
    stored = writer.encode(P, original)
    assert stored[f"{P}.scales"].dtype == torch.float16
    cfg = writer.quantization_config([])
    f = format_class("awq").from_checkpoint(cfg, index_of(stored), "test")
    spec = f.spec_for(P, "linear")
    assert spec == original.spec
    decoded = f.decode(P, spec, stored)  # type: ignore[arg-type]
    assert torch.equal(decoded.data, original.data)
    assert torch.equal(decoded.zero, original.zero)  # type: ignore[arg-type]
    assert torch.equal(decoded.scale, original.scale)
    g = group if group != -1 else k
    dequant = dequant_gemm if layout == "gemm" else dequant_gemv
    packed = dequant(stored[f"{P}.qweight"], stored[f"{P}.qzeros"], stored[f"{P}.scales"], g)
    assert torch.equal(packed, canonical_dense(original))


def test_symmetric_weight_is_stored_with_explicit_zero_eight() -> None:
    original = random_weight(16, 64, 32, seed=3, sym=True)
    stored = AwqGemmWriter(WriteOptions(group_size=32)).encode(P, original)
    assert bool((gemm_fields(stored[f"{P}.qzeros"]) == 8).all())
    f = fmt({**AWQ_CFG, "group_size": 32}, stored)
    decoded = f.decode(P, f.spec_for(P, "linear"), stored)  # type: ignore[arg-type]
    assert torch.equal(canonical_dense(decoded), canonical_dense(original))


@pytest.mark.parametrize("group", [32, 128, -1])
def test_rtn_round_trip_is_exact(group: int) -> None:
    torch.manual_seed(0)
    dense = (torch.randn(64, 256) * 0.05).to(torch.bfloat16)
    writer = AwqGemmWriter(WriteOptions(group_size=group))
    spec = writer.spec_for(P, (64, 256), "linear")
    assert isinstance(spec, QuantSpec)
    q = quantize_rtn(dense, spec, scale_dtype=writer.scale_dtype(torch.bfloat16))
    stored = writer.encode(P, q)
    f = fmt(writer.quantization_config([]), stored)
    back = f.decode(P, spec, stored)
    assert torch.equal(back.data, q.data) and torch.equal(back.scale, q.scale)
    assert torch.equal(back.zero, q.zero)  # type: ignore[arg-type]


# -- writer behaviour -----------------------------------------------------------------------------
def test_writer_reasons_and_config() -> None:
    writer = AwqGemmWriter(WriteOptions(group_size=128))
    assert "multiple of 8" in str(writer.spec_for("a", (44, 256), "linear"))
    assert "group size 128" in str(writer.spec_for("b", (64, 200), "linear"))
    assert isinstance(writer.spec_for("lm_head", (1024, 256), "lm_head"), str)
    cfg = writer.quantization_config(["a", "b", "lm_head"])
    assert cfg == {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": 128,
        "bits": 4,
        "version": "gemm",
        "modules_to_not_convert": ["a", "b"],
    }
    assert writer.quantization_config(["lm_head"])["modules_to_not_convert"] is None
    assert writer.scale_dtype(torch.bfloat16) == torch.float16
    assert "group sizes 32, 64" in str(
        AwqGemvWriter(WriteOptions(group_size=16)).spec_for("c", (8, 64), "linear")
    )


@pytest.mark.parametrize(
    ("options", "needle"),
    [(WriteOptions(bits=8), "4-bit"), (WriteOptions(sym=True), "sym"), (WriteOptions(act_order=True), "act-order"),
     (WriteOptions(group_size=12), "group size 12")],
)  # fmt: skip
def test_writer_rejects_options(options: WriteOptions, needle: str) -> None:
    with pytest.raises(UnsupportedError, match=needle):
        AwqGemmWriter(options)


def test_writer_rejects_scales_that_overflow_float16() -> None:
    w = random_weight(8, 32, 32, seed=1)
    w.scale[0, 0] = 1e6
    with pytest.raises(NumericsError, match=r"down_proj\.scales"):
        AwqGemmWriter(WriteOptions(group_size=32)).encode(P, w)


# -- detection ------------------------------------------------------------------------------------
LINEARS = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
AWQ_DIR = "llama-awq-gemm-4bit-g128-autoawq"


def test_fixture_config_gives_uint4_g128_per_layer(third_party: Path) -> None:
    path = third_party / AWQ_DIR
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    index = Checkpoint(path).index
    f = format_class(qc["quant_method"]).from_checkpoint(qc, index, "config.json")
    want = QuantSpec("uint4", "group", group_size=128, has_zero=True)
    assert all(f.spec_for(p, "linear") == want for p in LINEARS)
    assert f.spec_for("lm_head", "lm_head") is None
    assert f.notes == []
    # The legacy AutoAWQ quant_config.json spelling of the same settings reads identically.
    legacy = {"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"}
    g = AwqFormat.from_checkpoint(legacy, index, "quant_config.json")
    assert all(g.spec_for(p, "linear") == want for p in LINEARS)
    # GPTQModel's AWQ export spells the layout `format` as well.
    h = AwqFormat.from_checkpoint(
        {"method": "awq", "format": "gemm", "bits": 4, "group_size": 128}, index, "x"
    )
    assert h.spec_for(LINEARS[0], "linear") == want


def gemm_index(prefix: str, n: int, k: int, ng: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {
        f"{prefix}.qweight": ("I32", (k, n // 8)),
        f"{prefix}.qzeros": ("I32", (ng, n // 8)),
        f"{prefix}.scales": ("F16", (ng, n)),
    }


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"version": "gemv_fast"}, "'version'"),
        ({"version": "marlin"}, "'version'"),
        ({"version": "GEMMX"}, "'version'"),
        ({"backend": "llm-awq"}, "'backend'"),
        ({"bits": 8}, "'bits'"),
        ({"bits": 4, "w_bit": 3}, "'bits'"),
        ({"group_size": 100}, "'group_size'"),
        ({"zero_point": "yes"}, "'zero_point'"),
        ({"modules_to_not_convert": "gate"}, "'modules_to_not_convert'"),
    ],
)
def test_unsupported_configs_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(QuantConfigError, match=field):
        AwqFormat.from_checkpoint({**AWQ_CFG, **change}, index_of({}), "cfg")


def test_zero_point_false_without_qzeros_is_refused() -> None:
    entries = gemm_index(P, 64, 128, 1)
    del entries[f"{P}.qzeros"]
    f = AwqFormat.from_checkpoint({**AWQ_CFG, "zero_point": False}, index_of_shapes(entries), "cfg")
    with pytest.raises(UnsupportedError, match="zero_point false"):
        f.spec_for(P, "linear")


def test_tensor_presence_wins_over_skip_list() -> None:
    gate, gate_proj, up = (
        "model.layers.0.mlp.gate",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
    )
    entries = {**gemm_index(gate_proj, 64, 128, 1), f"{gate}.weight": ("BF16", (8, 128)),
               f"{up}.weight": ("BF16", (64, 128))}  # fmt: skip
    f = AwqFormat.from_checkpoint(
        {**AWQ_CFG, "modules_to_not_convert": ["mlp.gate"]}, index_of_shapes(entries), "c"
    )
    assert f.spec_for(gate, "linear") is None
    assert f.notes == []
    # "mlp.gate" is a substring of "mlp.gate_proj", yet the tensors say it is quantized.
    assert f.spec_for(gate_proj, "linear") is not None
    assert any(gate_proj in m and "'mlp.gate'" in m for m in f.notes)
    assert f.spec_for(up, "linear") is None
    assert any(up in m and "does not list" in m for m in f.notes)


def test_empty_qweight_means_unquantized_but_partial_layer_is_an_error() -> None:
    entries = {f"{P}.qweight": ("I32", (0, 8)), f"{P}.weight": ("BF16", (64, 128))}
    assert AwqFormat.from_checkpoint(AWQ_CFG, index_of_shapes(entries), "c").spec_for(P, "linear") is None
    broken = gemm_index(P, 64, 128, 1)
    broken[f"{P}.qweight"] = ("I32", (0, 8))
    with pytest.raises(TensorError, match=r"down_proj\.qweight"):
        AwqFormat.from_checkpoint(AWQ_CFG, index_of_shapes(broken), "c").spec_for(P, "linear")


def test_scales_implying_another_group_size_is_an_error() -> None:
    f = AwqFormat.from_checkpoint(AWQ_CFG, index_of_shapes(gemm_index(P, 64, 256, 4)), "c")
    with pytest.raises(TensorError, match=r"down_proj\.scales.*group size 64.*group_size 128"):
        f.spec_for(P, "linear")


def test_group_not_dividing_k_is_an_error() -> None:
    f = AwqFormat.from_checkpoint(AWQ_CFG, index_of_shapes(gemm_index(P, 64, 200, 2)), "c")
    with pytest.raises(TensorError, match=r"down_proj\.qweight.*K = 200.*group_size 128"):
        f.spec_for(P, "linear")


# -- real AutoAWQ checkpoint ----------------------------------------------------------------------
def test_fixture_layers_match_independent_dequant_and_original(third_party: Path) -> None:
    ckpt = Checkpoint(third_party / AWQ_DIR)
    orig = Checkpoint(third_party / "llama-bf16-original")
    f = AwqFormat.from_checkpoint(ckpt.config["quantization_config"], ckpt.index, "config.json")
    for prefix in LINEARS:
        spec = f.spec_for(prefix, "linear")
        assert spec is not None
        stored = ckpt.read_many(f.stored_names(prefix, spec).all())
        w = f.decode(prefix, spec, stored)
        packed = dequant_gemm(
            stored[f"{prefix}.qweight"], stored[f"{prefix}.qzeros"], stored[f"{prefix}.scales"], 128
        )
        assert torch.equal(canonical_dense(w), packed), prefix
        ref = orig.read(f"{prefix}.weight").double()
        assert packed.shape == ref.shape
        rel = float((packed - ref).norm() / ref.norm())
        assert rel < 0.2, (prefix, rel)  # 4-bit g128 asym on these random weights: 0.10-0.15


# -- bad input ------------------------------------------------------------------------------------
def test_bad_tensors_raise_naming_the_tensor() -> None:
    good = gemm_vector()
    f = fmt({**AWQ_CFG, "group_size": 8}, good)
    spec = f.spec_for(P, "linear")
    assert spec is not None
    bad_dtype = {**good, f"{P}.qweight": good[f"{P}.qweight"].float()}
    with pytest.raises(TensorError, match=r"down_proj\.qweight.*dtype float32"):
        f.decode(P, spec, bad_dtype)
    bad_shape = {**good, f"{P}.qzeros": good[f"{P}.qzeros"][:, :2]}
    with pytest.raises(TensorError, match=r"down_proj\.qzeros.*expected \[2, 4\]"):
        f.decode(P, spec, bad_shape)
    nan = good[f"{P}.scales"].clone()
    nan[1, 3] = float("nan")
    with pytest.raises(NumericsError, match=r"down_proj\.scales"):
        f.decode(P, spec, {**good, f"{P}.scales": nan})
    missing = {k: v for k, v in good.items() if not k.endswith("qzeros")}
    with pytest.raises(TensorError, match=r"down_proj\.qzeros.*missing"):
        f.decode(P, spec, missing)
    with pytest.raises(TensorError, match=r"down_proj\.qweight.*3 dimensions"):
        f.decode(P, spec, {**good, f"{P}.qweight": good[f"{P}.qweight"][None]})
