"""Rotary position embeddings (rotate-half convention, as in HF checkpoints) with scaling variants.

Owns inverse frequencies for `default`, `linear`, `dynamic` (NTK), `llama3` scaling and YaRN, and the
rotation itself. The attention layer decides which part of each head is rotated.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from anyquant.config_fields import cfg_dict, cfg_float, cfg_int
from anyquant.errors import CheckpointError, UnsupportedError

# Numeric rope parameters: name -> must be > 0 (else any finite number).
_ROPE_NUMBERS = {
    "rope_theta": True,
    "factor": True,
    "low_freq_factor": True,
    "high_freq_factor": True,
    "beta_fast": True,
    "beta_slow": True,
    "attention_factor": True,
    "mscale": False,
    "mscale_all_dim": False,
}
_WHERE = "config.json rope_scaling"


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """Merge the two spellings transformers uses (`rope_scaling` + `rope_theta`, or `rope_parameters`),
    checked: every numeric parameter a finite number (positive where a zero or negative one
    would make the frequencies infinite or NaN), the rope type a string."""
    params = dict(cfg_dict(config, "rope_parameters"))
    scaling = cfg_dict(config, "rope_scaling")
    if params and any(k not in params or params[k] != v for k, v in scaling.items()):
        # transformers lets the legacy rope_scaling win, older readers the new key: ambiguous.
        raise CheckpointError(
            f"config.json: rope_scaling {scaling!r:.120} disagrees with rope_parameters {params!r:.120}; "
            "keep one of them"
        )
    params.update(scaling)
    if params.get("rope_theta") is None:
        params["rope_theta"] = cfg_float(config, "rope_theta", 10000.0, positive=True)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if not isinstance(rope_type, str):
        raise CheckpointError(f"{_WHERE}: rope_type = {rope_type!r:.80}; expected a string")
    params["rope_type"] = rope_type
    # Some configs keep the pretraining length beside the scaling dict; transformers prefers it.
    if rope_type in ("llama3", "yarn") and config.get("original_max_position_embeddings") is not None:
        params["original_max_position_embeddings"] = config["original_max_position_embeddings"]
    for key, positive in _ROPE_NUMBERS.items():
        if params.get(key) is not None:
            params[key] = cfg_float(params, key, positive=positive, where=_WHERE)
    if params.get("original_max_position_embeddings") is not None:
        params["original_max_position_embeddings"] = cfg_int(
            params, "original_max_position_embeddings", where=_WHERE
        )
    if rope_type == "llama3" and params.get("low_freq_factor", 1.0) >= params.get("high_freq_factor", 4.0):
        raise CheckpointError(
            f"{_WHERE}: llama3 low_freq_factor={params.get('low_freq_factor', 1.0)} must be below "
            f"high_freq_factor={params.get('high_freq_factor', 4.0)}"
        )
    return params


def _yarn_find_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(
    inv: Tensor, dim: int, base: float, params: dict[str, Any], max_position: int
) -> tuple[Tensor, float]:
    """YaRN: blend interpolated and extrapolated frequencies; cos/sin scale from factor and mscales."""
    orig = int(params.get("original_max_position_embeddings") or max_position)
    if orig <= 0:
        raise CheckpointError(f"config.json: rope original_max_position_embeddings={orig}; expected > 0")
    # DeepSeek-style configs may leave `factor` out and mean the ratio of the two lengths.
    factor = float(params.get("factor") or max_position / orig)
    beta_fast = float(params.get("beta_fast") or 32)
    beta_slow = float(params.get("beta_slow") or 1)
    low = _yarn_find_correction_dim(beta_fast, dim, base, orig)
    high = _yarn_find_correction_dim(beta_slow, dim, base, orig)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
    mscale = params.get("mscale")
    mscale_all = params.get("mscale_all_dim")
    if params.get("attention_factor") is not None:
        attn_factor = float(params["attention_factor"])
    elif mscale and mscale_all:
        # The ratio only when both are given (transformers' rule); DeepSeek sets both, usually equal.
        attn_factor = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all))
    else:
        attn_factor = yarn_mscale(factor)
    return inv, attn_factor


def inverse_frequencies(dim: int, params: dict[str, Any], max_position: int) -> tuple[Tensor, float]:
    """(inv_freq [dim/2] float32, attention scaling factor applied to cos/sin)."""
    base = float(params["rope_theta"])
    # Explicit CPU device: models are built under a meta-device context, but these tables are real.
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    kind = params["rope_type"]
    factor = float(params.get("factor") or 1.0)
    attn_factor = 1.0
    if kind == "default":
        pass
    elif kind == "dynamic":
        # Dynamic NTK (InternLM2, older Llama configs) rescales the base only for a forward whose
        # sequence is longer than max_position_embeddings, so within the trained length it is the
        # plain rotation, as in transformers and InternLM2's own code; anyquant never runs past
        # that length (max_model_len is capped at it). Beyond it their result would depend on the
        # length of each forward call, which a paged cache cannot reproduce.
        pass
    elif kind == "linear":
        inv = inv / factor
    elif kind == "llama3":
        low = float(params.get("low_freq_factor", 1.0))
        high = float(params.get("high_freq_factor", 4.0))
        old_len = float(params.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_len / low, old_len / high
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = torch.where(is_mid, mid, scaled)
    elif kind == "yarn":
        inv, attn_factor = _yarn(inv, dim, base, params, max_position)
    else:
        raise UnsupportedError(
            f"config.json: rope type {kind!r} is not supported; supported: default, linear, dynamic, llama3, yarn"
        )
    return inv.float(), attn_factor


class RotaryEmbedding(nn.Module):
    def __init__(
        self, dim: int, params: dict[str, Any], max_position: int, interleaved: bool = False
    ) -> None:
        super().__init__()
        self.dim = dim
        self.interleaved = interleaved  # adjacent pairs (2i, 2i+1) instead of halves
        inv, self.attn_factor = inverse_frequencies(dim, params, max_position)
        self.inv_freq: Tensor
        self.register_buffer("inv_freq", inv, persistent=False)
        # cos/sin tables by position (not buffers: rebuilt on the buffers' device when they grow).
        self._cos = torch.empty(0, dim)
        self._sin = torch.empty(0, dim)

    def cos_sin(
        self, positions: Tensor, dtype: torch.dtype = torch.float32, max_position: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """The rotation of `positions` as two [T, 1, dim] factors in `dtype`, read from tables
        computed once (in fp32, growing as positions grow); once per forward step, shared by every
        layer (`max_position`: the largest of `positions`, if the caller knows it).
        `rotate(x) = x * cos + partner(x) * sin`, where partner(x) pairs each element with the
        one it rotates with and `sin` carries the sign."""
        if max_position is None and positions.numel():
            max_position = int(positions.max())  # a host sync; callers that know it pass it
        if max_position is not None and max_position >= self._cos.shape[0]:
            self._grow(max_position + 1)
        cos = self._cos.index_select(0, positions).to(dtype)
        sin = self._sin.index_select(0, positions).to(dtype)
        return cos[:, None, :], sin[:, None, :]

    def _grow(self, needed: int) -> None:
        size = max(needed, 2 * self._cos.shape[0], 4096)
        freqs = torch.arange(size, dtype=torch.float32, device=self.inv_freq.device)[:, None] * self.inv_freq
        cos, sin = freqs.cos() * self.attn_factor, freqs.sin() * self.attn_factor  # [N, dim/2]
        if self.interleaved:  # pairs (2i, 2i+1): x'[2i] = x[2i] c - x[2i+1] s, x'[2i+1] = x[2i+1] c + x[2i] s
            self._cos = cos.repeat_interleave(2, dim=-1)
            self._sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
        else:  # halves: x'[:h] = x[:h] c - x[h:] s, x'[h:] = x[h:] c + x[:h] s
            self._cos = torch.cat((cos, cos), dim=-1)
            self._sin = torch.cat((-sin, sin), dim=-1)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x: [T, heads, dim] with cos/sin from `cos_sin` (in x's dtype) -> rotated, same dtype."""
        if self.interleaved:
            partner = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x[2i+1], x[2i])
        else:
            partner = x.roll(self.dim // 2, dims=-1)  # (x[h:], x[:h])
        return torch.addcmul(x * cos, partner, sin)


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal rotary embedding (Qwen2-VL's M-RoPE): positions come as [3, T] (temporal,
    height, width); the rotary frequencies are cut into `sections` (summing to dim / 2) and
    section i turns with position row i % 3. Text tokens carry three equal rows, which is plain
    RoPE, so 1-D positions [T] take the inherited table path."""

    def __init__(self, dim: int, params: dict[str, Any], max_position: int, sections: list[int]) -> None:
        super().__init__(dim, params, max_position)
        if sum(sections) != dim // 2 or any(s < 0 for s in sections):
            raise CheckpointError(
                f"config.json: mrope_section {sections} must be non-negative and sum to head_dim / 2 = {dim // 2}"
            )
        # For each rotary frequency, the position row (0 temporal, 1 height, 2 width) that turns it.
        rows = [i % 3 for i, n in enumerate(sections) for _ in range(n)]
        self.section_rows = torch.tensor(rows, dtype=torch.long, device="cpu")

    def cos_sin(
        self, positions: Tensor, dtype: torch.dtype = torch.float32, max_position: int | None = None
    ) -> tuple[Tensor, Tensor]:
        if positions.dim() == 1:
            return super().cos_sin(positions, dtype, max_position)
        # [3, T, dim/2] angles, then each frequency from its own row (fp32, as the reference does).
        freqs = positions[:, :, None].float() * self.inv_freq.to(positions.device)
        index = self.section_rows.to(positions.device)[None, None, :].expand(1, *freqs.shape[1:])
        freqs = freqs.gather(0, index)[0]
        cos, sin = freqs.cos() * self.attn_factor, freqs.sin() * self.attn_factor
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]
