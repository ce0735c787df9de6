"""Write a tiny random-weight Llama-3.2-Vision (mllama) checkpoint (for tests and benchmarks).

The weights come from transformers' own classes (random init, fixed seed, the zero-initialised
gates and unit norms perturbed so that every branch matters), saved with its writer: the hub's
tensor names (`language_model.model.*`, `vision_model.*`, ...) and transformers 5's config.
`nested_names=True` renames the tensors as transformers 5 holds them in memory
(`model.language_model.*`, `model.vision_model.*`, `lm_head`), `hub_config=True` writes the
config as the published checkpoints (transformers 4.45) have it (`rope_scaling` + `rope_theta`,
`torch_dtype`). A byte-level tokenizer whose `<|image|>` token is the id right after the
vocabulary (as in the published checkpoints) and a chat template that renders image parts as
`<|image|>` are written beside them. Needs transformers (test extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from anyquant.utils.tiny_model import byte_level_bpe

VOCAB = 272
# byte tokens 0..255, <s> 256, </s> 257, <pad> 258, headers and eot 259..261, spares, <|image|>
BOS, EOS, PAD = 256, 257, 258
START_HEADER, END_HEADER, EOT = 259, 260, 261
IMAGE = VOCAB  # = text vocab_size: one of the embedding's 8 extra rows
_SPECIAL = ["<s>", "</s>", "<pad>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|image|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def tiny_mllama_config(**text_overrides: Any) -> Any:
    import transformers

    text = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        cross_attention_layers=[1],
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=BOS,
        eos_token_id=EOT,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    text.update(text_overrides)
    vision = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        image_size=32,
        patch_size=8,  # 16 patches + a class token per tile: padded to 24 inside the tower
        max_num_tiles=4,
        intermediate_layers_indices=[0, 1],
        vision_output_dim=32 * 3,
    )
    return transformers.MllamaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE)


def tokenizer_json() -> str:
    tok = byte_level_bpe()
    spares = [f"<|reserved_{i}|>" for i in range(IMAGE - 256 - len(_SPECIAL))]
    tok.add_special_tokens([*_SPECIAL, *spares, "<|image|>"])
    assert tok.token_to_id("<|image|>") == IMAGE
    return str(tok.to_str())


def write_tiny_mllama(
    path: str | Path,
    seed: int = 0,
    nested_names: bool = False,
    hub_config: bool = False,
    **text_overrides: Any,
) -> Path:
    """Write the checkpoint; returns its directory."""
    import transformers
    from safetensors.torch import load_file, save_file

    out = Path(path)
    config = tiny_mllama_config(**text_overrides)
    torch.manual_seed(seed)
    model = transformers.MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():  # gates start at 0 and norms at 1: perturb every 1-D parameter
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out, safe_serialization=True)
    processor: Any = transformers.MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=4)
    processor.save_pretrained(out)
    (out / "tokenizer.json").write_text(tokenizer_json())
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "<|eot_id|>", "chat_template": CHAT_TEMPLATE})
    )
    if nested_names:
        for file in sorted(out.glob("*.safetensors")):
            tensors = load_file(str(file))
            renamed = {nested_name(k): v.contiguous() for k, v in tensors.items()}
            save_file(renamed, str(file), metadata={"format": "pt"})
    if hub_config:
        data = json.loads((out / "config.json").read_text())
        text = data["text_config"]
        rope = text.pop("rope_parameters")
        text["rope_theta"] = rope.pop("rope_theta")
        text["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
        for part in (data, text, data["vision_config"]):
            if "dtype" in part:
                part["torch_dtype"] = part.pop("dtype")
        (out / "config.json").write_text(json.dumps(data, indent=2))
    return out


def nested_name(name: str) -> str:
    """A hub tensor name -> transformers 5's in-memory one."""
    if name.startswith("language_model.lm_head"):
        return name.removeprefix("language_model.")
    if name.startswith("language_model.model."):
        return "model.language_model." + name.removeprefix("language_model.model.")
    if name.startswith(("vision_model.", "multi_modal_projector")):
        return "model." + name
    return name
