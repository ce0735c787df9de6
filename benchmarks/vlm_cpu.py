"""Quantized VLMs on CPU: time to first token for one 448x448 image plus 32 text tokens, and batch-1
decode tokens/s; anyquant (int4 GPTQ language model, unquantized vision tower) against transformers
(the bf16 original) on the same shapes, interleaved in one process.

Random-weight, reduced-depth models at real widths (built once under out/bench/vlm/):
- Qwen2-VL: Qwen2-VL-2B's vision tower (1280 wide, 16 heads, MLP 5120, merger into 1536) with
  `--vision-depth` of its 32 blocks, and a Qwen2-VL-2B-wide language model (1536, 12 heads / 2 KV,
  MLP 8960) with `--text-layers` of its 28 layers; a 448x448 image is 256 tokens.
- InternVL2.5-1B: InternViT-300M (1024 wide, 16 heads, MLP 4096, 448 tiles, pixel shuffle 0.5)
  with `--vision-depth` of its 24 layers, and a Qwen2.5-0.5B language model (896, 14 heads / 2 KV,
  MLP 4864) with `--text-layers` of its 24; a 448x448 image is one tile, 256 tokens.
- Llama-3.2-11B-Vision (mllama): its vision tower (1280 wide, 16 heads, MLP 5120, 560-pixel tiles of
  patch 14, up to 4 tiles) with `--vision-depth` of its 32 local and `--mllama-global-layers` of its 8
  gated global layers, and its language model's width (4096, 32 heads / 8 KV, MLP 14336) with
  `--mllama-text-layers` of its 40 layers, the last one a cross-attention layer (memory: 2 layers
  already make 1.4 GB in bf16); a 448x448 image is one tile of 1601 patches, one `<|image|>` token.
  As in the published GPTQ checkpoints, the vision tower, the projector and the cross-attention
  layer stay unquantized.
Vocabularies are cut to 32000 (embedding size is not what this measures).

Each repetition times the first token with a new random image (nothing cached on either side);
decode: transformers from the arrival times of its tokens in that call (a streamer), anyquant from
33 minus 1 tokens on that image again (both calls find its encoder output and prefix cached).

    python benchmarks/vlm_cpu.py [--families qwen2_vl internvl mllama] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

OUT = Path("out/bench/vlm")
VOCAB = 32000
TEXT_TOKENS = 32
DECODE = 32


def image(seed: int) -> Any:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(448, 448, 3, generator=g) * 255).byte().numpy())


def text_ids(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (TEXT_TOKENS,), generator=g).tolist()


# -- checkpoints ----------------------------------------------------------------------------------
def build_qwen2_vl(out: Path, text_layers: int, vision_depth: int) -> tuple[Path, Any]:
    import transformers

    from anyquant.utils.tiny_vlm import IMAGE_PAD, VISION_END, VISION_START, tokenizer_json

    config = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=1536, intermediate_size=8960, num_hidden_layers=text_layers,
            num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            tie_word_embeddings=False, bos_token_id=256, eos_token_id=257,
        ),
        vision_config=dict(depth=vision_depth, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16),
        image_token_id=IMAGE_PAD, video_token_id=VOCAB - 1, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # never an fp32 copy (memory)
    try:
        model = transformers.Qwen2VLForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    src = out / "qwen2_vl-bf16"
    if not (src / "config.json").is_file():
        model.save_pretrained(src)
        transformers.Qwen2VLImageProcessorPil().save_pretrained(src)
        (src / "tokenizer.json").write_text(tokenizer_json())
    return src, model


def build_internvl(out: Path, text_layers: int, vision_depth: int) -> tuple[Path, Any]:
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from anyquant.utils.tiny_model import byte_tokenizer_json
    from tests.models._internvl import SPECIAL, hf_model, hf_to_original, internvl_config

    config = internvl_config(
        "qwen2", hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
        num_hidden_layers=vision_depth, image_size=448, force_image_size=448,
    )  # fmt: skip
    config["llm_config"].update(
        vocab_size=VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=text_layers,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6,
    )  # fmt: skip
    model = hf_model(config, seed=0).to(torch.bfloat16)
    src = out / "internvl-bf16"
    if not (src / "config.json").is_file():
        src.mkdir(parents=True, exist_ok=True)
        config["torch_dtype"] = config["llm_config"]["torch_dtype"] = "bfloat16"
        (src / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(hf_to_original(state, config), str(src / "model.safetensors"))
        tok = Tokenizer.from_str(byte_tokenizer_json())
        tok.add_special_tokens(SPECIAL)
        (src / "tokenizer.json").write_text(tok.to_str())
        (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return src, model


def build_mllama(out: Path, text_layers: int, vision_depth: int, global_layers: int = 2) -> tuple[Path, Any]:
    import transformers

    from anyquant.utils.tiny_mllama import BOS, CHAT_TEMPLATE, EOT, IMAGE, PAD, tokenizer_json

    indices = sorted({max(0, vision_depth // 2 - 1), vision_depth - 1})  # the 11B taps 5 of its 32
    config = transformers.MllamaConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=text_layers,
            num_attention_heads=32, num_key_value_heads=8, cross_attention_layers=[text_layers - 1],
            max_position_embeddings=4096, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            bos_token_id=BOS, eos_token_id=EOT, pad_token_id=PAD, tie_word_embeddings=False,
        ),
        vision_config=dict(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=vision_depth,
            num_global_layers=global_layers, attention_heads=16, image_size=560, patch_size=14,
            max_num_tiles=4, intermediate_layers_indices=indices, vision_output_dim=1280 * (1 + len(indices)),
        ),
        image_token_index=IMAGE,
    )  # fmt: skip
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # never an fp32 copy (memory)
    try:
        model = transformers.MllamaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # the gates start at 0 (tanh(0) switches a branch off): open them
        for name, p in model.named_parameters():
            if "gate" in name and p.dim() <= 1:
                p.fill_(0.5)
    src = out / "mllama-bf16"
    if not (src / "config.json").is_file():
        model.save_pretrained(src)
        transformers.MllamaImageProcessorPil(
            size={"height": 560, "width": 560}, max_image_tiles=4
        ).save_pretrained(src)
        (src / "tokenizer.json").write_text(tokenizer_json())
        (src / "tokenizer_config.json").write_text(
            json.dumps({"bos_token": "<s>", "eos_token": "<|eot_id|>", "chat_template": CHAT_TEMPLATE})
        )
    return src, model


BUILDERS = {"qwen2_vl": build_qwen2_vl, "internvl": build_internvl, "mllama": build_mllama}
# What stays unquantized: the vision parts (and mllama's cross-attention layer, the last one).
SKIPS = {
    "qwen2_vl": lambda layers: ["visual"],
    "internvl": lambda layers: ["vision_model", "mlp1"],
    "mllama": lambda layers: ["vision_model", "multi_modal_projector", rf"layers\.{layers - 1}\."],
}


def quantized(src: Path, skip: list[str]) -> Path:
    from anyquant.convert.quantize import quantize_checkpoint
    from anyquant.quant.formats.base import WriteOptions

    dst = src.with_name(src.name.replace("-bf16", "-gptq-int4"))
    if not (dst / "config.json").is_file():
        quantize_checkpoint(src, dst, "gptq", WriteOptions(bits=4, group_size=128, sym=True), skip=skip)
    return dst


# -- one measurement each -------------------------------------------------------------------------
def anyquant_run(llm: Any, prompt_ids: list[int], seed: int) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s over DECODE more tokens)."""
    from anyquant import SamplingParams

    def run(tokens: int, s: int) -> float:
        request = {"prompt_token_ids": prompt_ids, "multi_modal_data": {"image": image(s)}}
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate([request], params)
        return time.perf_counter() - t0

    ttft = run(1, seed)  # a new image: encoded, nothing cached
    # Decode: the same image again, 1 and 1 + DECODE tokens; both calls find the same encoder output
    # and prefix cached, so their difference is the DECODE steps alone (a difference of two cold
    # calls drowns them in the encoder's run-to-run noise on a loaded machine).
    first = run(1, seed)
    total = run(1 + DECODE, seed)
    return ttft, DECODE / max(total - first, 1e-9)


