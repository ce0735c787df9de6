"""Multi-head latent attention (MLA), the attention of the DeepSeek-V2 / V3 family.

Owns the low-rank query path (`q_proj`, or `q_a_proj` -> `q_a_layernorm` -> `q_b_proj`), the
compressed key/value path (`kv_a_proj_with_mqa` -> latent + shared rope key, `kv_a_layernorm`,
`kv_b_proj` -> per-head nope key and value), rotary on the rope slice only, and `o_proj`, and
the latent KV cache: one compressed vector per token instead of a key and a value per head; see
`MLAttention`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from anyquant.errors import CheckpointError
from anyquant.layers.attention import AttentionContext
from anyquant.layers.linear import QuantLinear, SplitGroup, TensorParallelLayer
from anyquant.layers.norm import RMSNorm
from anyquant.layers.rotary import RotaryEmbedding, yarn_mscale

if TYPE_CHECKING:
    from anyquant.parallel.partition import Partition
    from anyquant.parallel.state import ParallelState

# The two latent norms are built without the config's rms_norm_eps in both the reference DeepSeek
# code and transformers, so they always use the RMSNorm default.
LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MLADims:
    """Per-layer widths of latent attention, read from config.json."""

    num_heads: int
    q_lora_rank: int | None  # None: a full-rank `q_proj` (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self) -> None:
        for name in ("num_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise CheckpointError(f"config.json: {name}={getattr(self, name)} must be positive")
        if self.qk_nope_head_dim < 0:
            raise CheckpointError(f"config.json: qk_nope_head_dim={self.qk_nope_head_dim} must be >= 0")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise CheckpointError(f"config.json: q_lora_rank={self.q_lora_rank} must be positive or null")
        if self.qk_rope_head_dim % 2:
            raise CheckpointError(
                f"config.json: qk_rope_head_dim={self.qk_rope_head_dim} must be even (rotary pairs)"
            )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_key_dim(self) -> int:
        """The latent cache's key per token: [latent c, rope key k_r]. Its value is c, the key's
        first kv_lora_rank values, stored once (models.base.CacheShape.value_in_key)."""
        return self.kv_lora_rank + self.qk_rope_head_dim


def mla_softmax_scale(qk_head_dim: int, rope: dict[str, Any]) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 for scaled rotary with mscale_all_dim.

    YaRN already scales cos/sin by mscale/mscale_all_dim (so q·k grows by that squared, on the rope
    part only); DeepSeek then multiplies the whole softmax scale by mscale_all_dim's factor squared.
    """
    scale = float(qk_head_dim) ** -0.5
    mscale_all = rope.get("mscale_all_dim")
    if rope.get("rope_type", "default") != "default" and mscale_all:
        m = yarn_mscale(float(rope.get("factor") or 1.0), float(mscale_all))
        scale *= m * m
    return scale


