"""InternVL with a quantized language model and the vision tower + projector left unquantized, as
every real quantized InternVL ships: the tensors present decide per layer (including zero-size
quantization tensors written for the vision layers), and the logits on a prompt with an image equal
transformers' InternVL holding the dequantized weights. lmdeploy `lite smooth_quant` nests its
quantization_config inside `llm_config` and leaves `vision_model` / `mlp1` untouched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from anyquant.convert.quantize import quantize_checkpoint
from anyquant.engine.kv_cache import SequenceCache
from anyquant.loading.loader import load_model
from anyquant.quant.formats.base import WriteOptions
from tests.helpers.errors import rel_err
from tests.loading.test_formats_end_to_end import fake_quant
from tests.loading.test_third_party import dequantized_state_dict
from tests.models._internvl import IMG_CONTEXT_ID, hf_model, image_rows, original_to_hf, write_internvl

pytest.importorskip("transformers")

SKIP_VISION = [r"^vision_model\.", r"^mlp1\."]
FORMATS: dict[str, tuple[str, WriteOptions, str, Any]] = {
    "awq-qwen2": ("awq", WriteOptions(bits=4, group_size=32), "qwen2", None),
    "gptq-internlm2": ("gptq", WriteOptions(bits=4, group_size=32, sym=True), "internlm2", None),
    "ct-w4a16-qwen2": ("compressed-tensors", WriteOptions(scheme="W4A16", group_size=32), "qwen2", None),
    "lmdeploy-fp8-internlm2": ("lmdeploy-fp8", WriteOptions(), "internlm2", ("fp8", "token")),
    "lmdeploy-int8-qwen2": ("lmdeploy-int8", WriteOptions(), "qwen2", ("int8", "token")),
}


def _lmdeploy_layout(path: Path) -> None:
    """Where lmdeploy puts it: `llm_config.quantization_config`, no skip list (it never looks at the
    vision tower)."""
    config = json.loads((path / "config.json").read_text())
    qc = config.pop("quantization_config")
    qc.pop("modules_to_not_convert", None)
    config["llm_config"]["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(config, indent=2))


def _logits(model: Any, hf: Any, act: Any) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    ids = [256, 72, 105, 259, *([IMG_CONTEXT_ID] * 3 * model.tokens_per_tile), 260, 63, 10]
    tokens = torch.tensor(ids)
    if act is not None:
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("model.language_model.layers."):
                module.register_forward_pre_hook(lambda _m, args: (fake_quant(args[0], act),))
    with torch.inference_mode():
        rows = image_rows(tokens, model.encode_tiles(pixels))
        ctx = SequenceCache(model, len(ids), torch.float32).context(0, len(ids))
        ours = model(tokens, torch.arange(len(ids)), ctx, input_embeds=rows)
        ref = hf(input_ids=tokens[None], pixel_values=pixels).logits[0]
    return ours, ref


@pytest.mark.parametrize("case", sorted(FORMATS))
def test_quantized_language_model_with_float_vision(tmp_path: Path, case: str) -> None:
    writer, options, family, act = FORMATS[case]
    src, _ = write_internvl(tmp_path / "src", family, seed=8)
    q = tmp_path / "q"
    quantize_checkpoint(src, q, writer, options, skip=SKIP_VISION)
    if writer.startswith("lmdeploy"):
        _lmdeploy_layout(q)
    loaded = load_model(q, dtype="float32")
    kinds = {p.prefix: p.spec for p in loaded.plans}
    assert all(
        spec is None for prefix, spec in kinds.items() if prefix.startswith(("vision_model.", "mlp1."))
    )
    down = "mlp.down_proj" if family == "qwen2" else "feed_forward.w2"
    assert kinds[f"language_model.model.layers.0.{down}"] is not None
    config = json.loads((q / "config.json").read_text())
    hf = hf_model(config, original_to_hf(dequantized_state_dict(q), config))
    ours, ref = _logits(loaded.model, hf, act)
    # Weight-only: the same weights, fp32 arithmetic. W8A8: a last-bit difference can move one
    # activation to the neighbouring code (as in tests/loading/test_formats_end_to_end.py).
    budget = 1e-4 if act is None else (2e-2 if act[0] == "fp8" else 5e-3)
    assert rel_err(ours, ref) < budget


def test_zero_size_quantization_tensors_in_the_vision_tower_load_as_unquantized(tmp_path: Path) -> None:
    src, hf = write_internvl(tmp_path / "src", "qwen2", seed=9)
    q = tmp_path / "q"
    quantize_checkpoint(src, q, "awq", WriteOptions(bits=4, group_size=32), skip=SKIP_VISION)
    tensors = load_file(str(q / "model.safetensors"))
    for name in [n for n in tensors if n.startswith("vision_model.encoder.") and n.endswith(".weight")]:
        if tensors[name].dim() == 2:  # a linear: the empty tensors another tool writes for it
            prefix = name.removesuffix(".weight")
            tensors[f"{prefix}.qweight"] = torch.empty(0, dtype=torch.int32)
            tensors[f"{prefix}.qzeros"] = torch.empty(0, dtype=torch.int32)
            tensors[f"{prefix}.scales"] = torch.empty(0, dtype=torch.float16)
    save_file(tensors, str(q / "model.safetensors"))
    loaded = load_model(q, dtype="float32")
    assert all(p.spec is None for p in loaded.plans if p.prefix.startswith("vision_model."))
    config = json.loads((q / "config.json").read_text())
    state = {k: v for k, v in dequantized_state_dict(q).items() if v.numel()}
    hf = hf_model(config, original_to_hf(state, config))
    ours, ref = _logits(loaded.model, hf, None)
    assert rel_err(ours, ref) < 1e-4
