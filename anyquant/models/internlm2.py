"""InternLM2 / InternLM2.5 (`InternLM2ForCausalLM`, trust_remote_code layout): a Llama-like decoder
with InternLM2's own tensor names and one fused, *grouped* q/k/v projection.

Checkpoint names: `model.tok_embeddings`, `model.layers.{i}.attention.{wqkv,wo}`,
`model.layers.{i}.feed_forward.{w1 (gate), w3 (up), w2 (down)}`, `attention_norm`, `ffn_norm`,
`model.norm`, `output`. `wqkv` rows are laid out per KV head: for each of the `Hkv` KV heads, its
`H / Hkv` query heads, then its key head, then its value head (each `head_dim` rows). So tensor
parallelism splits `wqkv` by whole KV-head groups (never by plain rows) and `wo` by the matching
query heads. Config keys: InternLM2Config's (`bias` for wqkv/wo, `rope_scaling` incl. `dynamic`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from anyquant.config_fields import cfg_bool
from anyquant.errors import CheckpointError
from anyquant.layers.attention import AttentionContext
from anyquant.layers.embedding import VocabParallelEmbedding
from anyquant.layers.linear import QuantLinear, SplitGroup, TensorParallelLayer
from anyquant.layers.mlp import GatedMLP
from anyquant.layers.norm import RMSNorm
from anyquant.layers.rotary import RotaryEmbedding
from anyquant.models.base import CacheShape, DecoderArgs, InputEmbeds, pre_norm_layer, run_decoder

if TYPE_CHECKING:
    from anyquant.parallel.partition import Partition
    from anyquant.parallel.state import ParallelState

# The checkpoint's names of the gate / up / down projections.
FFN_NAMES = ("w1", "w3", "w2")


def internlm2_args(config: dict[str, Any]) -> DecoderArgs:
    # InternLM2Config's `bias` (default True) covers wqkv and wo; the feed-forward has no bias.
    bias = cfg_bool(config, "bias", True)
    return DecoderArgs.from_hf(config, qkv_bias=bias, o_bias=bias, mlp_bias=False)


class GroupedQKVAttention(nn.Module, TensorParallelLayer):
    """Attention whose q/k/v come from one `wqkv` in InternLM2's per-KV-head grouped row order."""

    def __init__(self, prefix: str, layer_index: int, args: DecoderArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        if args.num_heads % args.num_kv_heads:
            raise CheckpointError(
                f"config.json ({prefix}): num_attention_heads={args.num_heads} is not a multiple of "
                f"num_key_value_heads={args.num_kv_heads}"
            )
        self.prefix = prefix
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.group = args.num_heads // args.num_kv_heads  # query heads per KV head
        d = args.head_dim
        self.wqkv = QuantLinear(
            f"{prefix}.wqkv",
            args.hidden_size,
            (args.num_heads + 2 * args.num_kv_heads) * d,
            args.qkv_bias,
            style="column",
        )
        self.wo = QuantLinear(f"{prefix}.wo", args.num_heads * d, args.hidden_size, args.o_bias, style="row")
        self.rotary = rotary
        self.scale = d**-0.5

    def split_groups(self) -> list[SplitGroup]:
        # One unit = one KV head's group: its block of wqkv rows (its query heads, key and value)
        # and the wo input columns of those query heads. Ranks hold whole groups, so KV heads are
        # split, never replicated (replication would cut a block): sizes must divide them.
        d = self.head_dim
        return [
            SplitGroup(
                "heads",
                f"{self.prefix} (wqkv in groups of {self.group} query + 1 key + 1 value heads)",
                self.num_kv_heads,
                ((self.wqkv, (self.group + 2) * d),),
                ((self.wo, self.group * d),),
                cached=True,
            )
        ]

    def set_parallel(self, partitions: Mapping[str, Partition], state: ParallelState) -> None:
        self.num_kv_heads = partitions["heads"].local_size
        self.num_heads = self.num_kv_heads * self.group

    def forward(
        self, x: Tensor, positions: Tensor, cos_sin: tuple[Tensor, Tensor], ctx: AttentionContext
    ) -> Tensor:
        t = x.shape[0]
        qkv = self.wqkv(x).view(t, self.num_kv_heads, self.group + 2, self.head_dim)
        q = qkv[:, :, : self.group].reshape(t, self.num_heads, self.head_dim)
        k, v = qkv[:, :, -2], qkv[:, :, -1]  # [T, Hkv, D]
        cos, sin = cos_sin
        q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)
        return self.wo(ctx.attend(self.layer_index, q, k, v, self.scale))


