"""DeepSeek-V3 shapes, a few layers: decode at 4096 tokens of context vs 128, latent cache.

Builds (once, under out/bench/) a bf16 checkpoint with DeepSeek-V3's attention geometry (hidden
7168, 128 heads, q_lora_rank 1536, kv_lora_rank 512, rope 64 + nope 128 per head, v 128) and
V3's per-token expert work (8 routed experts of 2048 chosen per token, plus 1 shared expert), but
only `--layers` decoder layers and 8 routed experts per layer (a token's active expert bytes are
V3's; the 248 experts no token of a step would read are left out, so the checkpoint fits this
machine), and a 4096-entry vocabulary (the LM head is then ~9 % of the bytes read per token, as
V3's 129280 x 7168 head is of its 61 layers). Random weights, written tensor by tensor with
safetensors, then quantized with `anyquant quantize --format compressed-tensors --scheme W4A16`
(int4, groups of 128, symmetric; routers stay bf16).

Then runs `decode_step.py`'s measurement on it: `Engine.step()` tok/s (CPU time of the one
thread) at each context and batch, for each decode attention implementation given (the C++
kernel "auto" and the pure-torch path "torch", alternating in rounds), and the 4096 / 128 ratio.
The latent cache holds 576 values per token and layer (the value is the key's first 512); decode absorbs kv_b_proj into the
query and output (layers/mla.py), so one latent "KV head" serves all 128 query heads.

    python benchmarks/mla_decode.py [--layers 2] [--contexts 128 4096] [--batches 1]
        [--attention auto torch] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from random_checkpoint import ShardedCheckpoint, build_w4a16, randn  # type: ignore[import-not-found]

OUT = Path("out/bench")

DEEPSEEK_V3_SHAPES = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 8,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "first_k_dense_replace": 0,
    "moe_layer_freq": 1,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "vocab_size": 4096,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "num_nextn_predict_layers": 0,
    "torch_dtype": "bfloat16",
}


def write_dense(path: Path, layers: int, seed: int = 0) -> Path:
    """The bf16 checkpoint: two safetensors shards per decoder layer (attention, MoE), one for the rest."""
    cfg = {**DEEPSEEK_V3_SHAPES, "num_hidden_layers": layers}
    h, vocab, heads = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    qr, kvr, nope, rope, vd = (cfg[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))  # fmt: skip
    experts, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    g = torch.Generator().manual_seed(seed)
    ckpt = ShardedCheckpoint(path)
    shard = ckpt.shard

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    shard(
        "model-embed.safetensors",
        {
            "model.embed_tokens.weight": randn(g, vocab, h),
            "lm_head.weight": randn(g, vocab, h),
            "model.norm.weight": ones(h),
        },
    )
    for i in range(layers):
        p = f"model.layers.{i}"
        shard(
            f"model-layer{i:02d}-attn.safetensors",
            {
                f"{p}.input_layernorm.weight": ones(h),
                f"{p}.post_attention_layernorm.weight": ones(h),
                f"{p}.self_attn.q_a_proj.weight": randn(g, qr, h),
                f"{p}.self_attn.q_a_layernorm.weight": ones(qr),
                f"{p}.self_attn.q_b_proj.weight": randn(g, heads * (nope + rope), qr),
                f"{p}.self_attn.kv_a_proj_with_mqa.weight": randn(g, kvr + rope, h),
                f"{p}.self_attn.kv_a_layernorm.weight": ones(kvr),
                f"{p}.self_attn.kv_b_proj.weight": randn(g, heads * (nope + vd), kvr),
                f"{p}.self_attn.o_proj.weight": randn(g, h, heads * vd),
            },
        )
        t = {
            f"{p}.mlp.gate.weight": randn(g, experts, h, std=0.5),
            f"{p}.mlp.gate.e_score_correction_bias": torch.zeros(experts, dtype=torch.float32),
            f"{p}.mlp.shared_experts.gate_proj.weight": randn(g, inter, h),
            f"{p}.mlp.shared_experts.up_proj.weight": randn(g, inter, h),
            f"{p}.mlp.shared_experts.down_proj.weight": randn(g, h, inter),
        }
        for e in range(experts):
            t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = randn(g, inter, h)
            t[f"{p}.mlp.experts.{e}.up_proj.weight"] = randn(g, inter, h)
            t[f"{p}.mlp.experts.{e}.down_proj.weight"] = randn(g, h, inter)
        shard(f"model-layer{i:02d}-moe.safetensors", t)
        del t
    return ckpt.finish(cfg)


def build(layers: int) -> Path:
    dense, quant = OUT / f"deepseek-v3-shapes-{layers}l-bf16", OUT / f"deepseek-v3-shapes-{layers}l-w4a16"
    return build_w4a16(dense, quant, lambda path: write_dense(path, layers))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2)
    args, rest = parser.parse_known_args()
    model = build(args.layers)
    sys.path.insert(0, str(Path(__file__).parent))
    import decode_step  # type: ignore[import-not-found]

    sys.argv = [sys.argv[0], "--model", str(model), "--batches", "1", *rest]
    decode_step.main()


if __name__ == "__main__":
    main()
