"""compressed-tensors reader and writer (formats.md §4).

Expected values come from the spec's test vectors (§12.4, §12.5), float64 formulas written in
`ct_oracle.py`, and the real compressed-tensors library (packing, compressors, config writer);
the library tests skip with the import error when it is not installed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from anyquant.errors import NumericsError, QuantConfigError, TensorError, UnsupportedError
from anyquant.loading.checkpoint import Checkpoint
from anyquant.quant.algorithms.rtn import quantize_rtn
from anyquant.quant.formats.base import QuantFormat, WriteOptions
from anyquant.quant.formats.compressed_tensors import WRITTEN_VERSION
from anyquant.quant.formats.compressed_tensors.config import _parse_version
from anyquant.quant.registry import format_class, writer_class
from anyquant.quant.spec import ActQuant, QuantSpec
from anyquant.quant.weight import QuantWeight
from tests.formats import ct_oracle as oc

LIB, LIB_WHY = oc.library()
needs_lib = pytest.mark.skipif(LIB is None, reason=LIB_WHY or "compressed-tensors missing")

P = "model.layers.0.mlp.down_proj"
Q = "model.layers.0.self_attn.q_proj"


def reader(
    qconfig: dict[str, Any], tensors: dict[str, Tensor] | None = None, headers: Any = None
) -> QuantFormat:
    index = oc.index_of(tensors) if tensors is not None else oc.index_from_headers(headers or {})
    return format_class("compressed-tensors").from_checkpoint(qconfig, index, "test")


def decode_layer(qconfig: dict[str, Any], stored: dict[str, Tensor], prefix: str = P) -> QuantWeight:
    fmt = reader(qconfig, stored)
    spec = fmt.spec_for(prefix, "linear")
    assert spec is not None
    names = fmt.stored_names(prefix, spec)
    assert set(names.required) <= set(stored)
    return fmt.decode(prefix, spec, {n: stored[n] for n in names.all() if n in stored})


def w4_config(**weights: Any) -> dict[str, Any]:
    return oc.ct_config({"group_0": oc.group({**oc.int_weights(4), **weights}, "pack-quantized")})


# ------------------------------------------------------------------------------------------------
# formats.md §12.4 / §12.5 vectors

CT_SYM_PACKED = [
    [0x36801D15, 0x2C882277], [0xEEAEA3F2, 0xF234A837], [0x2859E841, 0xD6B202AA],
    [0x2DFA95E6, 0x956A53CD], [0x1D28E527, 0x34B54755], [0x090A3D1D, 0xEAA2F3E5],
    [0x648AB668, 0x5AFCF4FF], [0x2DEBE793, 0x39358D26],
]  # fmt: skip
CT_ASYM_EXTRA = [
    [0x49D38C30, 0x2047598B], [0xC9ADAD59, 0xB93D45FB], [0xF59BF13F, 0x29E8D507],
    [0x979E2EBD, 0x4D114484], [0x2345BC67, 0xB82430E4], [0x63D229E3, 0xD52EB448],
    [0x91E76833, 0xD6D3CFD7], [0x7ACAE745, 0x583F8668],
]  # fmt: skip
CT_ASYM_ZP = [[0x3E94FA50, 0xA50B61C7], [0xB61C72D8, 0x2D83E94F]]


def _vector_stored(n: int, packed: list[list[int]], zp: list[list[int]] | None) -> dict[str, Tensor]:
    stored = {
        f"{P}.weight_packed": oc.words(packed),
        f"{P}.weight_scale": torch.tensor(
            [[oc.vec_scale(i, g) for g in range(2)] for i in range(n)], dtype=torch.bfloat16
        ),
        f"{P}.weight_shape": torch.tensor([n, 16], dtype=torch.int64),
    }
    if zp is not None:
        stored[f"{P}.weight_zero_point"] = oc.words(zp)
    return stored


def test_ct_sym_vector_decodes_exactly() -> None:
    stored = _vector_stored(8, CT_SYM_PACKED, None)
    config = w4_config(group_size=8)
    del config["version"]
    fmt = reader(config, stored)
    w = fmt.decode(P, fmt.spec_for(P, "linear"), stored)  # type: ignore[arg-type]
    assert not fmt.notes  # 4-bit packing is the same in every release: no version needed
    assert w.spec == QuantSpec("uint4", "group", group_size=8)
    codes = torch.tensor([[oc.hcode(n, k, 15) for k in range(16)] for n in range(8)], dtype=torch.uint8)
    assert torch.equal(w.data, codes) and w.zero is None
    dense = oc.canon_dense(w)
    assert dense[0].tolist() == [-0.09375, -0.21875, 0.15625, -0.21875, -0.25, 0.0, -0.0625, -0.15625,
                                 -0.125, -0.125, -0.75, -0.75, 0.0, 0.0, 0.5, -0.75]  # fmt: skip
    assert dense[:, 0].tolist() == [-0.09375, -1.125, -0.875, -0.125, -0.21875, 0.78125, 0.0, -0.15625]
    assert oc.checksums(dense) == (-7.125, -132.875)
    assert torch.equal(dense, oc.ref_dequant_packed(stored, P, 4, 8, symmetric=True))


def test_ct_asym_vector_decodes_exactly() -> None:
    stored = _vector_stored(16, CT_SYM_PACKED + CT_ASYM_EXTRA, CT_ASYM_ZP)
    w = decode_layer(w4_config(group_size=8, symmetric=False), stored)
    assert w.spec == QuantSpec("uint4", "group", group_size=8, has_zero=True)
    zeros = torch.tensor([[(5 * n + 7 * g) % 16 for g in range(2)] for n in range(16)], dtype=torch.int32)
    assert w.zero is not None and torch.equal(w.zero, zeros)
    dense = oc.canon_dense(w)
    assert dense[0].tolist() == [0.15625, 0.03125, 0.40625, 0.03125, 0.0, 0.25, 0.1875, 0.09375, 0.0, 0.0,
                                 -0.625, -0.625, 0.125, 0.125, 0.625, -0.625]  # fmt: skip
    assert dense[:, 0].tolist() == [0.15625, -0.5625, -1.125, -0.5625, 0.65625, 0.625, -0.5625, 0.0, -1.5,
                                    -0.5, 0.8125, 1.3125, -0.78125, 0.1875, -0.09375, -1.125]  # fmt: skip
    assert oc.checksums(dense) == (4.3125, 81.40625)
    assert torch.equal(dense, oc.ref_dequant_packed(stored, P, 4, 8, symmetric=False))


def test_ct_vectors_encode_back_to_the_same_words() -> None:
    stored = _vector_stored(16, CT_SYM_PACKED + CT_ASYM_EXTRA, CT_ASYM_ZP)
    w = decode_layer(w4_config(group_size=8, symmetric=False), stored)
    writer = writer_class("compressed-tensors")(WriteOptions(bits=4, group_size=8, sym=False))
    writer.scale_dtype(torch.bfloat16)
    out = writer.encode(P, w)
    assert set(out) == set(stored)
    for name, tensor in stored.items():
        assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor), name


THREE_BIT_CODES = [
    5,
    1,
    5,
    1,
    0,
    0,
    6,
    3,
    7,
    7,
    2,
    2,
    0,
    0,
    4,
    2,
    1,
    0,
    1,
    3,
    4,
    1,
    4,
    5,
    3,
    6,
    7,
    2,
    3,
    5,
    5,
    4,
]
THREE_BIT_WORDS = [[0xBF78034D, 0xC6415004, 0x96B5F3B0]]


def _three_bit(packed: Tensor, k: int, version: str | None) -> tuple[QuantWeight, QuantFormat]:
    stored = {
        f"{P}.weight_packed": packed,
        f"{P}.weight_scale": torch.ones(1, 1, dtype=torch.bfloat16),
        f"{P}.weight_shape": torch.tensor([1, k]),
    }
    cfg = oc.ct_config({"group_0": oc.group(oc.int_weights(3, "channel"), "pack-quantized")}, version=version)
    fmt = reader(cfg, stored)
    spec = fmt.spec_for(P, "linear")
    assert spec == QuantSpec("uint3", "channel")
    return fmt.decode(P, spec, stored), fmt


def test_three_bit_dense_bitstream_vector() -> None:
    assert [oc.hcode(0, k, 7) for k in range(32)] == THREE_BIT_CODES
    # 0.17.x would need 4 words for 32 codes, so 3 words are dense whatever the version says.
    for version in ("0.20.0", "0.17.1"):
        w, _ = _three_bit(oc.words(THREE_BIT_WORDS), 32, version)
        assert w.data[0].tolist() == THREE_BIT_CODES
    writer = writer_class("compressed-tensors")(WriteOptions(bits=3, group_size=-1, sym=True))
    assert torch.equal(writer.encode(P, w)[f"{P}.weight_packed"], oc.words(THREE_BIT_WORDS))


def test_padded_017_layout_told_apart_by_shape_then_version() -> None:
    torch.manual_seed(1)
    codes = torch.randint(0, 8, (1, 64))
    padded = oc.ref_pack_padded(codes, 3)  # 7 words; a dense stream would be 6
    assert padded.shape == (1, 7)
    w, _ = _three_bit(padded, 64, "0.20.0")
    assert torch.equal(w.data[0].long(), codes[0])
    # K = 16: both layouts take 2 words but differ from value 10 on; the version decides.
    short = codes[:, :16]
    w, _ = _three_bit(oc.ref_pack_padded(short, 3), 16, "0.17.1")
    assert torch.equal(w.data[0].long(), short[0])
    dense = torch.tensor(
        [[sum(int(v) << (3 * i) for i, v in enumerate(short[0].tolist()))]], dtype=torch.int64
    )
    dense_words = torch.cat([dense & 0xFFFFFFFF, dense >> 32], dim=1)
    dense_words = torch.where(dense_words >= 1 << 31, dense_words - (1 << 32), dense_words).to(torch.int32)
    assert torch.equal(oc.ref_unpack(dense_words, 3, 16)[0], short[0])
    w, fmt = _three_bit(dense_words, 16, None)
    assert torch.equal(w.data[0].long(), short[0])
    assert any("look alike" in n for n in fmt.notes)


# ------------------------------------------------------------------------------------------------
# The real library as oracle: its packer -> our decoder, our writer -> its unpacker


def _library_packed(bits: int, strategy: str, symmetric: bool, n: int = 24) -> dict[str, Any]:
    assert LIB is not None
    k = 96 if strategy == "group" else 100  # the library dequantizes whole groups only; channel: ragged words
    gen = torch.Generator().manual_seed(bits * 10 + symmetric)
    half = 1 << (bits - 1)
    q = torch.randint(-half, half, (n, k), generator=gen).to(torch.int8)
    ng = -(-k // 32) if strategy == "group" else 1
    zp = torch.randint(-half, half, (n, ng), generator=gen).to(torch.int8)
    scale = (torch.rand(n, ng, generator=gen) + 0.05).to(torch.bfloat16)
    stored = {
        f"{P}.weight_packed": LIB.pack_to_int32(q, bits),
        f"{P}.weight_scale": scale,
        f"{P}.weight_shape": torch.tensor([n, k]),
    }
    if not symmetric:
        stored[f"{P}.weight_zero_point"] = LIB.pack_to_int32(zp, bits, packed_dim=0)
    return {"stored": stored, "q": q, "zp": zp}


@needs_lib
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("strategy", ["group", "channel"])
def test_library_packed_layers_decode_to_its_codes(bits: int, symmetric: bool, strategy: str) -> None:
    case = _library_packed(bits, strategy, symmetric)
    weights = oc.int_weights(bits, strategy, 32, symmetric)
    cfg = oc.ct_config({"group_0": oc.group(weights, "pack-quantized")})
    w = decode_layer(cfg, case["stored"])
    half = 1 << (bits - 1)
    assert torch.equal(w.data.long(), case["q"].long() + half)
    if symmetric and bits in (2, 3, 4, 8):
        assert w.zero is None
    else:  # asymmetric, or 5..7-bit codes widened to uint8 with their offset as explicit zeros
        want = case["zp"].long() + half if not symmetric else torch.full_like(case["zp"], half).long()
        assert w.zero is not None and torch.equal(w.zero.long(), want.reshape(w.zero.shape))
    assert w.spec.weight == ("uint8" if bits > 4 else f"uint{bits}")
    # the library's own decompression (fp32 scales: products are exact) against ours
    scheme = LIB.QuantizationScheme(targets=["Linear"], weights=weights)
    sd = {k.rsplit(".", 1)[1]: v for k, v in case["stored"].items()}
    sd["weight_scale"] = sd["weight_scale"].float()
    lib_dense = LIB.Packed.decompress(sd, scheme)["weight"]
    assert torch.equal(oc.canon_dense(w).float(), lib_dense)


@needs_lib
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_writer_packing_unpacks_with_the_library(bits: int, symmetric: bool, group_size: int) -> None:
    assert LIB is not None
    torch.manual_seed(bits)
    writer = writer_class("compressed-tensors")(WriteOptions(bits=bits, group_size=group_size, sym=symmetric))
    dense = torch.randn(40, 96, dtype=torch.bfloat16)
    spec = writer.spec_for(P, (40, 96), "linear")
    assert isinstance(spec, QuantSpec)
    w = quantize_rtn(dense, spec, writer.scale_dtype(torch.bfloat16))
    out = writer.encode(P, w)
    half = 1 << (bits - 1)
    codes = LIB.unpack_from_int32(out[f"{P}.weight_packed"], bits, torch.Size([40, 96]))
    assert torch.equal(codes.long(), w.data.long() - half)
    if not symmetric:
        assert w.zero is not None
        packed_zp = out[f"{P}.weight_zero_point"]
        zp = LIB.unpack_from_int32(packed_zp, bits, torch.Size([40, packed_zp.shape[1]]), packed_dim=0)
        assert torch.equal(zp.long(), w.zero.long().reshape(40, -1) - half)


# ------------------------------------------------------------------------------------------------
# Writer: presets, round trip, byte-identical to the library's compressors and config

SCHEMES = ["W2A16", "W3A16", "W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8", "FP8_DYNAMIC", "FP8_BLOCK"]
EXPECTED_SPECS = {
    "W2A16": "uint2 group128 sym weight-only",
    "W3A16": "uint3 group128 sym weight-only",
    "W4A16": "uint4 group128 sym weight-only",
    "W4A16_ASYM": "uint4 group128 asym weight-only",
    "W8A16": "uint8 group128 sym weight-only",
    "W8A8": "int8 per-channel sym act int8 dynamic per-token",
    "FP8": "fp8_e4m3 per-tensor act fp8_e4m3 static per-tensor",
    "FP8_DYNAMIC": "fp8_e4m3 per-channel act fp8_e4m3 dynamic per-token",
    "FP8_BLOCK": "fp8_e4m3 block128x128 act fp8_e4m3 dynamic per-group128",
}


def _write(
    options: WriteOptions, shape: tuple[int, ...], prefix: str = P
) -> tuple[Any, QuantWeight, dict[str, Tensor]]:
    writer = writer_class("compressed-tensors")(options)
    gen = torch.Generator().manual_seed(sum(shape))
    dense = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    spec = writer.spec_for(prefix, (shape[-2], shape[-1]), "linear")
    assert isinstance(spec, QuantSpec), spec
    w = quantize_rtn(dense, spec, writer.scale_dtype(torch.bfloat16))
    if spec.act is not None and not spec.act.dynamic:
        w.input_scale = writer.input_scale(prefix)
    return writer, w, writer.encode(prefix, w.validate(prefix))


def _bits(t: Tensor) -> Tensor:
    # fp8 tensors are compared as bytes: torch.equal on float8 is not supported everywhere
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def _assert_same(a: QuantWeight, b: QuantWeight) -> None:
    assert a.spec == b.spec and a.shape == b.shape
    for attr in ("data", "scale", "zero", "group_index", "input_scale", "input_zero"):
        x, y = getattr(a, attr), getattr(b, attr)
        assert (x is None) == (y is None), attr
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(_bits(x), _bits(y)), attr


AMAX = {P: 3.5}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_writer_round_trip_is_exact(scheme: str) -> None:
    writer, w, out = _write(WriteOptions(scheme=scheme, extra={"act_amax": AMAX}), (48, 384))
    assert w.spec.describe() == EXPECTED_SPECS[scheme]
    cfg = json.loads(json.dumps(writer.quantization_config([])))
    fmt = reader(cfg, out)
    spec = fmt.spec_for(P, "linear")
    assert spec == w.spec
    assert set(fmt.stored_names(P, spec).required) == set(out)
    _assert_same(fmt.decode(P, spec, out), w)
    assert not fmt.notes
    for name, t in out.items():
        if name.endswith(("_scale",)):
            assert t.dtype == torch.bfloat16, name


@pytest.mark.parametrize(
    ("options", "want"),
    [
        (WriteOptions(bits=4, group_size=64, sym=False), "uint4 group64 asym weight-only"),
        (WriteOptions(bits=8, group_size=-1, sym=True), "uint8 per-channel sym weight-only"),
        (WriteOptions(bits=2, group_size=32, sym=True), "uint2 group32 sym weight-only"),
        (WriteOptions(bits=8, group_size=-1, sym=False, act="int8-dynamic"),
         "int8 per-channel asym act int8 dynamic per-token"),
        (WriteOptions(bits=8, group_size=-1, sym=True, act="int8-static", extra={"act_amax": AMAX}),
         "int8 per-channel sym act int8 static per-tensor"),
        (WriteOptions(act="fp8-dynamic"), "fp8_e4m3 per-channel act fp8_e4m3 dynamic per-token"),
    ],
)  # fmt: skip
def test_writer_derives_a_scheme_and_round_trips(options: WriteOptions, want: str) -> None:
    writer, w, out = _write(options, (48, 320))
    assert w.spec.describe() == want
    fmt = reader(json.loads(json.dumps(writer.quantization_config([]))), out)
    spec = fmt.spec_for(P, "linear")
    assert spec == w.spec
    _assert_same(fmt.decode(P, spec, out), w)


@pytest.mark.parametrize("scheme", ["W4A16_ASYM", "W3A16", "FP8_BLOCK", "W8A8"])
def test_writer_round_trip_with_an_expert_dimension(scheme: str) -> None:
    writer, w, out = _write(WriteOptions(scheme=scheme), (3, 40, 256))
    fmt = reader(writer.quantization_config([]), out)
    spec = fmt.spec_for(P, "experts")
    assert spec == w.spec
    _assert_same(fmt.decode(P, spec, out), w)


def test_writer_static_scale_comes_from_calibration_amax() -> None:
    writer = writer_class("compressed-tensors")(WriteOptions(scheme="FP8"))
    reason = writer.spec_for(P, (64, 64), "linear")
    assert isinstance(reason, str) and "act_amax" in reason
    writer = writer_class("compressed-tensors")(WriteOptions(scheme="FP8", extra={"act_amax": {P: 4.48}}))
    writer.scale_dtype(torch.bfloat16)
    scale = writer.input_scale(P)
    assert scale is not None and scale.dtype == torch.float32 and scale.shape == ()
    assert float(scale) == float(torch.tensor(4.48 / 448, dtype=torch.float64).to(torch.bfloat16))
    with pytest.raises(NumericsError, match="amax"):
        writer_class("compressed-tensors")(
            WriteOptions(scheme="FP8", extra={"act_amax": {P: float("nan")}})
        ).input_scale(P)


def test_writer_refuses_weights_of_another_spec() -> None:
    _, w, _ = _write(WriteOptions(scheme="W4A16"), (16, 128))
    writer = writer_class("compressed-tensors")(WriteOptions(scheme="W4A16_ASYM"))
    with pytest.raises(UnsupportedError, match="uint4 group128 sym"):
        writer.encode(P, w)


def test_writer_skips_and_ignore_list() -> None:
    writer = writer_class("compressed-tensors")(WriteOptions(scheme="W4A16"))
    assert isinstance(writer.spec_for("model.embed_tokens", (1024, 64), "embedding"), str)
    cfg = writer.quantization_config(["model.layers.0.mlp.gate"])
    assert cfg["ignore"] == ["model.layers.0.mlp.gate", "lm_head"]
    assert isinstance(writer.spec_for("lm_head", (1024, 128), "lm_head"), QuantSpec)  # --quantize-lm-head
    # Ragged groups: the library compresses them but its own loader refuses them, so we skip the layer.
    reason = writer.spec_for("model.layers.0.mlp.down_proj", (64, 320), "linear")
    assert isinstance(reason, str) and "320 is not a multiple of the group size 128" in reason
    assert writer.quantization_config([])["ignore"] == []


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (WriteOptions(scheme="NVFP4"), UnsupportedError),
        (WriteOptions(bits=4, act_order=True), UnsupportedError),
        (WriteOptions(bits=5), UnsupportedError),
        (WriteOptions(bits=4, act="int8-dynamic"), UnsupportedError),
        (WriteOptions(bits=4, group_size=100), QuantConfigError),
    ],
)
def test_writer_rejects_what_the_tool_cannot_write(options: WriteOptions, error: type[Exception]) -> None:
    with pytest.raises(error):
        writer_class("compressed-tensors")(options)


@needs_lib
@pytest.mark.parametrize("scheme", SCHEMES)
def test_writer_config_matches_the_library(scheme: str, tmp_path: Path) -> None:
    assert LIB is not None
    lib_scheme = LIB.preset(scheme, ["Linear"])
    fmt = LIB.infer_module_format(torch.nn.Linear, lib_scheme)
    lib_scheme.format = fmt
    skipped = ["model.layers.0.mlp.gate", "lm_head"]
    cfg = LIB.QuantizationConfig(
        config_groups={"group_0": lib_scheme},
        format=fmt.value,
        quantization_status="compressed",
        ignore=skipped,
    )
    (tmp_path / "config.json").write_text("{}")
    LIB.ModelCompressor(quantization_config=cfg).update_config(str(tmp_path))
    expected = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    writer = writer_class("compressed-tensors")(WriteOptions(scheme=scheme))
    ours = json.loads(json.dumps(writer.quantization_config(skipped[:1])))
    # The version names the layout written (0.20.0, dense packing), not the installed library, so a
    # new library release cannot fail this test by its version string; the rest must be identical.
    assert ours.pop("version") == WRITTEN_VERSION and expected.pop("version") == LIB.version
    assert _parse_version(WRITTEN_VERSION) >= (0, 18) and _parse_version(LIB.version) >= (0, 18)
    assert ours == expected


def _library_state(w: QuantWeight, out: dict[str, Tensor]) -> dict[str, Tensor]:
    """What a calibrated module holds before the library compresses it (unpacked, signed zp)."""
    sd = {"weight": oc.canon_dense(w).float(), "weight_scale": out[f"{P}.weight_scale"]}
    if w.zero is not None:
        offset = 1 << (w.spec.bits - 1) if w.spec.is_uint else 0
        sd["weight_zero_point"] = (w.zero - offset).to(torch.int8).reshape(sd["weight_scale"].shape)
    if f"{P}.input_scale" in out:
        sd["input_scale"] = out[f"{P}.input_scale"]
    return sd


@needs_lib
@pytest.mark.parametrize("scheme", SCHEMES)
def test_writer_tensors_equal_the_library_compressor(scheme: str) -> None:
    assert LIB is not None
    writer, w, out = _write(WriteOptions(scheme=scheme, extra={"act_amax": AMAX}), (48, 256))
    lib_scheme = LIB.preset(scheme, ["Linear"])
    compressor = {"pack-quantized": LIB.Packed, "int-quantized": LIB.IntQ, "float-quantized": LIB.FloatQ}
    lib_out = compressor[writer.format].compress(_library_state(w, out), lib_scheme)
    assert set(lib_out) == {n.rsplit(".", 1)[1] for n in out}
    for name, tensor in out.items():
        theirs = lib_out[name.rsplit(".", 1)[1]]
        assert theirs.dtype == tensor.dtype and theirs.shape == tensor.shape, name
        assert torch.equal(_bits(theirs), _bits(tensor)), name


@needs_lib
def test_static_input_scale_matches_library_qparams() -> None:
    assert LIB is not None
    for amax in (3.5, 0.0123, 77.0):
        writer = writer_class("compressed-tensors")(WriteOptions(scheme="FP8", extra={"act_amax": {P: amax}}))
        writer.scale_dtype(torch.bfloat16)
        acts = LIB.preset("FP8", ["Linear"]).input_activations
        a = torch.tensor([amax], dtype=torch.float64)
        lib_scale, _ = LIB.calculate_qparams(-a, a, acts)
        assert float(writer.input_scale(P)) == float(lib_scale.to(torch.bfloat16))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Third-party fixtures written by llm-compressor


def _fixture(third_party: Path, name: str) -> tuple[Checkpoint, QuantFormat]:
    ckpt = Checkpoint(third_party / name)
    found = ckpt.quant_config()
    assert found is not None
    return ckpt, format_class(found.config["quant_method"]).from_checkpoint(
        found.config, ckpt.index, found.where
    )


def _linear_prefixes(ckpt: Checkpoint, suffix: str) -> list[str]:
    return sorted(n.removesuffix(suffix) for n in ckpt.index if n.endswith(suffix) and ".layers." in n)


def test_llmc_w4a16_fixture(third_party: Path) -> None:
    ckpt, fmt = _fixture(third_party, "llama-w4a16-g128-gptq-llmc")
    prefixes = _linear_prefixes(ckpt, ".weight_packed")
    assert len(prefixes) == 14
    assert fmt.spec_for("lm_head", "lm_head") is None
    cfg = ckpt.quant_config().config["config_groups"]["group_0"]  # type: ignore[union-attr]
    for prefix in prefixes:
        spec = fmt.spec_for(prefix, "linear")
        assert spec == QuantSpec("uint4", "group", group_size=128), prefix
        stored = ckpt.read_many(fmt.stored_names(prefix, spec).all())
        w = fmt.decode(prefix, spec, stored)
        dense = oc.canon_dense(w)
        assert torch.equal(dense, oc.ref_dequant_packed(stored, prefix, 4, 128, symmetric=True)), prefix
        if LIB is not None:
            sd = {k.rsplit(".", 1)[1]: v for k, v in stored.items()}
            sd["weight_scale"] = sd["weight_scale"].float()
            lib = LIB.Packed.decompress(sd, LIB.QuantizationScheme.model_validate(cfg))["weight"]
            assert torch.equal(dense.float(), lib), prefix
    assert not fmt.notes


def test_llmc_fp8_dynamic_fixture(third_party: Path) -> None:
    ckpt, fmt = _fixture(third_party, "llama-fp8dynamic-llmc")
    prefixes = _linear_prefixes(ckpt, ".weight_scale")
    assert len(prefixes) == 14
    assert fmt.spec_for("lm_head", "lm_head") is None
    want = QuantSpec("fp8_e4m3", "channel", act=ActQuant("fp8_e4m3", dynamic=True, granularity="token"))
    cfg = ckpt.quant_config().config["config_groups"]["group_0"]  # type: ignore[union-attr]
    for prefix in prefixes:
        spec = fmt.spec_for(prefix, "linear")
        assert spec == want, prefix
        stored = ckpt.read_many(fmt.stored_names(prefix, spec).all())
        dense = oc.canon_dense(fmt.decode(prefix, spec, stored))
        ref = stored[f"{prefix}.weight"].double() * stored[f"{prefix}.weight_scale"].double()
        assert torch.equal(dense, ref), prefix
        if LIB is not None:
            sd = {
                "weight": stored[f"{prefix}.weight"],
                "weight_scale": stored[f"{prefix}.weight_scale"].float(),
            }
            lib = LIB.FloatQ.decompress(sd, LIB.QuantizationScheme.model_validate(cfg))["weight"]
            assert torch.equal(dense.float(), lib), prefix
    assert not fmt.notes


# ------------------------------------------------------------------------------------------------
# Detection table (headers only)


def packed_h(prefix: str, bits: int = 4, n: int = 64, k: int = 256, ng: int = 2, zp: bool = False,
             gidx: bool = False) -> dict[str, tuple[str, tuple[int, ...]]]:  # fmt: skip
    h = {
        f"{prefix}.weight_packed": ("I32", (n, -(-k * bits // 32))),
        f"{prefix}.weight_scale": ("BF16", (n, ng)),
        f"{prefix}.weight_shape": ("I64", (2,)),
    }
    if zp:
        h[f"{prefix}.weight_zero_point"] = ("I32", (-(-n * bits // 32), ng))
    if gidx:
        h[f"{prefix}.weight_g_idx"] = ("I32", (k,))
    return h


def dense_h(prefix: str, extra: tuple[str, ...] = ()) -> dict[str, tuple[str, tuple[int, ...]]]:
    h = {f"{prefix}.weight": ("BF16", (64, 256))}
    h.update({f"{prefix}.{s}": ("BF16", (64, 1)) for s in extra})
    return h


def q8_h(prefix: str, dtype: str = "I8", scale: tuple[int, ...] = (64, 1), *extra: str) -> dict[str, Any]:
    h: dict[str, Any] = {f"{prefix}.weight": (dtype, (64, 256)), f"{prefix}.weight_scale": ("BF16", scale)}
    h.update({f"{prefix}.{s}": ("BF16" if "scale" in s else "I8", (1,)) for s in extra})
    return h


W4 = oc.int_weights(4)
W8CH = oc.int_weights(8, "channel")
TOKEN_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
FP8_W = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
FP8_STATIC = {**FP8_W, "observer": "static_minmax"}
G = "model.layers.0.mlp.gate"
GP = "model.layers.0.mlp.gate_proj"
D1 = "model.layers.1.mlp.down_proj"

ROWS: list[tuple[str, dict[str, Any], dict[str, Any], str, str, str | None, str | None]] = [
    # (id, config, headers, prefix, kind, expected describe() or None, expected note substring)
    ("w4a16", oc.ct_config({"g": oc.group(W4)}), packed_h(Q), Q, "linear",
     "uint4 group128 sym weight-only", None),
    ("lm_head ignored", oc.ct_config({"g": oc.group(W4)}), dense_h("lm_head"), "lm_head", "lm_head", None, None),
    ("tied lm_head targeted", oc.ct_config({"g": oc.group(W4)}, ignore=[]), {}, "lm_head", "lm_head", None, None),
    ("ignore regex", oc.ct_config({"g": oc.group(W4)}, ignore=["re:.*mlp\\.gate$"]), dense_h(G), G, "linear",
     None, None),
    ("ignore regex not a substring", oc.ct_config({"g": oc.group(W4)}, ignore=["re:.*mlp\\.gate$"]),
     packed_h(GP), GP, "linear", "uint4 group128 sym weight-only", None),
    ("ignore re.match anchored at start", oc.ct_config({"g": oc.group(W4)}, ignore=["re:mlp"]), packed_h(P), P,
     "linear", "uint4 group128 sym weight-only", None),
    ("ignore class name", oc.ct_config({"g": oc.group(W4)}, ignore=["Linear"]), dense_h(P), P, "linear", None,
     None),
    ("ignored but quantized", oc.ct_config({"g": oc.group(W4)}, ignore=[P]), packed_h(P), P, "linear",
     "uint4 group128 sym weight-only", "listed in 'ignore'"),
    ("targeted but dense", oc.ct_config({"g": oc.group(W4)}), dense_h(P), P, "linear", None,
     "plain float weight"),
    ("untargeted but quantized", oc.ct_config({"g": oc.group(W4, targets=["re:.*self_attn.*"])}), packed_h(P), P,
     "linear", "uint4 group128 sym weight-only", "no config group targets it"),
    ("zero-size packed, plain weight", oc.ct_config({"g": oc.group(W4)}),
     {**dense_h(P), f"{P}.weight_packed": ("I32", (64, 0))}, P, "linear", None, "plain float weight"),
    ("frozen status", oc.ct_config({"g": oc.group(W4)}, quantization_status="frozen", format="dense"),
     dense_h(P, ("weight_scale",)), P, "linear", None, "frozen"),
    ("exact beats regex beats class", oc.ct_config({
        "a": oc.group(W4), "b": oc.group(W8CH, targets=["re:.*down_proj$"]),
        "c": oc.group(oc.int_weights(4, group_size=32, symmetric=False), targets=[D1])}),
     packed_h(D1, ng=8, zp=True), D1, "linear", "uint4 group32 asym weight-only", None),
    ("regex beats class", oc.ct_config({"a": oc.group(W4), "b": oc.group(W8CH, targets=["re:.*down_proj$"])}),
     packed_h(P, bits=8, ng=1), P, "linear", "uint8 per-channel sym weight-only", None),
    ("regexes in sorted order", oc.ct_config({"a": oc.group(W4, targets=["re:model.*"]),
                                              "b": oc.group(W8CH, targets=["re:.*down_proj$"])}),
     packed_h(P, bits=8, ng=1), P, "linear", "uint8 per-channel sym weight-only", None),
    ("mixed precision int8", oc.ct_config({
        "a": oc.group(W8CH, "int-quantized", ["re:.*self_attn.*"], TOKEN_INT8),
        "b": oc.group(W4, "pack-quantized", ["re:.*mlp.*"])}, format="mixed-precision"),
     q8_h(Q), Q, "linear", "int8 per-channel sym act int8 dynamic per-token", None),
    ("mixed precision packed", oc.ct_config({
        "a": oc.group(W8CH, "int-quantized", ["re:.*self_attn.*"], TOKEN_INT8),
        "b": oc.group(W4, "pack-quantized", ["re:.*mlp.*"])}, format="mixed-precision"),
     packed_h(P), P, "linear", "uint4 group128 sym weight-only", None),
    ("group format from tensors", oc.ct_config({"b": oc.group(W4)}, format="mixed-precision"), packed_h(P), P,
     "linear", "uint4 group128 sym weight-only", "read as pack-quantized"),
    ("act-order g_idx", oc.ct_config({"g": oc.group({**W4, "actorder": "group"})}), packed_h(P, gidx=True), P,
     "linear", "uint4 group128 sym act-order weight-only", None),
    ("g_idx without actorder", oc.ct_config({"g": oc.group(W4)}), packed_h(P, gidx=True), P, "linear",
     "uint4 group128 sym act-order weight-only", "weight_g_idx present"),
    ("tensor strategy packed", oc.ct_config({"g": oc.group(oc.int_weights(4, "tensor"))}),
     packed_h(P, ng=1), P, "linear", "uint4 per-channel sym weight-only", None),
    ("5-bit widened", oc.ct_config({"g": oc.group(oc.int_weights(5))}), packed_h(P, bits=5), P, "linear",
     "uint8 group128 asym weight-only", None),
    ("preset reference", oc.ct_config({"W4A16": ["Linear"]}), packed_h(P), P, "linear",
     "uint4 group128 sym weight-only", None),
    ("fp8 static", oc.ct_config({"g": oc.group(FP8_W, "float-quantized", acts=FP8_STATIC)}),
     q8_h(P, "F8_E4M3", (1,), "input_scale"), P, "linear", "fp8_e4m3 per-tensor act fp8_e4m3 static per-tensor",
     None),
    ("fp8 block", oc.ct_config({"g": oc.group({**FP8_W, "strategy": "block", "block_structure": [128, 128]},
                                             "float-quantized", acts={**TOKEN_INT8, "type": "float",
                                                                      "strategy": "group", "group_size": 128})}),
     q8_h(P, "F8_E4M3", (1, 2)), P, "linear", "fp8_e4m3 block128x128 act fp8_e4m3 dynamic per-group128", None),
    ("fp8 group is 1xG block", oc.ct_config({"g": oc.group({**FP8_W, "strategy": "group", "group_size": 128},
                                                          "naive-quantized")}),
     q8_h(P, "F8_E4M3", (64, 2)), P, "linear", "fp8_e4m3 block1x128 weight-only", None),
    ("int8 static asym acts", oc.ct_config({"g": oc.group(W8CH, "int-quantized", acts={
        "num_bits": 8, "type": "int", "symmetric": False, "strategy": "tensor", "dynamic": False})}),
     q8_h(P, "I8", (64, 1), "input_scale", "input_zero_point"), P, "linear",
     "int8 per-channel sym act int8 static per-tensor asym", None),
    ("W4AFP8 int-quantized", oc.ct_config({"g": oc.group(W4, "int-quantized", acts={
        **TOKEN_INT8, "type": "float"})}), q8_h(P, "I8", (64, 2)), P, "linear",
     "int8 group128 sym act fp8_e4m3 dynamic per-token", None),
    ("old strategy-less config", oc.ct_config({"g": oc.group({"num_bits": 4, "group_size": -1})}),
     packed_h(P, ng=1), P, "linear", "uint4 per-channel sym weight-only", None),
]  # fmt: skip


@pytest.mark.parametrize(("config", "headers", "prefix", "kind", "want", "note"), [r[1:] for r in ROWS],
                         ids=[r[0] for r in ROWS])  # fmt: skip
def test_detection_table(
    config: dict[str, Any],
    headers: dict[str, Any],
    prefix: str,
    kind: Any,
    want: str | None,
    note: str | None,
) -> None:
    fmt = reader(config, headers=headers)
    spec = fmt.spec_for(prefix, kind)
    assert (spec.describe() if spec else None) == want
    if note is None:
        assert not any(prefix in n for n in fmt.notes), fmt.notes
    else:
        assert any(note in n for n in fmt.notes), fmt.notes


def test_frozen_checkpoint_qparams_are_ignorable() -> None:
    fmt = reader(oc.ct_config({"g": oc.group(W4)}, quantization_status="frozen"), headers=dense_h(P))
    assert fmt.ignored_tensor(f"{P}.weight_scale") and not fmt.ignored_tensor(f"{P}.weight")
    kv = reader(
        oc.ct_config({"g": oc.group(W4)}, kv_cache_scheme={"num_bits": 8, "type": "float"}), headers={}
    )
    assert kv.ignored_tensor("model.layers.0.self_attn.k_scale")


ERROR_ROWS: list[tuple[str, dict[str, Any], dict[str, Any], str, type[Exception], str]] = [
    ("zero-size packed, no weight", oc.ct_config({"g": oc.group(W4)}), {f"{P}.weight_packed": ("I32", (64, 0))},
     P, TensorError, f"{P}.weight"),
    ("missing scale", oc.ct_config({"g": oc.group(W4)}),
     {k: v for k, v in packed_h(P).items() if "scale" not in k}, P, TensorError, f"{P}.weight_scale"),
    ("empty weight_shape", oc.ct_config({"g": oc.group(W4)}), {**packed_h(P), f"{P}.weight_shape": ("I64", (0,))},
     P, TensorError, f"{P}.weight_shape"),
    ("asym without zero point", oc.ct_config({"g": oc.group({**W4, "symmetric": False})}), packed_h(P), P,
     TensorError, f"{P}.weight_zero_point"),
    ("static without input_scale", oc.ct_config({"g": oc.group(FP8_W, "float-quantized", acts=FP8_STATIC)}),
     q8_h(P, "F8_E4M3", (1,)), P, TensorError, f"{P}.input_scale"),
    ("pack-quantized config, int8 tensors", oc.ct_config({"g": oc.group(W8CH, "pack-quantized")}), q8_h(P), P,
     TensorError, "weight_packed"),
    ("int weights, fp8 tensors", oc.ct_config({"g": oc.group(W8CH, "naive-quantized")}),
     q8_h(P, "F8_E4M3"), P, TensorError, f"{P}.weight': holds weight (F8_E4M3)"),
    ("two groups could describe an untargeted layer", oc.ct_config({
        "a": oc.group(W4, targets=["re:.*self_attn.*"]), "b": oc.group(W8CH, targets=["re:.*embed.*"])}),
     packed_h(P), P, QuantConfigError, P),
]  # fmt: skip


@pytest.mark.parametrize(("config", "headers", "prefix", "error", "names"), [r[1:] for r in ERROR_ROWS],
                         ids=[r[0] for r in ERROR_ROWS])  # fmt: skip
def test_detection_errors(
    config: dict[str, Any], headers: dict[str, Any], prefix: str, error: type[Exception], names: str
) -> None:
    fmt = reader(config, headers=headers)
    with pytest.raises(error, match=re.escape(names)):
        fmt.spec_for(prefix, "linear")


def _rejected(**changes: Any) -> dict[str, Any]:
    cfg = oc.ct_config({"group_0": oc.group(W4, "pack-quantized")})
    for key, value in changes.items():
        if key.startswith("group_"):
            cfg["config_groups"]["group_0"][key.removeprefix("group_")] = value
        else:
            cfg[key] = value
    return cfg


REJECTED = [
    ("marlin-24", _rejected(format="marlin-24"), "format"),
    ("nvfp4", _rejected(format="nvfp4-pack-quantized"), "format"),
    ("mxfp4 group format", _rejected(group_format="mxfp4-pack-quantized"), "config_groups.group_0.format"),
    ("unknown format", _rejected(format="bitblas"), "format"),
    ("sparsity", _rejected(sparsity_config={"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}),
     "sparsity_config"),
    ("transform", _rejected(transform_config={"config_groups": {"u": {"type": "hadamard"}}}), "transform_config"),
    ("moe sparsity", _rejected(moe_sparsity_config={"method": "prune"}), "moe_sparsity_config"),
    ("output activations", _rejected(group_output_activations=TOKEN_INT8), "output_activations"),
    ("int4 activations", _rejected(group_input_activations={**TOKEN_INT8, "num_bits": 4}),
     "input_activations.num_bits"),
    ("fp4 weights", _rejected(group_weights={**FP8_W, "num_bits": 4, "strategy": "tensor_group",
                                             "group_size": 16}), "weights.num_bits"),
    ("local dynamic", _rejected(group_input_activations={**TOKEN_INT8, "dynamic": "local"}), "dynamic"),
    ("bad status", _rejected(quantization_status="bogus"), "quantization_status"),
    ("no config groups", _rejected(config_groups={}), "config_groups"),
    ("bad regex", _rejected(ignore=["re:(unclosed"]), "ignore[0]"),
    ("group size not a multiple of 8", _rejected(group_weights={**W4, "group_size": 100}), "group_size"),
    ("int block scales", _rejected(group_weights={**W8CH, "strategy": "block", "block_structure": [128, 128]}),
     "weights.strategy"),
    ("unknown preset", oc.ct_config({"W9A16": ["Linear"]}), "W9A16"),
]  # fmt: skip


@pytest.mark.parametrize(("config", "field"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED])
def test_rejected_configs_name_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(QuantConfigError, match=re.escape(field)):
        reader(config, headers={})


def test_empty_transform_and_sparsity_configs_are_accepted() -> None:
    fmt = reader(_rejected(transform_config={"config_groups": {}}, sparsity_config=None), headers=packed_h(P))
    assert fmt.spec_for(P, "linear") is not None


# ------------------------------------------------------------------------------------------------
# Bad stored tensors: errors name the tensor


def _valid(scheme: str = "W4A16_ASYM") -> tuple[dict[str, Any], dict[str, Tensor]]:
    writer, _, out = _write(WriteOptions(scheme=scheme, extra={"act_amax": AMAX}), (48, 256))
    return writer.quantization_config([]), out


def _gidx(out: dict[str, Tensor], values: Tensor) -> dict[str, Tensor]:
    return {**out, f"{P}.weight_g_idx": values}


BAD = [
    ("packed dtype", "W4A16_ASYM", lambda o: {**o, f"{P}.weight_packed": o[f"{P}.weight_packed"].to(torch.int64)},
     TensorError, "weight_packed"),
    ("weight_shape N", "W4A16_ASYM", lambda o: {**o, f"{P}.weight_shape": torch.tensor([40, 256])},
     TensorError, "weight_packed"),
    ("weight_shape K", "W4A16_ASYM", lambda o: {**o, f"{P}.weight_shape": torch.tensor([48, 512])},
     TensorError, "weight_packed"),
    ("weight_shape rank", "W4A16_ASYM", lambda o: {**o, f"{P}.weight_shape": torch.tensor([48, 256, 1])},
     TensorError, "weight_shape"),
    ("weight_shape dtype", "W4A16_ASYM", lambda o: {**o, f"{P}.weight_shape": torch.tensor([48.0, 256.0])},
     TensorError, "weight_shape"),
    ("scale shape", "W4A16_ASYM", lambda o: {**o, f"{P}.weight_scale": o[f"{P}.weight_scale"][:, :1]},
     TensorError, "weight_scale"),
    ("scale dtype", "W4A16_ASYM", lambda o: {**o, f"{P}.weight_scale": o[f"{P}.weight_scale"].to(torch.int32)},
     TensorError, "weight_scale"),
    ("NaN scale", "W4A16_ASYM",
     lambda o: {**o, f"{P}.weight_scale": o[f"{P}.weight_scale"].index_fill(0, torch.tensor([3]), float("nan"))},
     NumericsError, "weight_scale"),
    ("zero point shape", "W4A16_ASYM",
     lambda o: {**o, f"{P}.weight_zero_point": o[f"{P}.weight_zero_point"][:, :1]}, TensorError, "weight_zero_point"),
    ("non-zero zero points for sym", "W4A16",
     lambda o: {**o, f"{P}.weight_zero_point": torch.full((6, 2), 0x11111111, dtype=torch.int32)},
     TensorError, "weight_zero_point"),
    ("g_idx out of range", "W4A16", lambda o: _gidx(o, torch.full((256,), 2, dtype=torch.int32)),
     TensorError, "weight_g_idx"),
    ("g_idx shape", "W4A16", lambda o: _gidx(o, torch.zeros(255, dtype=torch.int32)), TensorError, "weight_g_idx"),
    ("fp8 weight dtype", "FP8_DYNAMIC", lambda o: {**o, f"{P}.weight": o[f"{P}.weight"].view(torch.int8)},
     TensorError, f"{P}.weight"),
    ("int8 scale shape", "W8A8", lambda o: {**o, f"{P}.weight_scale": o[f"{P}.weight_scale"][:47]},
     TensorError, "weight_scale"),
    ("fp8 NaN code", "FP8_DYNAMIC",
     lambda o: {**o, f"{P}.weight": o[f"{P}.weight"].view(torch.uint8).index_fill(1, torch.tensor([5]), 0x7F)
                .view(torch.float8_e4m3fn)}, NumericsError, f"{P}.weight"),
    ("input_scale NaN", "FP8", lambda o: {**o, f"{P}.input_scale": torch.full((1,), float("nan"))},
     NumericsError, "input_scale"),
    ("input_scale shape", "FP8", lambda o: {**o, f"{P}.input_scale": torch.ones(2, dtype=torch.bfloat16)},
     TensorError, "input_scale"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("scheme", "corrupt", "error", "names"), [r[1:] for r in BAD], ids=[r[0] for r in BAD]
)
def test_bad_stored_tensors(scheme: str, corrupt: Any, error: type[Exception], names: str) -> None:
    config, out = _valid(scheme)
    bad = corrupt(out)
    fmt = reader(config, bad)
    with pytest.raises(error, match=re.escape(names)):
        spec = fmt.spec_for(P, "linear")
        assert spec is not None
        fmt.decode(P, spec, {n: bad[n] for n in fmt.stored_names(P, spec).all() if n in bad})


def test_old_unpacked_int8_zero_points_and_all_zero_sym_zero_points() -> None:
    config, out = _valid("W4A16_ASYM")
    w = decode_layer(config, out)
    assert w.zero is not None
    old = {**out, f"{P}.weight_zero_point": (w.zero - 8).to(torch.int8)}  # releases < 0.9.4: signed, unpacked
    _assert_same(decode_layer(config, old), w)
    sym_config, sym_out = _valid("W4A16")
    ref = decode_layer(sym_config, sym_out)
    zeros = {**sym_out, f"{P}.weight_zero_point": torch.zeros(48, 2, dtype=torch.int8)}
    fmt = reader(sym_config, zeros)
    spec = fmt.spec_for(P, "linear")
    assert spec is not None and f"{P}.weight_zero_point" in fmt.stored_names(P, spec).optional
    _assert_same(fmt.decode(P, spec, zeros), ref)
