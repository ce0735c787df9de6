"""`inspect` says whether each MoE block's routed experts run as one fused call, from headers only;
the loader decides on the loaded kernels. Both must agree on every committed third-party MoE
fixture (AWQ, GPTQ incl. act-order, compressed-tensors W4A16 / W8A8 int8 / FP8 dynamic / FP8 block)."""

from __future__ import annotations

from pathlib import Path

import pytest

from anyquant.layers.moe import SparseMoE
from anyquant.loading.describe import describe_checkpoint
from anyquant.loading.loader import load_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "third_party_moe"
MOE = sorted(d.name for d in FIXTURES.iterdir() if d.is_dir() and ("moe" in d.name or "mixtral" in d.name))


@pytest.mark.parametrize("name", MOE)
def test_inspect_predicts_the_fused_call(name: str) -> None:
    path = FIXTURES / name
    docs = describe_checkpoint(path, dtype="bfloat16")["moe_layers"]
    blocks = [m for m in load_model(path, dtype="bfloat16").model.modules() if isinstance(m, SparseMoE)]
    assert docs and blocks
    predicted = {d["fused"] for d in docs}
    loaded = {b.fused is not None for b in blocks}
    assert predicted == loaded, (name, docs, {b.fused_reason for b in blocks})