class MLAttention(nn.Module, TensorParallelLayer):
    """Latent attention with `Attention.forward`'s signature, over a latent KV cache.

    The cache holds, per token and layer, the normalised kv latent c (kv_lora_rank values) and the
    rotated rope key k_r shared by all heads (qk_rope_head_dim values): the family's cache shape
    declares it as one "KV head" with key [c, k_r] and value c read as the key's first values
    (`MLADims.cache_key_dim`; DeepSeek-V3: 576 values per token and layer, stored once, instead of
    128 heads x (192 + 128) = 40960 expanded). kv_b_proj is absorbed (weights taken
    once after loading, `finish_loading`): per head, k_nope = W_UK c and v = W_UV c, so
    q_nope . k_nope = (W_UK^T q_nope) . c and the attention output is W_UV (sum_j p_j c_j). The
    queries become [W_UK^T q_nope, q_rope] against keys [c, k_r] (the same dot products, so the same
    softmax scale), the attention returns a latent per head, and W_UV maps it to the head's value
    width before `o_proj`. No step ever expands the cache to per-head keys and values.
    Tensor parallelism splits heads: the per-head projections (`q_proj` / `q_b_proj`, `kv_b_proj`,
    `o_proj`) are cut by heads, the low-rank `*_a_proj` layers are replicated, and every rank caches
    the (replicated) latent.
    """

    def __init__(
        self,
        prefix: str,
        layer_index: int,
        hidden_size: int,
        dims: MLADims,
        rotary: RotaryEmbedding,
        scale: float,
        attention_bias: bool = False,
    ) -> None:
        super().__init__()
        if rotary.dim != dims.qk_rope_head_dim:
            raise ValueError(f"{prefix}: rotary dim {rotary.dim} != qk_rope_head_dim {dims.qk_rope_head_dim}")
        self.layer_index = layer_index
        self.dims = dims
        h, dqk = dims.num_heads, dims.qk_head_dim
        # Only the projections fed by the hidden state (and o_proj) carry attention_bias.
        self.q_proj: QuantLinear | None = None
        self.q_a_proj: QuantLinear | None = None
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: QuantLinear | None = None
        self.prefix = prefix
        if dims.q_lora_rank is None:
            self.q_proj = QuantLinear(f"{prefix}.q_proj", hidden_size, h * dqk, style="column")
        else:
            self.q_a_proj = QuantLinear(f"{prefix}.q_a_proj", hidden_size, dims.q_lora_rank, attention_bias)
            self.q_a_layernorm = RMSNorm(dims.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = QuantLinear(f"{prefix}.q_b_proj", dims.q_lora_rank, h * dqk, style="column")
        self.kv_a_proj_with_mqa = QuantLinear(
            f"{prefix}.kv_a_proj_with_mqa",
            hidden_size,
            dims.kv_lora_rank + dims.qk_rope_head_dim,
            attention_bias,
        )
        self.kv_a_layernorm = RMSNorm(dims.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = QuantLinear(
            f"{prefix}.kv_b_proj",
            dims.kv_lora_rank,
            h * (dims.qk_nope_head_dim + dims.v_head_dim),
            style="column",
        )
        self.o_proj = QuantLinear(
            f"{prefix}.o_proj", h * dims.v_head_dim, hidden_size, attention_bias, style="row"
        )
        self.rotary = rotary
        self.scale = scale
        # kv_b_proj's weight split per head (set by `finish_loading`): W_UK [H, nope, r], W_UV [H, v, r].
        self.w_uk: Tensor | None = None
        self.w_uv: Tensor | None = None

    def split_groups(self) -> list[SplitGroup]:
        d = self.dims
        query = self.q_proj if self.q_proj is not None else self.q_b_proj
        assert query is not None
        columns = ((query, d.qk_head_dim), (self.kv_b_proj, d.qk_nope_head_dim + d.v_head_dim))
        rows = ((self.o_proj, d.v_head_dim),)
        return [SplitGroup("heads", self.prefix, d.num_heads, columns, rows)]

    def set_parallel(self, partitions: Mapping[str, Partition], state: ParallelState) -> None:
        self.dims = replace(self.dims, num_heads=partitions["heads"].local_size)

    def finish_loading(self) -> None:
        """Take kv_b_proj's weight, exactly as its kernel multiplies (whatever the format), by
        applying the layer to the identity: row i of the output is column i of W."""
        kernel = self.kv_b_proj.kernel
        if kernel is None:
            raise RuntimeError(f"{self.kv_b_proj.prefix}: no weight loaded")
        d = self.dims
        eye = torch.eye(d.kv_lora_rank, dtype=kernel.compute_dtype)
        with torch.no_grad():
            w = self.kv_b_proj(eye).T  # [H * (nope + v), r]
        w = w.reshape(d.num_heads, d.qk_nope_head_dim + d.v_head_dim, d.kv_lora_rank)
        self.w_uk = w[:, : d.qk_nope_head_dim].contiguous()
        self.w_uv = w[:, d.qk_nope_head_dim :].contiguous()

    def _query(self, x: Tensor) -> Tensor:
        if self.q_proj is not None:
            return self.q_proj(x)
        assert self.q_a_proj is not None and self.q_a_layernorm is not None and self.q_b_proj is not None
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(
        self, x: Tensor, positions: Tensor, cos_sin: tuple[Tensor, Tensor], ctx: AttentionContext
    ) -> Tensor:
        d = self.dims
        if self.w_uk is None or self.w_uv is None:
            raise RuntimeError(f"{self.prefix}: latent attention runs only after finish_loading")
        t, h = x.shape[0], d.num_heads
        q = self._query(x).view(t, h, d.qk_head_dim)
        q_nope, q_rope = q.split([d.qk_nope_head_dim, d.qk_rope_head_dim], dim=-1)
        compressed = self.kv_a_proj_with_mqa(x)  # [T, kv_lora_rank + rope]
        latent, k_rope = compressed.split([d.kv_lora_rank, d.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).to(q.dtype)
        cos, sin = cos_sin
        q_rope = self.rotary.rotate(q_rope, cos, sin)
        k_rope = self.rotary.rotate(k_rope[:, None, :], cos, sin)  # [T, 1, rope]: shared by all heads
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk.to(q.dtype)).transpose(0, 1)  # [T, H, r]
        q = torch.cat((q_latent, q_rope), dim=-1)  # [T, H, r + rope]
        k = torch.cat((latent[:, None, :], k_rope.to(q.dtype)), dim=-1)  # [T, 1, r + rope]
        # The value is the key's latent part: a cache with `value_in_key` stores it once.
        v_latent = k[..., : d.kv_lora_rank]
        out = ctx.attend(self.layer_index, q, k, v_latent, self.scale).view(t, h, d.kv_lora_rank)
        v = torch.bmm(out.transpose(0, 1), self.w_uv.to(out.dtype).transpose(1, 2))  # [H, T, v]
        return self.o_proj(v.transpose(0, 1).reshape(t, h * d.v_head_dim))
