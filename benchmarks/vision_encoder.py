"""Time to encode one 448x448 image: anyquant's Qwen2-VL vision tower vs transformers' on the same
weights, interleaved in one process (bf16, Qwen2-VL-2B's tower width: 1280 wide, 16 heads, MLP
5120, merger into 1536; `--depth` blocks of its 32, to stay small on a shared machine).

    python benchmarks/vision_encoder.py [--depth 8] [--reps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    from PIL import Image

    from anyquant.loading.loader import load_model
    from anyquant.utils.tiny_vlm import tokenizer_json

    config = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=272, hidden_size=1536, intermediate_size=256, num_hidden_layers=1,
            num_attention_heads=12, num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(depth=args.depth, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16),
        image_token_id=263, video_token_id=271, vision_start_token_id=261, vision_end_token_id=262,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        hf = transformers.Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).eval()
        hf.save_pretrained(path)
        transformers.Qwen2VLImageProcessorPil().save_pretrained(path)
        (path / "tokenizer.json").write_text(tokenizer_json())
        ours = load_model(path, dtype="bfloat16").model
        processor = ours.image_processor(path)
        g = torch.Generator().manual_seed(0)
        image = Image.fromarray((torch.rand(448, 448, 3, generator=g) * 255).byte().numpy())
        feats = transformers.Qwen2VLImageProcessorPil.from_pretrained(path)([image], return_tensors="pt")

        def run_ours() -> torch.Tensor:
            return ours.embed_images([processor.process(image)])[0]

        def run_hf() -> torch.Tensor:
            with torch.inference_mode():
                pixels = feats["pixel_values"].to(torch.bfloat16)
                return hf.model.visual(pixels, grid_thw=feats["image_grid_thw"]).pooler_output

        a, b = run_ours(), run_hf()  # warm-up, and the same answer
        rel = float((a.float() - b.float()).norm() / b.float().norm())
        times: dict[str, list[float]] = {"anyquant": [], "transformers": []}
        for _ in range(args.reps):
            for name, fn in (("anyquant", run_ours), ("transformers", run_hf)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"448x448 image -> {a.shape[0]} tokens, {args.depth} blocks, {args.threads} thread(s), bf16")
    print(f"rel-L2 anyquant vs transformers (bf16): {rel:.2e}")
    for name, value in med.items():
        print(
            f"{name:>13}: median {value * 1000:.0f} ms over {args.reps} (all: {[round(t * 1000) for t in times[name]]})"
        )
    print(f"ratio transformers / anyquant: {med['transformers'] / med['anyquant']:.2f}")


if __name__ == "__main__":
    main()
