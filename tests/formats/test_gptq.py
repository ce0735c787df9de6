"""GPTQ reader and writers against formats.md §3 and §12, independent dequantizers and real files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor

from anyquant.errors import NumericsError, QuantConfigError, TensorError, UnsupportedError
from anyquant.loading.checkpoint import Checkpoint
from anyquant.quant.algorithms.rtn import quantize_rtn
from anyquant.quant.formats.base import WriteOptions
from anyquant.quant.formats.gptq import GptqFormat, GptqV2Writer, GptqWriter
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
    words,
    zero_gptq_asym,
)

P = "model.layers.0.mlp.down_proj"
GPTQMODEL_META = {"quantizer": ["gptqmodel:7.7.0"]}
V1_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}  # formats.md §3.3


def cfg(**kw: object) -> dict:
    base: dict = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
                  "format": "gptq", "meta": GPTQMODEL_META}  # fmt: skip
    base.update(kw)
    return base


# -- independent float64 dequantizer of the packed tensors (formats.md §0.2 a, §3.3, §3.4) --------
def bitstream(packed: Tensor, bits: int, count: int) -> Tensor:
    """LSB-first bitstream of int32 words along the last dim -> [..., count] values, via a bit array."""
    u = packed.to(torch.int64) & 0xFFFFFFFF
    bit_array = ((u.unsqueeze(-1) >> torch.arange(32)) & 1).reshape(*u.shape[:-1], -1)
    idx = torch.arange(count)[:, None] * bits + torch.arange(bits)[None]  # [count, bits]
    return (bit_array[..., idx] << torch.arange(bits)).sum(-1)


def true_zeros(qzeros: Tensor, bits: int, n: int, v2: bool) -> Tensor:
    """[ng, Zw] words -> [ng, N] true zero points."""
    if v2:
        return bitstream(qzeros, bits, n)
    if bits == 3:
        return (bitstream(qzeros, 3, n) + 1) & 7
    fixed = ((qzeros.to(torch.int64) & 0xFFFFFFFF) + V1_OFFSET[bits]) & 0xFFFFFFFF
    return bitstream(fixed, bits, n)


def dequant_gptq(t: dict[str, Tensor], bits: int, v2: bool, k: int, group: int) -> Tensor:
    n = t["qweight"].shape[1]
    codes = bitstream(t["qweight"].T, bits, k)  # [N, K]
    zeros = true_zeros(t["qzeros"], bits, n, v2)  # [ng, N]
    g = t["g_idx"].long() if "g_idx" in t else torch.arange(k) // group
    return (codes - zeros[g].T).double() * t["scales"].double()[g].T


def canonical_dense(w: QuantWeight) -> Tensor:
    """float64 (code - zero) * scale straight from the canonical fields."""
    n, k = w.shape
    group = w.spec.group_size if w.spec.granularity == "group" else k
    g = w.group_index.long() if w.group_index is not None else torch.arange(k) // group
    sc = w.scale.reshape(n, -1).double()
    zero = w.zero.reshape(n, -1) if w.zero is not None else torch.full(sc.shape, w.spec.implicit_zero)
    return (w.data.to(torch.int64) - zero[:, g]).double() * sc[:, g]


def suffixed(stored: dict[str, Tensor], prefix: str = P) -> dict[str, Tensor]:
    return {k.removeprefix(f"{prefix}."): v for k, v in stored.items()}


def read_layer(f: GptqFormat, prefix: str, stored: dict[str, Tensor]) -> QuantWeight:
    spec = f.spec_for(prefix, "linear")
    assert spec is not None
    return f.decode(prefix, spec, stored)


# -- §12.3 4-bit vectors --------------------------------------------------------------------------
QWEIGHT = [
    [0x36801D15, 0xEEAEA3F2, 0x2859E841, 0x2DFA95E6, 0x1D28E527, 0x090A3D1D, 0x648AB668, 0x2DEBE793],
    [0x2C882277, 0xF234A837, 0xD6B202AA, 0x956A53CD, 0x34B54755, 0xEAA2F3E5, 0x5AFCF4FF, 0x39358D26],
    [0x5C1C3989, 0x0E6D9416, 0x988DD119, 0x50404ADC, 0x5FE2CBBC, 0x4D927098, 0xD6228DD8, 0x792089E1],
    [0x4D5327E3, 0xA52A24E6, 0xFB5822F7, 0x8CD9C4A9, 0xFC66EBAD, 0xB3D935F0, 0x58DA82FB, 0xD920C08A],
]
DESC_G_IDX = [3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 1, 2, 2, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0]
SYM_Z = {"v1": [0x77777777] * 4, "v2": [0x88888888] * 4}
ASYM_Z = {"v1": [0x50A50A50, 0xC72C72C7, 0x4E94E94E, 0xB61B61B6],
          "v2": [0x61B61B61, 0xD83D83D8, 0x5FA5FA5F, 0xC72C72C7]}  # fmt: skip
VECTORS = {
    "sym": (SYM_Z, False, (-10.84375, -269.625),
            [-0.09375, -0.21875, 0.15625, -0.21875, -0.25, 0.0, -0.0625, -0.15625, -0.125, -0.125, -0.75, -0.75,
             0.0, 0.0, 0.5, -0.75, 0.21875, 0.0, 0.21875, -1.09375, 0.875, -1.53125, 0.875, -0.65625, -0.46875,
             0.5625, -0.09375, -0.5625, -0.46875, -0.28125, 0.46875, -0.375],
            [-0.09375, -1.125, -0.875, -0.125, -0.21875, 0.78125, 0.0, -0.15625]),
    "asym": (ASYM_Z, False, (7.65625, 489.625),
             [0.125, 0.0, 0.375, 0.0, -0.03125, 0.21875, 0.15625, 0.0625, -0.125, -0.125, -0.75, -0.75, 0.0, 0.0,
              0.5, -0.75, -1.3125, -1.53125, -1.3125, -2.625, -0.65625, -3.0625, -0.65625, -2.1875, -0.375,
              0.65625, 0.0, -0.46875, -0.375, -0.1875, 0.5625, -0.28125],
             [0.125, -0.75, -1.25, 0.3125, 0.21875, 0.3125, 0.65625, -0.09375]),
    "sym-descact": (SYM_Z, True, (-21.28125, -467.78125),
                    [-0.28125, -0.65625, 0.46875, -0.65625, -0.75, 0.0, -0.1875, -0.46875, -0.21875, -0.21875,
                     -1.3125, -1.3125, 0.0, 0.0, 0.5, -1.3125, 0.21875, 0.0, 0.125, -0.625, 0.5, -0.875, 0.5,
                     -0.09375, -0.625, 0.1875, -0.03125, -0.1875, -0.15625, -0.09375, 0.15625, -0.125],
                    [-0.28125, -0.1875, -1.3125, -0.25, -0.0625, 1.09375, 0.0, -0.46875]),
    "asym-descact": (ASYM_Z, True, (-2.78125, 109.34375),
                     [-0.1875, -0.5625, 0.5625, -0.5625, -0.65625, 0.09375, -0.09375, -0.375, -1.75, -1.75,
                      -2.84375, -2.84375, -1.53125, -1.53125, 0.5, -2.84375, -1.3125, 0.0, 0.125, -0.625, 0.5,
                      -0.875, 0.5, 0.125, -0.625, 0.40625, 0.1875, 0.03125, 0.0625, 0.125, 0.375, 0.09375],
                     [-0.1875, -0.3125, -0.1875, -0.125, -0.3125, 2.40625, 0.15625, -0.84375]),
}  # fmt: skip


def vector_tensors(name: str, version: str) -> dict[str, Tensor]:
    zwords, descact = VECTORS[name][0], VECTORS[name][1]
    g_idx = DESC_G_IDX if descact else [k // 8 for k in range(32)]
    return {
        f"{P}.qweight": torch.stack([words(r) for r in QWEIGHT]),
        f"{P}.qzeros": words(zwords[version]).reshape(4, 1),
        f"{P}.scales": torch.tensor([[scale(n, g) for n in range(8)] for g in range(4)], dtype=torch.float16),
        f"{P}.g_idx": torch.tensor(g_idx, dtype=torch.int32),
    }


def vector_config(name: str, version: str) -> dict:
    return cfg(bits=4, group_size=8, sym=name.startswith("sym"), desc_act=name.endswith("descact"),
               format="gptq" if version == "v1" else "gptq_v2")  # fmt: skip


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("name", list(VECTORS))
def test_vector_decodes_exactly(name: str, version: str) -> None:
    _, descact, sums, row0, col0 = VECTORS[name]
    stored = vector_tensors(name, version)
    f = GptqFormat.from_checkpoint(vector_config(name, version), index_of(stored), "cfg")
    assert isinstance(f, GptqFormat)
    w = read_layer(f, P, stored)
    assert w.spec.act_order is descact
    assert w.spec.has_zero is name.startswith("asym")
    assert torch.equal(
        w.data, torch.tensor([[hcode(n, k, 15) for k in range(32)] for n in range(8)]).to(torch.uint8)
    )
    if w.zero is not None:
        assert w.zero.tolist() == [[zero_gptq_asym(n, g) for g in range(4)] for n in range(8)]
    if descact:
        assert w.group_index is not None and w.group_index.tolist() == DESC_G_IDX
    dense = canonical_dense(w)
    assert dense[0].tolist() == row0
    assert dense[:, 0].tolist() == col0
    assert checksums(dense) == sums
    assert torch.equal(dequant_gptq(suffixed(stored), 4, version == "v2", 32, 8), dense)
    assert f.notes == []


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("name", list(VECTORS))
def test_writer_reproduces_vector_words(name: str, version: str) -> None:
    sym, descact = name.startswith("sym"), name.endswith("descact")
    codes = torch.tensor([[hcode(n, k, 15) for k in range(32)] for n in range(8)], dtype=torch.uint8)
    scales = torch.tensor([[scale(n, g) for g in range(4)] for n in range(8)])
    zeros = None if sym else torch.tensor([[zero_gptq_asym(n, g) for g in range(4)] for n in range(8)])
    spec = QuantSpec("uint4", "group", group_size=8, has_zero=not sym, act_order=descact)
    gidx = torch.tensor(DESC_G_IDX, dtype=torch.int32) if descact else None
    weight = QuantWeight(spec, (8, 32), codes, scales, zeros, gidx).validate("vector")
    writer = (GptqWriter if version == "v1" else GptqV2Writer)(WriteOptions(bits=4, group_size=8, sym=sym))
    out = writer.encode(P, weight)
    for key, t in vector_tensors(name, version).items():
        assert out[key].dtype == t.dtype and torch.equal(out[key], t), key


# -- zero point 0 (formats.md §12.3 end, §3.3, §11.3) ---------------------------------------------
ZP0_ZEROS = [1, 0, 11, 1, 6, 0, 1, 6]


def zp0_weight() -> QuantWeight:
    gen = torch.Generator().manual_seed(5)
    zeros = torch.randint(1, 16, (32, 2), generator=gen, dtype=torch.int32)
    zeros[:8, 0] = torch.tensor(ZP0_ZEROS)
    codes = torch.randint(0, 16, (32, 32), generator=gen, dtype=torch.uint8)
    spec = QuantSpec("uint4", "group", group_size=16, has_zero=True)
    return QuantWeight(spec, (32, 32), codes, torch.full((32, 2), 0.25), zeros).validate("zp0")


def test_zero_point_zero_words() -> None:
    w = zp0_weight()
    v1 = GptqWriter(WriteOptions(bits=4, group_size=16)).encode(P, w)
    v2 = GptqV2Writer(WriteOptions(bits=4, group_size=16)).encode(P, w)
    assert int(v2[f"{P}.qzeros"][0, 0]) & 0xFFFFFFFF == 0x61061B01
    assert int(v1[f"{P}.qzeros"][0, 0]) & 0xFFFFFFFF == 0x4FF509F0
    # Word-level decoding of the GPTQModel word reproduces the layer; per-field +1 does not.
    f = GptqFormat.from_checkpoint(cfg(group_size=16, sym=False), index_of(v1), "cfg")
    back = read_layer(f, P, v1)
    assert back.zero is not None and back.zero[:8, 0].tolist() == ZP0_ZEROS
    assert torch.equal(back.zero, w.zero)  # type: ignore[arg-type]
    per_field = (bitstream(words([0x4FF509F0]), 4, 8) + 1) & 0xF
    assert per_field.tolist() != ZP0_ZEROS


def test_autogptq_corrupt_word_is_noted() -> None:
    stored = GptqWriter(WriteOptions(bits=4, group_size=16)).encode(P, zp0_weight())
    stored[f"{P}.qzeros"][0, 0] = words([0xFFFFFFF0])[0]  # what AutoGPTQ writes for this group
    autogptq = cfg(group_size=16, sym=False, meta={"quantizer": ["optimum:1.0"]})
    f = GptqFormat.from_checkpoint(autogptq, index_of(stored), "cfg")
    read_layer(f, P, stored)
    assert any("qzeros" in m and "AutoGPTQ" in m for m in f.notes)
    g = GptqFormat.from_checkpoint(cfg(group_size=16, sym=False), index_of(stored), "cfg")
    read_layer(g, P, stored)
    assert g.notes == []  # GPTQModel files legitimately hold 0xF fields


# -- §12.5 3-bit bitstream and the §3.3 sym constants ---------------------------------------------
def test_three_bit_bitstream_vector() -> None:
    codes = torch.zeros(32, 32, dtype=torch.uint8)
    codes[0] = torch.tensor([hcode(0, k, 7) for k in range(32)])
    assert codes[0].tolist()[:16] == [5, 1, 5, 1, 0, 0, 6, 3, 7, 7, 2, 2, 0, 0, 4, 2]
    spec = QuantSpec("uint3", "group", group_size=32)
    w = QuantWeight(spec, (32, 32), codes, torch.full((32, 1), 0.5)).validate("3bit")
    out = GptqWriter(WriteOptions(bits=3, group_size=32, sym=True)).encode(P, w)
    col0 = [int(x) & 0xFFFFFFFF for x in out[f"{P}.qweight"][:, 0]]
    assert col0 == [0xBF78034D, 0xC6415004, 0x96B5F3B0]
    f = GptqFormat.from_checkpoint(cfg(bits=3, group_size=32), index_of(out), "cfg")
    back = read_layer(f, P, out)
    assert torch.equal(back.data, codes)
    assert back.zero is None  # sym: every decoded zero is 4
    dense = canonical_dense(back)
    assert dense[0].tolist() == [(hcode(0, k, 7) - 4) * 0.5 for k in range(32)]


SYM_WORDS = {
    2: ([0x55555555], [0xAAAAAAAA]),
    3: ([0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D], [0x24924924, 0x49249249, 0x92492492]),
    4: ([0x77777777], [0x88888888]),
    8: ([0x7F7F7F7F], [0x80808080]),
}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_zero_words(bits: int) -> None:
    spec = QuantSpec(f"uint{bits}", "group", group_size=32)  # type: ignore[arg-type]
    w = QuantWeight(spec, (32, 32), torch.zeros(32, 32, dtype=torch.uint8), torch.ones(32, 1)).validate("s")
    v1_words, v2_words = SYM_WORDS[bits]
    for writer, want in ((GptqWriter, v1_words), (GptqV2Writer, v2_words)):
        qzeros = writer(WriteOptions(bits=bits, group_size=32, sym=True)).encode(P, w)[f"{P}.qzeros"]
        got = [int(x) & 0xFFFFFFFF for x in qzeros[0]]
        assert got == want * (bits if bits != 3 else 1), writer.name


# -- random grid: writer -> reader -> independent dequantizer -------------------------------------
def random_weight(
    bits: int, group: int, sym: bool, act_order: bool, seed: int, n: int = 64, k: int = 256
) -> QuantWeight:
    weight = f"uint{bits}"
    if group == -1:
        spec = QuantSpec(weight, "channel", has_zero=not sym)  # type: ignore[arg-type]
    else:
        spec = QuantSpec(weight, "group", group_size=group, has_zero=not sym, act_order=act_order)  # type: ignore[arg-type]
    # Zero points include 0 (GPTQ v1 stores zero - 1, which borrows); F16 scales round-trip exactly.
    return quant_weights.random_weight(spec, n, k, seed, f16_exact=True)


GRID = [
    (bits, group, sym, act, version)
    for bits in (2, 3, 4, 8)
    for group in (32, 64, 128, -1)
    for sym in (True, False)
    for act in (False, True)
    for version in ("gptq", "gptq-v2")
    if not (act and group == -1)  # one group spanning K has no act-order (tested separately)
]


@pytest.mark.parametrize(("bits", "group", "sym", "act", "version"), GRID)
def test_random_encode_decode_matches_independent_dequant(
    bits: int, group: int, sym: bool, act: bool, version: str
) -> None:
    seed = bits * 1000 + group * 10 + 4 * sym + 2 * act + (version == "gptq-v2")
    original = random_weight(bits, group, sym, act, seed)
    writer = writer_class(version)(WriteOptions(bits=bits, group_size=group, sym=sym, act_order=act))
    assert writer.spec_for(P, original.shape, "linear") == original.spec
    stored = writer.encode(P, original)
    assert {t.dtype for t in stored.values()} == {torch.int32, torch.float16}
    f = format_class("gptq").from_checkpoint(writer.quantization_config([]), index_of(stored), "test")
    decoded = read_layer(f, P, stored)  # type: ignore[arg-type]
    assert decoded.spec == original.spec
    assert torch.equal(decoded.data, original.data)
    assert torch.equal(decoded.scale, original.scale)
    if sym:
        assert decoded.zero is None
    else:
        assert torch.equal(decoded.zero, original.zero)  # type: ignore[arg-type]
    if act:
        assert torch.equal(decoded.group_index, original.group_index)  # type: ignore[arg-type]
    else:
        assert decoded.group_index is None
    g = group if group != -1 else 256
    packed = dequant_gptq(suffixed(stored), bits, version == "gptq-v2", 256, g)
    assert torch.equal(packed, canonical_dense(original))
    assert f.notes == []


def test_act_order_with_one_group_is_plain_per_channel() -> None:
    writer = GptqWriter(WriteOptions(bits=4, group_size=-1, act_order=True))
    assert writer.spec_for(P, (64, 256), "linear") == QuantSpec("uint4", "channel", has_zero=True)
    assert writer.quantization_config([])["desc_act"] is True


@pytest.mark.parametrize(("bits", "sym", "act"), [(2, False, True), (3, True, False), (4, False, False),
                                                  (4, True, True), (8, False, True)])  # fmt: skip
def test_rtn_round_trip_is_exact(bits: int, sym: bool, act: bool) -> None:
    torch.manual_seed(bits)
    dense = (torch.randn(64, 256) * 0.05).to(torch.bfloat16)
    writer = GptqWriter(WriteOptions(bits=bits, group_size=64, sym=sym, act_order=act))
    spec = writer.spec_for(P, (64, 256), "linear")
    assert isinstance(spec, QuantSpec)
    q = quantize_rtn(dense, spec, scale_dtype=writer.scale_dtype(torch.bfloat16))
    stored = writer.encode(P, q)
    f = GptqFormat.from_checkpoint(writer.quantization_config([]), index_of(stored), "t")
    back = read_layer(f, P, stored)  # type: ignore[arg-type]
    assert back.spec == q.spec
    assert torch.equal(back.data, q.data) and torch.equal(back.scale, q.scale)
    assert (back.zero is None) == (q.zero is None)
    if q.zero is not None:
        assert torch.equal(back.zero, q.zero)  # type: ignore[arg-type]
    if act:
        assert torch.equal(back.group_index, q.group_index)  # type: ignore[arg-type]


# -- writer behaviour -----------------------------------------------------------------------------
def test_writer_config_like_gptqmodel(third_party: Path) -> None:
    writer = GptqWriter(WriteOptions(bits=4, group_size=128, sym=True))
    assert writer.spec_for("lm_head", (1024, 256), "lm_head") == (
        "GPTQModel leaves lm_head unquantized unless lm_head is requested"
    )
    assert "multiples of 32" in str(writer.spec_for("model.layers.0.x", (40, 256), "linear"))
    assert "group size 128" in str(writer.spec_for("model.layers.0.y", (64, 96), "linear"))
    cfg_written = writer.quantization_config(["model.layers.0.x", "model.layers.0.y", "lm_head"])
    real = json.loads(
        (third_party / "llama-gptq-4bit-g128-sym-gptqmodel" / "quantize_config.json").read_text()
    )
    assert set(cfg_written) - {"dynamic"} == set(real)
    assert {k: cfg_written[k] for k in real if k != "meta"} == {k: v for k, v in real.items() if k != "meta"}
    assert list(cfg_written["dynamic"]) == [r"-:model\.layers\.0\.x$", r"-:model\.layers\.0\.y$"]
    assert writer.side_files([]) == {"quantize_config.json": writer.quantization_config([])}
    # What was written reads back: the skipped module is excluded, its neighbours are not.
    f = GptqFormat.from_checkpoint(cfg_written, index_of({}), "written")
    assert f.config.layer("model.layers.0.x") is None
    assert f.config.layer("model.layers.0.xy") is not None
    v2 = GptqV2Writer(WriteOptions(bits=8, group_size=32)).quantization_config([])
    assert v2["format"] == v2["checkpoint_format"] == "gptq_v2" and v2["bits"] == 8


def test_writer_lm_head_on_request() -> None:
    writer = GptqWriter(WriteOptions(bits=4, group_size=128, extra={"lm_head": True}))
    assert isinstance(writer.spec_for("lm_head", (1024, 256), "lm_head"), QuantSpec)
    assert writer.quantization_config([])["lm_head"] is True
    assert writer.quantization_config(["lm_head"])["lm_head"] is False


@pytest.mark.parametrize(("options", "needle"), [(WriteOptions(bits=5), "not 5"),
                                                 (WriteOptions(group_size=20), "group size 20")])  # fmt: skip
def test_writer_rejects_options(options: WriteOptions, needle: str) -> None:
    with pytest.raises(UnsupportedError, match=needle):
        GptqWriter(options)


# -- detection ------------------------------------------------------------------------------------
GPTQ_DIR = "llama-gptq-4bit-g128-sym-gptqmodel"
LINEARS = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
AUTOGPTQ_07 = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
               "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": None}  # fmt: skip


@pytest.mark.parametrize("source", ["config.json", "quantize_config.json", "autogptq-0.7"])
def test_fixture_configs_give_uint4_g128_sym(third_party: Path, source: str) -> None:
    path = third_party / GPTQ_DIR
    if source == "config.json":
        qc = json.loads((path / source).read_text())["quantization_config"]
    elif source == "quantize_config.json":
        qc = json.loads((path / source).read_text())
    else:
        qc = AUTOGPTQ_07  # no quant_method: the detector maps quantize_config.json to gptq
    f = format_class("gptq").from_checkpoint(qc, Checkpoint(path).index, source)
    want = QuantSpec("uint4", "group", group_size=128)
    assert [f.spec_for(p, "linear") for p in LINEARS] == [want] * len(LINEARS)
    assert f.spec_for("lm_head", "lm_head") is None
    assert f.notes == []


def layer_index(prefix: str, n: int, k: int, bits: int, group: int, g_idx: bool = True) -> dict:
    ng = 1 if group == -1 else -(-k // group)
    entries = {
        f"{prefix}.qweight": ("I32", (-(-k * bits // 32), n)),
        f"{prefix}.qzeros": ("I32", (ng, -(-n * bits // 32))),
        f"{prefix}.scales": ("F16", (ng, n)),
    }
    if g_idx:
        entries[f"{prefix}.g_idx"] = ("I32", (k,))
    return entries


def test_dynamic_overrides_first_match_wins() -> None:
    l0, l1 = "model.layers.0", "model.layers.1"
    entries = {
        **layer_index(f"{l0}.mlp.down_proj", 64, 256, 8, 128),
        **layer_index(f"{l0}.self_attn.q_proj", 64, 256, 4, 32),
        **layer_index(f"{l1}.mlp.down_proj", 64, 256, 4, 128),
        **layer_index(f"{l1}.mlp.gate", 64, 256, 4, 128),  # quantized despite its "-:" rule
        f"{l1}.mlp.up_proj.weight": ("BF16", (64, 256)),
    }
    dynamic = {
        r"-:.*\.mlp\.(gate|up_proj)$": {},
        r"+:.*\.layers\.0\.self_attn\..*": {"group_size": 32, "sym": False, "desc_act": True},
        r".*\.layers\.0\..*": {"bits": 8},
        r".*\.layers\.0\.self_attn\..*": {"bits": 2},  # shadowed by the rule above
    }
    f = GptqFormat.from_checkpoint(cfg(dynamic=dynamic), index_of_shapes(entries), "cfg")
    assert f.spec_for(f"{l0}.mlp.down_proj", "linear") == QuantSpec("uint8", "group", group_size=128)
    assert f.spec_for(f"{l0}.self_attn.q_proj", "linear") == QuantSpec(
        "uint4", "group", group_size=32, has_zero=True, act_order=True
    )
    assert f.spec_for(f"{l1}.mlp.down_proj", "linear") == QuantSpec("uint4", "group", group_size=128)
    assert f.spec_for(f"{l1}.mlp.up_proj", "linear") is None
    assert f.notes == []
    assert f.spec_for(f"{l1}.mlp.gate", "linear") == QuantSpec("uint4", "group", group_size=128)
    assert any("mlp.gate" in m and "dynamic rule" in m for m in f.notes)


def test_spec_follows_config_and_tensors() -> None:
    entries = {**layer_index("a", 64, 256, 4, 128), **layer_index("b", 64, 256, 4, 128, g_idx=False),
               **layer_index("c", 64, 256, 3, -1), **layer_index("lm_head", 1024, 256, 4, 128)}  # fmt: skip
    f = GptqFormat.from_checkpoint(cfg(desc_act=True, sym=False), index_of_shapes(entries), "cfg")
    assert f.spec_for("a", "linear") == QuantSpec(
        "uint4", "group", group_size=128, has_zero=True, act_order=True
    )
    assert f.spec_for("b", "linear") == QuantSpec("uint4", "group", group_size=128, has_zero=True)
    channel = GptqFormat.from_checkpoint(cfg(bits=3, group_size=-1), index_of_shapes(entries), "cfg")
    assert channel.spec_for("c", "linear") == QuantSpec("uint3", "channel")
    assert f.spec_for("lm_head", "lm_head") is not None
    assert any("lm_head: False" in m for m in f.notes)
    g = GptqFormat.from_checkpoint(cfg(lm_head=True), index_of_shapes(entries), "cfg")
    assert g.spec_for("lm_head", "lm_head") is not None and g.notes == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"format": "marlin"}, "'format'"),
        ({"format": "bitblas"}, "'format'"),
        ({"format": None, "checkpoint_format": "gptq_p"}, "'checkpoint_format'"),
        ({"format": "qqq"}, "'format'"),
        ({"format": "awq"}, "'format'"),
        ({"format": "gptq", "checkpoint_format": "gptq_v2"}, "'checkpoint_format'"),
        ({"is_marlin_format": True}, "'is_marlin_format'"),
        ({"pack_dtype": "int16"}, "'pack_dtype'"),
        ({"bits": 5}, "'bits'"),
        ({"bits": True}, "'bits'"),
        ({"group_size": 100}, "'group_size'"),
        ({"sym": "yes"}, "'sym'"),
        ({"dynamic": {"+:model.(": {"bits": 8}}}, "dynamic"),
        ({"dynamic": {".*": {"bits": 6}}}, r"dynamic\['\.\*'\].*'bits'"),
        ({"dynamic": {".*": {"pack_dtype": "int64"}}}, "'pack_dtype'"),
        ({"dynamic": [".*"]}, "'dynamic'"),
    ],
)
def test_unsupported_configs_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(QuantConfigError, match=field):
        GptqFormat.from_checkpoint(cfg(**change), index_of({}), "cfg")


def test_missing_sym_is_noted() -> None:
    qc = cfg()
    del qc["sym"]
    f = GptqFormat.from_checkpoint(qc, index_of({}), "cfg")
    assert f.config.base.sym is True and any("'sym'" in m for m in f.notes)


@pytest.mark.parametrize(
    ("entries_change", "tensor", "needle"),
    [
        ({f"{P}.scales": ("F16", (4, 64))}, "scales", r"expected \[2, 64\].*group size ~64"),
        ({f"{P}.qzeros": ("I32", (2, 16))}, "qzeros", r"expected \[2, 8\].*'bits' = 4"),
        ({f"{P}.qweight": ("I32", (64, 64))}, "qweight", r"K = 256 \(from g_idx\) at 4 bits needs 32"),
        ({f"{P}.qweight": ("I32", (32, 64, 1))}, "qweight", "3 dimensions"),
    ],
)
def test_inconsistent_shapes_name_the_tensor(entries_change: dict, tensor: str, needle: str) -> None:
    entries = {**layer_index(P, 64, 256, 4, 128), **entries_change}
    f = GptqFormat.from_checkpoint(cfg(), index_of_shapes(entries), "cfg")
    with pytest.raises(TensorError, match=rf"down_proj\.{tensor}.*{needle}"):
        f.spec_for(P, "linear")


def test_partial_layer_is_an_error() -> None:
    entries = layer_index(P, 64, 256, 4, 128)
    del entries[f"{P}.qweight"]
    with pytest.raises(TensorError, match=r"down_proj\.qweight.*missing"):
        GptqFormat.from_checkpoint(cfg(), index_of_shapes(entries), "cfg").spec_for(P, "linear")


# -- real GPT-QModel checkpoint -------------------------------------------------------------------
def test_fixture_layers_match_independent_dequant_and_original(third_party: Path) -> None:
    ckpt = Checkpoint(third_party / GPTQ_DIR)
    orig = Checkpoint(third_party / "llama-bf16-original")
    f = GptqFormat.from_checkpoint(ckpt.config["quantization_config"], ckpt.index, "config.json")
    for prefix in LINEARS:
        spec = f.spec_for(prefix, "linear")
        assert spec is not None
        stored = ckpt.read_many(f.stored_names(prefix, spec).all())
        w = f.decode(prefix, spec, stored)
        assert w.zero is None and w.group_index is None  # sym, trivial g_idx
        packed = dequant_gptq(suffixed(stored, prefix), 4, False, w.shape[1], 128)
        assert torch.equal(canonical_dense(w), packed), prefix
        ref = orig.read(f"{prefix}.weight").double()
        rel = float((packed - ref).norm() / ref.norm())
        assert rel < 0.2, (prefix, rel)  # 4-bit g128 sym on these random weights: about 0.1-0.15
    assert f.notes == []


# -- bad input ------------------------------------------------------------------------------------
def good_layer(act_order: bool = True) -> tuple[GptqFormat, QuantSpec, dict[str, Tensor]]:
    w = random_weight(4, 32, False, act_order, seed=11, n=32, k=64)
    stored = GptqWriter(WriteOptions(bits=4, group_size=32)).encode(P, w)
    f = GptqFormat.from_checkpoint(cfg(group_size=32, sym=False, desc_act=True), index_of(stored), "cfg")
    spec = f.spec_for(P, "linear")
    assert spec is not None
    return f, spec, stored


def test_bad_tensors_raise_naming_the_tensor() -> None:
    f, spec, good = good_layer()
    with pytest.raises(TensorError, match=r"down_proj\.qweight.*dtype float32"):
        f.decode(P, spec, {**good, f"{P}.qweight": good[f"{P}.qweight"].float()})
    with pytest.raises(TensorError, match=r"down_proj\.g_idx.*dtype int16"):
        f.decode(P, spec, {**good, f"{P}.g_idx": good[f"{P}.g_idx"].to(torch.int16)})
    with pytest.raises(TensorError, match=r"down_proj\.scales.*shape \[2, 31\]"):
        f.decode(P, spec, {**good, f"{P}.scales": good[f"{P}.scales"][:, :31]})
    out_of_range = good[f"{P}.g_idx"].clone()
    out_of_range[5] = 2
    with pytest.raises(TensorError, match=re.escape("g_idx': values in [0, 2], expected [0, 2)")):
        f.decode(P, spec, {**good, f"{P}.g_idx": out_of_range})
    zero_filled = torch.zeros_like(good[f"{P}.g_idx"])  # formats.md §11.9: not "k // G", and corrupt
    with pytest.raises(TensorError, match=r"down_proj\.g_idx.*group 0 has 64 members, expected 32"):
        f.decode(P, spec, {**good, f"{P}.g_idx": zero_filled})
    nan = good[f"{P}.scales"].clone()
    nan[1, 2] = float("nan")
    with pytest.raises(NumericsError, match=r"down_proj\.scales"):
        f.decode(P, spec, {**good, f"{P}.scales": nan})
    with pytest.raises(TensorError, match=r"down_proj\.qzeros.*missing"):
        f.decode(P, spec, {k: v for k, v in good.items() if not k.endswith("qzeros")})


def test_decode_reports_what_the_tensors_prove() -> None:
    # desc_act says act-order, but g_idx is trivial: the decoded weight is plain grouped.
    f, spec, stored = good_layer(act_order=False)
    assert spec.act_order
    w = f.decode(P, spec, stored)
    assert not w.spec.act_order and w.group_index is None
    # No g_idx at all means k // G (never zeros).
    w2 = f.decode(P, spec, {k: v for k, v in stored.items() if not k.endswith("g_idx")})
    assert torch.equal(canonical_dense(w2), canonical_dense(w))
    # An empty g_idx (formats.md §11.9) carries nothing either.
    empty = {**stored, f"{P}.g_idx": torch.empty(0, dtype=torch.int32)}
    assert GptqFormat.from_checkpoint(cfg(group_size=32, sym=False), index_of(empty), "c").spec_for(
        P, "linear"
    )
    assert torch.equal(canonical_dense(f.decode(P, spec, empty)), canonical_dense(w))
    # sym says zero 8, qzeros disagree: trust the tensor and say so.
    sym = GptqFormat.from_checkpoint(cfg(group_size=32), index_of(stored), "cfg")
    sym_spec = sym.spec_for(P, "linear")
    assert sym_spec is not None and not sym_spec.has_zero
    w3 = sym.decode(P, sym_spec, stored)
    assert w3.spec.has_zero and torch.equal(canonical_dense(w3), canonical_dense(w))
    assert any("sym is true" in m for m in sym.notes)
