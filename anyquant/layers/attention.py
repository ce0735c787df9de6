"""Grouped-query self-attention with rotary embeddings, and the attention-context interface.

Owns q/k/v/o projections (QuantLinear), optional q/k RMSNorm (Qwen3), rotary application and the
causal scaled-dot-product attention of one sequence (`attend`). Where keys and values live (the
paged KV cache) is the `AttentionContext`'s business, not the layer's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from anyquant.errors import CheckpointError
from anyquant.layers.linear import QuantLinear, SplitGroup, TensorParallelLayer
from anyquant.layers.norm import RMSNorm
from anyquant.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from anyquant.loading.sharding import Partition
    from anyquant.parallel.state import ParallelState


class AttentionContext(ABC):
    """What one forward step's attention layers need: where to store this step's keys and values
    and which cached tokens each query attends to. Built once per step by the caller (the engine's
    runner, or `engine.kv_cache.SequenceCache` for a single sequence)."""

    @abstractmethod
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Store k/v of this step's tokens for `layer`, then attend causally.

        q [T, H, D], k [T, Hkv, D], v [T, Hkv, Dv] for the step's T tokens -> [T, H * Dv].
        """


def attend(q: Tensor, k: Tensor, v: Tensor, start: int, scale: float) -> Tensor:
    """q [T, H, D], k/v [S, Hkv, D*] with S = start + T -> [T, H * Dv]; causal from `start`."""
    t, h = q.shape[:2]
    s, hkv = k.shape[:2]
    if hkv != h:
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    mask = torch.arange(s, device=q.device)[None, :] <= (start + torch.arange(t, device=q.device))[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )  # [H, T, Dv]
    return out.transpose(0, 1).reshape(t, -1)


class Attention(nn.Module, TensorParallelLayer):
    def __init__(
        self,
        prefix: str,
        layer_index: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
        qkv_bias: bool = False,
        qk_norm_eps: float | None = None,
        o_bias: bool = False,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise CheckpointError(
                f"config.json ({prefix}): num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}"
            )
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.prefix = prefix
        self.q_proj = QuantLinear(
            f"{prefix}.q_proj", hidden_size, num_heads * head_dim, qkv_bias, style="column"
        )
        self.k_proj = QuantLinear(
            f"{prefix}.k_proj", hidden_size, num_kv_heads * head_dim, qkv_bias, style="column"
        )
        self.v_proj = QuantLinear(
            f"{prefix}.v_proj", hidden_size, num_kv_heads * head_dim, qkv_bias, style="column"
        )
        self.o_proj = QuantLinear(f"{prefix}.o_proj", num_heads * head_dim, hidden_size, o_bias, style="row")
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.rotary = rotary
        self.scale = head_dim**-0.5

    # -- tensor parallelism: query heads split, KV heads split or replicated -----------------------
    def split_groups(self) -> list[SplitGroup]:
        d = self.head_dim
        return [
            SplitGroup("heads", self.prefix, self.num_heads, ((self.q_proj, d),), ((self.o_proj, d),)),
            SplitGroup(
                "kv_heads",
                self.prefix,
                self.num_kv_heads,
                ((self.k_proj, d), (self.v_proj, d)),
                query_heads=self.num_heads,
                cached=True,
            ),
        ]

    def set_parallel(self, partitions: Mapping[str, Partition], state: ParallelState) -> None:
        self.num_heads = partitions["heads"].local_size
        self.num_kv_heads = partitions["kv_heads"].local_size

    def forward(
        self, x: Tensor, positions: Tensor, cos_sin: tuple[Tensor, Tensor], ctx: AttentionContext
    ) -> Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos_sin
        q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)
        return self.o_proj(ctx.attend(self.layer_index, q, k, v, self.scale))
