"""Tiny InternVL checkpoints in the trust_remote_code layout, and transformers' HF-layout
`InternVLForConditionalGeneration` holding the same weights, through the test's own name mapping.

Weights are drawn by transformers (seeded noise on an HF-layout model), then renamed to the
original layout for anyquant: `vision_tower.embeddings.cls_token` <-> `vision_model.embeddings.
class_embedding`, q/k/v <-> the fused `attn.qkv` (q, k, v rows one after the other),
`projection_layer` <-> `attn.proj`, `layernorm_before/after` <-> `norm1/2`, `lambda_1/2` <->
`ls1/2`, `multi_modal_projector.{layer_norm, linear_1, linear_2}` <-> `mlp1.{0, 1, 3}`. An InternLM2
language model is a Llama on the HF side (its weights moved by tests/models/_internlm2.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from anyquant.utils.tiny_model import byte_tokenizer_json
from tests.models._internlm2 import internlm2_config, llama_config_of, to_internlm2, to_llama


@dataclass(frozen=True)
class Rows:
    """Image embeddings for some rows of a step (what `input_embeds` takes)."""

    rows: torch.Tensor
    values: torch.Tensor


def image_rows(token_ids: torch.Tensor, images: torch.Tensor) -> Rows:
    """The rows holding the image token, in order, get the image embeddings [M, hidden]."""
    rows = (token_ids == IMG_CONTEXT_ID).nonzero().flatten()
    assert rows.numel() == images.shape[0], (rows.numel(), images.shape)
    return Rows(rows, images)


SPECIAL = ["<img>", "</img>", "<IMG_CONTEXT>"]  # ids 259, 260, 261 after the byte tokenizer's three
IMG_CONTEXT_ID = 261
VOCAB = 264


def _text_config(family: str) -> dict[str, Any]:
    if family == "internlm2":
        return internlm2_config(vocab_size=VOCAB, max_position_embeddings=512)
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def internvl_config(family: str, **vision: Any) -> dict[str, Any]:
    """The original InternVLChatConfig layout (vision_config / llm_config, flat extras)."""
    image_size = vision.pop("force_image_size", 56)
    vision_config = {
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "image_size": 56,
        "patch_size": 14,
        "num_channels": 3,
        "qkv_bias": True,
        "qk_normalization": False,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
    }
    vision_config.update(vision)
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "vision_config": vision_config,
        "llm_config": _text_config(family),
        "downsample_ratio": 0.5,
        "force_image_size": image_size,
        "select_layer": -1,
        "ps_version": "v2",
        "template": "internvl2_5",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 6,
        "torch_dtype": "float32",
    }


def hf_config(config: dict[str, Any]) -> Any:
    import transformers

    v = config["vision_config"]
    llm = config["llm_config"]
    if llm["architectures"][0] == "InternLM2ForCausalLM":
        text = dict(llama_config_of(llm), model_type="llama")
    else:
        text = {k: val for k, val in llm.items() if k not in ("architectures", "quantization_config")}
    return transformers.InternVLConfig(
        vision_config={
            "hidden_size": v["hidden_size"],
            "num_attention_heads": v["num_attention_heads"],
            "intermediate_size": v["intermediate_size"],
            "num_hidden_layers": v["num_hidden_layers"],
            "attention_bias": v["qkv_bias"],
            "use_qk_norm": v["qk_normalization"],
            "norm_type": v["norm_type"],
            "layer_norm_eps": v["layer_norm_eps"],
            "image_size": v["image_size"],
            "patch_size": v["patch_size"],
            "hidden_act": v["hidden_act"],
            "use_mean_pooling": True,
        },
        text_config=text,
        image_token_id=IMG_CONTEXT_ID,
        downsample_ratio=config["downsample_ratio"],
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


_VISION_LAYER = {
    "attention.projection_layer": "attn.proj",
    "attention.q_norm": "attn.q_norm",
    "attention.k_norm": "attn.k_norm",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VISION_TOP = {
    "embeddings.cls_token": "embeddings.class_embedding",
    "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embedding.weight",
    "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embedding.bias",
    "embeddings.position_embeddings": "embeddings.position_embedding",
}
_PROJECTOR = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}


def hf_to_original(hf: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    lm: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        if name.startswith("model.vision_tower."):
            rest = name.removeprefix("model.vision_tower.")
            if rest in _VISION_TOP:
                out[f"vision_model.{_VISION_TOP[rest]}"] = t
                continue
            _, _, i, sub = rest.split(".", 3)  # encoder.layer.{i}.{sub}
            module, _, leaf = sub.rpartition(".")
            if sub in ("lambda_1", "lambda_2"):
                out[f"vision_model.encoder.layers.{i}.ls{sub[-1]}"] = t
            elif module in _VISION_LAYER:
                out[f"vision_model.encoder.layers.{i}.{_VISION_LAYER[module]}.{leaf}"] = t
            elif module.endswith(("q_proj", "k_proj", "v_proj")):
                continue  # fused below
            else:
                raise AssertionError(f"unmapped {name}")
        elif name.startswith("model.multi_modal_projector."):
            module, leaf = name.removeprefix("model.multi_modal_projector.").split(".")
            out[f"mlp1.{_PROJECTOR[module]}.{leaf}"] = t
        elif name.startswith("model.language_model."):
            lm["model." + name.removeprefix("model.language_model.")] = t
        elif name == "lm_head.weight":
            lm["lm_head.weight"] = t
    for i in range(config["vision_config"]["num_hidden_layers"]):
        base = f"model.vision_tower.encoder.layer.{i}.attention"
        for leaf in ("weight", "bias"):
            if f"{base}.q_proj.{leaf}" in hf:
                parts = [hf[f"{base}.{p}_proj.{leaf}"] for p in "qkv"]
                out[f"vision_model.encoder.layers.{i}.attn.qkv.{leaf}"] = torch.cat(parts)
    llm = config["llm_config"]
    if llm["architectures"][0] == "InternLM2ForCausalLM":
        out.update(to_internlm2(lm, llm, prefix="language_model."))
    else:
        out.update({f"language_model.{k}": v for k, v in lm.items()})
    return out


def original_to_hf(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The inverse mapping (for checkpoints anyquant wrote, e.g. dequantized quantized ones)."""
    vision_top = {v: k for k, v in _VISION_TOP.items()}
    vision_layer = {v: k for k, v in _VISION_LAYER.items()}
    projector = {v: k for k, v in _PROJECTOR.items()}
    out: dict[str, torch.Tensor] = {}
    llm = config["llm_config"]
    for name, t in state.items():
        if name.startswith("vision_model."):
            rest = name.removeprefix("vision_model.")
            if rest in vision_top:
                out[f"model.vision_tower.{vision_top[rest]}"] = t
                continue
            _, _, i, sub = rest.split(".", 3)
            module, _, leaf = sub.rpartition(".")
            base = f"model.vision_tower.encoder.layer.{i}"
            if sub in ("ls1", "ls2"):
                out[f"{base}.lambda_{sub[-1]}"] = t
            elif module == "attn.qkv":
                for p, part in zip("qkv", t.chunk(3)):
                    out[f"{base}.attention.{p}_proj.{leaf}"] = part
            else:
                out[f"{base}.{vision_layer[module]}.{leaf}"] = t
        elif name.startswith("mlp1."):
            _, idx, leaf = name.split(".")
            out[f"model.multi_modal_projector.{projector[idx]}.{leaf}"] = t
    lm = {k.removeprefix("language_model."): v for k, v in state.items() if k.startswith("language_model.")}
    if llm["architectures"][0] == "InternLM2ForCausalLM":
        lm = to_llama(lm, llm)
    for k, v in lm.items():
        out[
            "lm_head.weight" if k == "lm_head.weight" else "model.language_model." + k.removeprefix("model.")
        ] = v
    return out


def hf_model(config: dict[str, Any], state: dict[str, torch.Tensor] | None = None, seed: int = 0) -> Any:
    """transformers' InternVL in fp32: seeded random weights, or `state` (HF names) loaded strictly."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(hf_config(config)).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if state is None:
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                if "lambda" in name:  # layer scale
                    p.copy_(0.5 + 0.2 * noise)
                elif p.dim() == 1 and "norm" in name and name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * noise)
                elif p.dim() == 1:  # biases
                    p.copy_(0.1 * noise)
                else:  # matrices, the patch convolution, class token and position table
                    p.copy_(noise * p[0].numel() ** -0.5)
        else:
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert not unexpected, unexpected
            assert all("rotary" in m for m in missing), missing
    return model


def write_internvl(path: Path, family: str, seed: int = 0, **vision: Any) -> tuple[Path, Any]:
    """Write the original-layout checkpoint; returns it and the HF model holding the same weights."""
    config = internvl_config(family, **vision)
    model = hf_model(config, seed=seed)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(hf_to_original(state, config), str(path / "model.safetensors"))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(byte_tokenizer_json())
    tok.add_special_tokens(SPECIAL)
    (path / "tokenizer.json").write_text(tok.to_str())
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path, model
