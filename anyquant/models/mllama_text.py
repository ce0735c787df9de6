"""The Llama-3.2-Vision language model's cross-attention: its layers and the per-request states.

A cross-attention layer (at the `cross_attention_layers` indices of text_config) attends from the
text tokens to the image states: q from the tokens (q_norm per head), k/v from the images' encoder
rows (k_norm per head), no rotary, no causality; both residual branches are tanh-gated. Its keys
and values depend on the images only, so they are computed once per request, when the request's
state is built (`CrossStates.build`, from the rows the engine hands in with the request's first
step) and kept per request until the engine releases it: they live outside the paged
self-attention cache.

The mask is the reference's: token t attends image i's valid keys (its real tiles) when
first_token_i <= t < end_token_i; a token that attends no image ("full-row masked", e.g. the
tokens before the first image) attends every key of every image unmasked, padding tiles included,
and its MLP branch is zeroed (the reference multiplies the row's mask by zero and the MLP output
by the row indicator). Rows of sequences without images skip the layer entirely, as the reference
does for a text-only request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anyquant.errors import AnyquantError, CheckpointError
from anyquant.layers.linear import QuantLinear, SplitGroup, TensorParallelLayer
from anyquant.layers.mlp import GatedMLP
from anyquant.layers.norm import RMSNorm, add_rms_norm

if TYPE_CHECKING:
    from anyquant.models.base import DecoderArgs
    from anyquant.models.multimodal import CrossAttentionStep, CrossImage, CrossSequence
    from anyquant.parallel.partition import Partition
    from anyquant.parallel.state import ParallelState


class CrossAttention(nn.Module, TensorParallelLayer):
    """`cross_attn`: q/k/v/o projections and the q/k norms (heads split under tensor parallelism,
    KV heads split or replicated, as for self-attention)."""

    def __init__(self, prefix: str, args: DecoderArgs) -> None:
        super().__init__()
        if args.num_heads % args.num_kv_heads:
            raise CheckpointError(
                f"config.json ({prefix}): num_attention_heads={args.num_heads} is not a multiple of "
                f"num_key_value_heads={args.num_kv_heads}"
            )
        self.prefix = prefix
        h, hkv, d = args.num_heads, args.num_kv_heads, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, d
        hidden = args.hidden_size
        self.q_proj = QuantLinear(f"{prefix}.q_proj", hidden, h * d, style="column")
        self.k_proj = QuantLinear(f"{prefix}.k_proj", hidden, hkv * d, style="column")
        self.v_proj = QuantLinear(f"{prefix}.v_proj", hidden, hkv * d, style="column")
        self.o_proj = QuantLinear(f"{prefix}.o_proj", h * d, hidden, style="row")
        self.q_norm = RMSNorm(d, args.rms_norm_eps)
        self.k_norm = RMSNorm(d, args.rms_norm_eps)

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
            ),
        ]

    def set_parallel(self, partitions: Mapping[str, Partition], state: ParallelState) -> None:
        self.num_heads = partitions["heads"].local_size
        self.num_kv_heads = partitions["kv_heads"].local_size

    def keys_values(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """Image rows [S, hidden] -> keys, values [Hkv, S, D] (this rank's heads)."""
        s = states.shape[0]
        k = self.k_norm(self.k_proj(states).view(s, self.num_kv_heads, self.head_dim))
        v = self.v_proj(states).view(s, self.num_kv_heads, self.head_dim)
        return k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()

    def forward(self, x: Tensor, parts: list[tuple[int, int, Tensor, Tensor, Tensor]]) -> Tensor:
        """x [R, hidden] (the rows of sequences with images, grouped by sequence); `parts`: per
        sequence (first row in x, rows, keys, values, attend mask [rows, S])."""
        r = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(r, self.num_heads, self.head_dim))
        outs = []
        for first, rows, k, v, attend in parts:
            qs = q[first : first + rows].transpose(0, 1).unsqueeze(0)  # [1, H, rows, D]
            o = F.scaled_dot_product_attention(
                qs, k.unsqueeze(0), v.unsqueeze(0), attn_mask=attend[None, None], enable_gqa=True
            )
            outs.append(o[0].transpose(0, 1).reshape(rows, -1))
        return self.o_proj(torch.cat(outs))


