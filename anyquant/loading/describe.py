"""Describe a checkpoint without reading tensor data: format, per-layer scheme, kernel, notes.

Owns the JSON document that `anyquant inspect --json` prints and the grouping of layers that
share a pattern and a scheme. It uses the same plan as the loader, so what it says is what
loading will do.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from anyquant.loading.checkpoint import Checkpoint
from anyquant.loading.loader import build_on_meta, resolve_dtype
from anyquant.loading.plan import LayerPlan, plan_layers
from anyquant.models.registry import architecture_of
from anyquant.quant.detect import detect_format
from anyquant.quant.spec import QuantSpec


def layer_pattern(prefix: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", prefix)


def spec_json(spec: QuantSpec | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    out = asdict(spec)
    out.pop("extra", None)
    out["bits"] = spec.bits
    out["description"] = spec.describe()
    return out


def describe_checkpoint(
    path: str | Path, device: str = "cpu", dtype: str = "auto", kernel: str | None = None
) -> dict[str, Any]:
    ckpt = Checkpoint(path)
    config = ckpt.text_config()
    fmt = detect_format(ckpt)
    dev = torch.device(device)
    compute_dtype = resolve_dtype(dtype, config, dev)
    model = build_on_meta(config, ckpt.index.names())
    plans = plan_layers(ckpt, fmt, model, dev, compute_dtype, kernel)
    source = ckpt.quant_config()
    groups: dict[tuple[str, str, str], list[LayerPlan]] = {}
    for plan in plans:
        key = (
            layer_pattern(plan.prefix),
            plan.spec.describe() if plan.spec else "unquantized",
            plan.kernel.name,
        )
        groups.setdefault(key, []).append(plan)
    group_docs = []
    total_bytes = 0
    for (pattern, _, _), members in groups.items():
        first = members[0]
        stored: dict[str, str] = {}
        nbytes = 0
        for plan in members:
            for name in plan.stored.all():
                info = ckpt.index.get(name)
                if info is None:
                    continue
                nbytes += info.numel * info.torch_dtype.itemsize
                if plan is first:
                    stored[name.removeprefix(plan.prefix + ".")] = f"{info.dtype}{list(info.shape)}"
        total_bytes += nbytes
        group_docs.append(
            {
                "pattern": pattern,
                "count": len(members),
                "layers": [p.prefix for p in members],
                "kind": first.kind,
                "shape": list(first.shape) if all(p.shape == first.shape for p in members) else None,
                "scheme": spec_json(first.spec),
                "stored": stored,
                "bytes": nbytes,
                "kernel": first.kernel.name,
                "rejected_kernels": [{"kernel": k, "reason": r} for k, r in first.kernel.rejected],
            }
        )
    return {
        "model": str(ckpt.path),
        "architecture": architecture_of(config),
        "format": None
        if fmt is None
        else {
            "name": fmt.name,
            "description": fmt.describe(),
            "config_source": source.where if source else None,
        },
        "device": str(dev),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "notes": list(fmt.notes) if fmt else [],
        "groups": group_docs,
        "unquantized_layers": [p.prefix for p in plans if p.spec is None],
        "totals": {
            "linear_layers": len(plans),
            "quantized_layers": sum(p.spec is not None for p in plans),
            "linear_weight_bytes": total_bytes,
            "checkpoint_tensors": len(ckpt.index),
        },
    }