class InternLM2Layer(nn.Module):
    def __init__(self, args: DecoderArgs, index: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        prefix = f"model.layers.{index}"
        self.attention_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attention = GroupedQKVAttention(f"{prefix}.attention", index, args, rotary)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.feed_forward = GatedMLP(
            f"{prefix}.feed_forward",
            args.hidden_size,
            args.intermediate_size,
            args.hidden_act,
            names=FFN_NAMES,
        )
        self.compute_dtype = torch.float32  # set by the loader (`InternLM2LM.set_compute_dtype`)

    def forward(
        self, x: Tensor, positions: Tensor, cos_sin: tuple[Tensor, Tensor], ctx: AttentionContext
    ) -> Tensor:
        return pre_norm_layer(
            x, positions, cos_sin, ctx, self.attention_norm, self.attention,
            self.ffn_norm, self.feed_forward, self.compute_dtype,
        )  # fmt: skip


class InternLM2Body(nn.Module):
    """`model.*`: tok_embeddings, layers, norm."""

    def __init__(self, args: DecoderArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.rotary = rotary
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.tok_embeddings.weight.requires_grad_(False)
        self.layers = nn.ModuleList(InternLM2Layer(args, i, rotary) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    @property
    def embed_tokens(self) -> nn.Module:
        """`tok_embeddings` under the name other families use (memory estimates read its width)."""
        return self.tok_embeddings


class InternLM2LM(nn.Module, TensorParallelLayer):
    """The causal LM; meets `models.protocol.CausalLM` as `models.base.DecoderLM` does, `forward`
    taking image rows for multimodal callers."""

    ignorable_suffixes: tuple[str, ...] = (".rotary_emb.inv_freq",)
    ignorable_prefixes: tuple[str, ...] = ()

    def __init__(self, args: DecoderArgs) -> None:
        super().__init__()
        self.args = args
        self.model = InternLM2Body(args, RotaryEmbedding(args.head_dim, args.rope, args.max_position))
        self.output = QuantLinear("output", args.hidden_size, args.vocab_size, kind="lm_head", style="vocab")
        self.cache_shape = CacheShape(args.num_kv_heads, args.head_dim, args.head_dim)

    def split_groups(self) -> list[SplitGroup]:
        return [SplitGroup("vocab", "output", self.args.vocab_size, ((self.output, 1),))]

    def set_parallel(self, partitions: Mapping[str, Partition], state: ParallelState) -> None:
        if state.is_parallel:
            self.model.tok_embeddings = VocabParallelEmbedding(
                partitions["vocab"], self.args.hidden_size, state
            )  # type: ignore[assignment]

    def tied_weights(self) -> dict[str, str]:
        return {"output.weight": "model.tok_embeddings.weight"} if self.args.tie_word_embeddings else {}

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        for layer in self.model.layers:
            assert isinstance(layer, InternLM2Layer)
            layer.compute_dtype = dtype

    def forward(
        self,
        token_ids: Tensor,
        positions: Tensor,
        ctx: AttentionContext,
        logits_rows: Tensor | None = None,
        input_embeds: InputEmbeds | None = None,
    ) -> Tensor:
        """token_ids [T] at `positions` [T] -> fp32 logits [rows, vocab] for `logits_rows` (all rows
        by default); `input_embeds` replaces the embeddings of some rows (image placeholders)."""
        body = self.model
        return run_decoder(
            body.tok_embeddings, body.rotary, body.layers, body.norm, self.output,
            token_ids, positions, ctx, logits_rows, input_embeds,
        )  # fmt: skip

    @property
    def body(self) -> InternLM2Body:
        """The decoder body (the name other families' callers use)."""
        return self.model


def build(config: dict[str, Any]) -> InternLM2LM:
    return InternLM2LM(internlm2_args(config))