class MllamaCrossLayer(nn.Module):
    """`layers.{i}` at a cross-attention index: gated cross-attention, then a gated MLP."""

    def __init__(self, prefix: str, args: DecoderArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.cross_attn = CrossAttention(f"{prefix}.cross_attn", args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = GatedMLP(f"{prefix}.mlp", args.hidden_size, args.intermediate_size, args.hidden_act)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.compute_dtype = torch.float32  # set by the loader (`set_compute_dtype`)

    def forward(self, x: Tensor, step: PreparedCross, index: int) -> Tensor:
        """x [T, hidden] (fp32 residual) -> the same with this layer applied to `step.rows`."""
        dtype = self.compute_dtype
        h = x.index_select(0, step.rows)
        parts = [(a, n, kv[index][0], kv[index][1], m) for a, n, kv, m in step.parts]
        attn = self.cross_attn(self.input_layernorm(h, dtype), parts)
        h, normed = add_rms_norm(
            h, self.cross_attn_attn_gate.float().tanh() * attn.float(), self.post_attention_layernorm, dtype
        )
        mlp = self.mlp(normed).float() * step.row_has_image
        h = h + self.cross_attn_mlp_gate.float().tanh() * mlp
        return x.index_copy(0, step.rows, h)


@dataclass
class _State:
    images: tuple[CrossImage, ...]
    kv: list[tuple[Tensor, Tensor]]  # per cross-attention layer, in order

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.kv for t in pair)


@dataclass(frozen=True)
class PreparedCross:
    """One step's cross-attention inputs, shared by every cross-attention layer."""

    rows: Tensor  # [R] the step rows that attend images, grouped by sequence
    # per sequence: (first index in `rows`, count, per-layer (k, v), attend mask [count, S])
    parts: list[tuple[int, int, list[tuple[Tensor, Tensor]], Tensor]]
    row_has_image: Tensor  # [R, 1] fp32: 0 where the row attends no image (its MLP branch is zeroed)


class CrossStates:
    """Each request's cross-attention keys and values on this rank, by the engine's key."""

    def __init__(self) -> None:
        self._states: dict[int, _State] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: int) -> bool:
        return key in self._states

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._states.values())

    def prepare(
        self, step: CrossAttentionStep, layers: list[MllamaCrossLayer], dtype: torch.dtype
    ) -> PreparedCross | None:
        """Free released states, build the new ones, and lay out this step's rows and masks."""
        for key in step.release:
            self._states.pop(key, None)
        if not step.sequences:
            return None
        rows: list[Tensor] = []
        parts: list[tuple[int, int, list[tuple[Tensor, Tensor]], Tensor]] = []
        has_image: list[Tensor] = []
        at = 0
        for seq in step.sequences:
            state = self._state_for(seq, layers, dtype)
            attend, any_image = attend_mask(state.images, seq.first_position, seq.num_rows)
            device = state.kv[0][0].device if state.kv else attend.device
            rows.append(torch.arange(seq.first_row, seq.first_row + seq.num_rows))
            parts.append((at, seq.num_rows, state.kv, attend.to(device)))
            has_image.append(any_image)
            at += seq.num_rows
        device = parts[0][3].device
        flags = torch.cat(has_image).to(device=device, dtype=torch.float32)[:, None]
        return PreparedCross(torch.cat(rows).to(device), parts, flags)

    def _state_for(self, seq: CrossSequence, layers: list[MllamaCrossLayer], dtype: torch.dtype) -> _State:
        if seq.states is not None:
            total = sum(im.num_keys for im in seq.images)
            if seq.states.shape[0] != total:
                raise AnyquantError(
                    f"cross-attention states of {seq.states.shape[0]} rows for images of {total} keys"
                )
            states = seq.states.to(dtype)
            with torch.inference_mode():
                state = _State(seq.images, [layer.cross_attn.keys_values(states) for layer in layers])
            if seq.key >= 0:
                self._states[seq.key] = state
            return state
        kept = self._states.get(seq.key)
        if kept is None:
            raise AnyquantError(
                f"no cross-attention state for request key {seq.key} (built on its first step)"
            )
        return kept


def attend_mask(images: tuple[CrossImage, ...], first_position: int, rows: int) -> tuple[Tensor, Tensor]:
    """([rows, S] bool attend mask, [rows] bool "attends some image") for tokens at positions
    first_position .. first_position + rows - 1; rows that attend no image attend every key."""
    pos = torch.arange(first_position, first_position + rows)
    total = sum(im.num_keys for im in images)
    attend = torch.zeros(rows, total, dtype=torch.bool)
    at = 0
    for im in images:
        sees = pos >= im.first_token
        if im.end_token >= 0:
            sees &= pos < im.end_token
        attend[:, at : at + im.valid_keys] = sees[:, None]
        at += im.num_keys
    any_image = attend.any(dim=1)
    attend[~any_image] = True
    return attend, any_image
