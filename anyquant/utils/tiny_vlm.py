"""Write a tiny random-weight Qwen2-VL / Qwen2.5-VL checkpoint (for tests and benchmarks).

The weights come from transformers' own classes (random init, fixed seed), saved with its
writer: the published checkpoints' tensor names (`model.layers.*`, `visual.*`) with transformers
5's nested config (`text_config`, `vision_config`, `rope_parameters`). `nested_names=True` renames
the tensors as transformers 5 holds them in memory (`model.language_model.*`, `model.visual.*`),
`flat_config=True` flattens the config as the published checkpoints have it (`rope_scaling:
{type: mrope}`, `torch_dtype`). A byte-level tokenizer with Qwen's special tokens and a chat
template that renders image parts is written beside them. Needs transformers (test extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from anyquant.utils.tiny_model import byte_level_bpe

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
# byte tokens 0..255, <s> 256, </s> 257, <pad> 258, then SPECIAL_TOKENS from 259
IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD = range(259, 264)
VOCAB = 272

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_vlm_config(
    v25: bool = False, vision_overrides: dict[str, Any] | None = None, **text_overrides: Any
) -> Any:
    import transformers

    text = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=256,
        eos_token_id=IM_END,
        tie_word_embeddings=False,
    )
    text.update(text_overrides)
    if v25:
        vision: dict[str, Any] = dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            out_hidden_size=text["hidden_size"],
            window_size=56,  # two merge blocks of 28 pixels per window side
            fullatt_block_indexes=[1],
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
        )
        cls: Any = transformers.Qwen2_5_VLConfig
    else:
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=text["hidden_size"],
            mlp_ratio=2,
            num_heads=2,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
        )
        cls = transformers.Qwen2VLConfig
    vision.update(vision_overrides or {})
    return cls(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_PAD,
        video_token_id=VOCAB - 1,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )


def tokenizer_json() -> str:
    tok = byte_level_bpe()
    tok.add_special_tokens(["<s>", "</s>", "<pad>", *SPECIAL_TOKENS])
    return str(tok.to_str())


def write_tiny_vlm(
    path: str | Path,
    v25: bool = False,
    seed: int = 0,
    nested_names: bool = False,
    flat_config: bool = False,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 28 * 28 * 24,
    vision_overrides: dict[str, Any] | None = None,
    **text_overrides: Any,
) -> Path:
    """Write the checkpoint; returns its directory. Pixel bounds keep images to a few tokens."""
    import transformers
    from safetensors.torch import load_file, save_file

    out = Path(path)
    config = tiny_vlm_config(v25, vision_overrides, **text_overrides)
    torch.manual_seed(seed)
    cls: Any = (
        transformers.Qwen2_5_VLForConditionalGeneration
        if v25
        else transformers.Qwen2VLForConditionalGeneration
    )
    model = cls(config).eval()
    with torch.no_grad():  # the default init leaves norms at 1 and biases at 0: perturb them
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(out, safe_serialization=True)
    processor: Any = transformers.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    processor.save_pretrained(out)
    (out / "tokenizer.json").write_text(tokenizer_json())
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE})
    )
    if nested_names or flat_config:
        _rewrite(out, nested_names, flat_config, load_file, save_file)
    return out


def _rename(name: str) -> str:
    """Saved names (`model.layers.*`, `visual.*`) -> the nested ones some writers use."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith("model.language_model."):
        return "model.language_model." + name.removeprefix("model.")
    return name


def _rewrite(out: Path, nested_names: bool, flat_config: bool, load_file: Any, save_file: Any) -> None:
    if nested_names:
        for file in sorted(out.glob("*.safetensors")):
            tensors = load_file(str(file))
            save_file(
                {_rename(k): v.contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"}
            )
        index = out / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = {_rename(k): v for k, v in data["weight_map"].items()}
            index.write_text(json.dumps(data))
    if not flat_config:
        return
    config = json.loads((out / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters", {})
    flat = {**config, **{k: v for k, v in text.items() if k not in ("model_type", "architectures")}}
    flat["rope_theta"] = rope.get("rope_theta", 10000.0)
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope.get("mrope_section")}
    flat["torch_dtype"] = flat.pop("dtype", "float32")
    vision = flat["vision_config"]
    vision.pop("rope_parameters", None)
    if "in_channels" in vision:
        vision["in_chans"] = vision.pop("in_channels")
    (out / "config.json").write_text(json.dumps(flat, indent=2))
