"""The inputs transformers' vision-language models take for a prompt with images, for the tests
whose reference is transformers itself: one place for how each family is fed (the checkpoint's
image processor, Qwen2-VL's token types, mllama's cross-attention mask by transformers' own rule).
transformers is imported when called: the test modules skip without it (pytest.importorskip)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anyquant.utils.tiny_mllama import IMAGE
from anyquant.utils.tiny_vlm import IMAGE_PAD


def qwen2_vl_inputs(
    processor_dir: Path, ids: list[int], images: list[Any], prompt_len: int | None = None
) -> dict[str, Tensor]:
    """Qwen2(.5)-VL forward inputs for token ids `ids` whose first `prompt_len` (default: all) are
    the prompt, its IMAGE_PAD tokens standing for `images` (processed by the checkpoint's
    processor in `processor_dir`); tokens after the prompt (generated ones) are text."""
    import transformers

    feats = transformers.Qwen2VLImageProcessorPil.from_pretrained(processor_dir)(images, return_tensors="pt")
    prompt_len = len(ids) if prompt_len is None else prompt_len
    kinds = [int(t == IMAGE_PAD) for t in ids[:prompt_len]] + [0] * (len(ids) - prompt_len)
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": feats["pixel_values"],
        "image_grid_thw": feats["image_grid_thw"],
        "mm_token_type_ids": torch.tensor([kinds]),
    }


def mllama_inputs(processor_dir: Path, ids: list[int], images: list[Any]) -> dict[str, Tensor]:
    """Llama-3.2-Vision (mllama) inputs for token ids `ids` with `images` (one `<|image|>` token
    each; processed by the checkpoint's processor in `processor_dir`): the ids alone without
    images, else also the tiles, their arrangement and the dense cross-attention mask."""
    import transformers
    from transformers.models.mllama import processing_mllama

    inputs = {"input_ids": torch.tensor([ids])}
    if not images:
        return inputs
    feats = transformers.MllamaImageProcessorPil.from_pretrained(processor_dir)([images], return_tensors="pt")
    sparse = processing_mllama.get_cross_attention_token_mask(ids, IMAGE)
    dense = processing_mllama.convert_sparse_cross_attention_mask_to_dense(
        [sparse], feats["num_tiles"], 4, len(ids)
    )
    inputs.update(
        pixel_values=feats["pixel_values"],
        aspect_ratio_ids=feats["aspect_ratio_ids"],
        aspect_ratio_mask=feats["aspect_ratio_mask"],
        cross_attention_mask=torch.as_tensor(dense),
    )
    return inputs