class _Clock:
    """A transformers streamer that notes when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())  # the first call is the prompt

    def end(self) -> None:
        pass


def transformers_run(family: str, model: Any, src: Path, seed: int) -> tuple[float, float]:
    def inputs(s: int) -> dict[str, Any]:
        if family == "qwen2_vl":
            import transformers

            from anyquant.utils.tiny_vlm import IMAGE_PAD, VISION_END, VISION_START

            proc = transformers.Qwen2VLImageProcessorPil.from_pretrained(src)
            feats = proc([image(s)], return_tensors="pt")
            n = int(feats["image_grid_thw"].prod()) // 4
            ids = torch.tensor([[VISION_START, *[IMAGE_PAD] * n, VISION_END, *text_ids(s)]])
            kinds = (ids == IMAGE_PAD).long()
            return {"input_ids": ids, "mm_token_type_ids": kinds, **feats}
        if family == "mllama":
            import transformers
            from transformers.models.mllama import processing_mllama

            from anyquant.utils.tiny_mllama import BOS, IMAGE

            feats = transformers.MllamaImageProcessorPil.from_pretrained(src)(
                [[image(s)]], return_tensors="pt"
            )
            ids_list = [BOS, IMAGE, *text_ids(s)]
            sparse = processing_mllama.get_cross_attention_token_mask(ids_list, IMAGE)
            dense = processing_mllama.convert_sparse_cross_attention_mask_to_dense(
                [sparse], feats["num_tiles"], 4, len(ids_list)
            )
            return {
                "input_ids": torch.tensor([ids_list]),
                "pixel_values": feats["pixel_values"].to(torch.bfloat16),
                "aspect_ratio_ids": feats["aspect_ratio_ids"],
                "aspect_ratio_mask": feats["aspect_ratio_mask"],
                "cross_attention_mask": torch.as_tensor(dense),
            }
        from anyquant.models.internvl_image import pixel_values
        from tests.models._internvl import IMG_CONTEXT_ID

        pixels = pixel_values(image(s), 448, 1, 12, True).to(torch.bfloat16)
        ids = torch.tensor([[259, *[IMG_CONTEXT_ID] * (256 * pixels.shape[0]), 260, *text_ids(s)]])
        return {"input_ids": ids, "pixel_values": pixels}

    # One call: the first token's arrival gives the TTFT, the next DECODE tokens' the decode rate.
    clock = _Clock()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(
            **inputs(seed),
            max_new_tokens=1 + DECODE,
            min_new_tokens=1 + DECODE,
            do_sample=False,
            streamer=clock,
        )
    first, last = clock.times[1], clock.times[-1]
    return first - t0, DECODE / max(last - first, 1e-9)


def quantized_checkpoints(families: list[str], text_layers: int = 4, vision_depth: int = 4) -> list[Path]:
    """Build (once) and quantize each family's benchmark checkpoint; the GPTQ int4 folders."""
    paths = []
    for family in families:
        done = OUT / f"{family}-gptq-int4"
        if (done / "config.json").is_file():
            paths.append(done)
            continue
        layers = 2 if family == "mllama" else text_layers
        src, model = BUILDERS[family](OUT, layers, vision_depth)
        del model
        paths.append(quantized(src, skip=SKIPS[family](layers)))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", nargs="+", default=["qwen2_vl", "internvl", "mllama"])
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument("--mllama-text-layers", type=int, default=2, help="the last is cross-attention")
    parser.add_argument("--mllama-global-layers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from anyquant import LLM

    OUT.mkdir(parents=True, exist_ok=True)
    results = []
    for family in args.families:
        layers = args.mllama_text_layers if family == "mllama" else args.text_layers
        if family == "mllama":
            src, hf = build_mllama(OUT, layers, args.vision_depth, args.mllama_global_layers)
        else:
            src, hf = BUILDERS[family](OUT, layers, args.vision_depth)
        path = quantized(src, skip=SKIPS[family](layers))
        llm = LLM(path, dtype="bfloat16", kv_cache_gb=0.5)  # memory: the default reserves up to 2 GiB
        if family == "qwen2_vl":
            from anyquant.utils.tiny_vlm import IMAGE_PAD, VISION_END, VISION_START

            marker = [VISION_START, IMAGE_PAD, VISION_END]
        elif family == "mllama":
            from anyquant.utils.tiny_mllama import BOS, IMAGE

            marker = [BOS, IMAGE]
        else:
            from tests.models._internvl import IMG_CONTEXT_ID

            marker = [IMG_CONTEXT_ID]  # anyquant expands it to the tiles' tokens inside <img>...</img>
        anyquant_run(llm, marker + text_ids(0), 99)  # warm-up (kernel repacking, allocators)
        transformers_run(family, hf, src, 99)
        ours, theirs = [], []
        for rep in range(args.reps):  # interleaved
            ours.append(anyquant_run(llm, marker + text_ids(rep), rep))
            theirs.append(transformers_run(family, hf, src, rep))
        row = {
            "family": family,
            "text_layers": layers,
            "vision_depth": args.vision_depth,
            "threads": args.threads,
            "anyquant_int4": {
                "ttft_s": statistics.median(t for t, _ in ours),
                "decode_tok_s": statistics.median(d for _, d in ours),
            },
            "transformers_bf16": {
                "ttft_s": statistics.median(t for t, _ in theirs),
                "decode_tok_s": statistics.median(d for _, d in theirs),
            },
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        del llm, hf


if __name__ == "__main__":
    main()
