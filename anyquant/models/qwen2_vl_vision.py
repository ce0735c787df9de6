"""The Qwen2-VL and Qwen2.5-VL vision transformers and their patch mergers.

Patches (already cut by the image processor, in merge-block order) -> linear patch embedding
(the checkpoint's Conv3d, whose stride equals its kernel, is one matmul per patch) -> blocks of
bidirectional attention with 2-D rotary positions (half the rotary frequencies turn with the
patch row, half with the column) -> patch merger (norm, then merge_size^2 neighbouring patches
concatenated and projected into the language model's width).

Qwen2-VL: LayerNorm, MLP fc1/fc2. Qwen2.5-VL: RMSNorm, gated MLP with biases, and window
attention: patches are regrouped into windows of window_size pixels (whole merge blocks), every
block but those in `fullatt_block_indexes` attends within its window, and the merger's output is
put back into the original order. Linear layers are `QuantLinear`s (replicated under tensor
parallelism), so a quantized vision tower loads like any other layer and an unquantized one runs
dense: the tensors present decide.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anyquant.config_fields import cfg_float, cfg_int, cfg_int_list, cfg_str
from anyquant.layers.activation import activation
from anyquant.layers.linear import QuantLinear
from anyquant.layers.norm import RMSNorm

_WHERE = "config.json vision_config"


@dataclass(frozen=True)
class VisionArgs:
    depth: int
    width: int  # the ViT's hidden size
    num_heads: int
    mlp_hidden: int
    hidden_act: str
    out_size: int  # the language model's hidden size (merger output)
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    rope_theta: float
    v25: bool  # Qwen2.5-VL: RMSNorm, gated MLP, window attention
    window_size: int = 0
    fullatt_blocks: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, vision: dict[str, Any], lm_hidden: int, v25: bool) -> VisionArgs:
        rope = vision.get("rope_parameters") if isinstance(vision.get("rope_parameters"), dict) else {}
        assert isinstance(rope, dict)
        theta = cfg_float(rope, "rope_theta", 10000.0, positive=True, where=f"{_WHERE} rope_parameters")
        common: dict[str, Any] = dict(
            depth=cfg_int(vision, "depth", where=_WHERE),
            num_heads=cfg_int(vision, "num_heads", where=_WHERE),
            in_channels=cfg_int(vision, "in_channels", vision.get("in_chans", 3), where=_WHERE),
            patch_size=cfg_int(vision, "patch_size", 14, where=_WHERE),
            temporal_patch_size=cfg_int(vision, "temporal_patch_size", 2, where=_WHERE),
            spatial_merge_size=cfg_int(vision, "spatial_merge_size", 2, where=_WHERE),
            rope_theta=theta,
            v25=v25,
        )
        if v25:
            return cls(
                width=cfg_int(vision, "hidden_size", where=_WHERE),
                mlp_hidden=cfg_int(vision, "intermediate_size", where=_WHERE),
                hidden_act=cfg_str(vision, "hidden_act", "silu", where=_WHERE),
                out_size=cfg_int(vision, "out_hidden_size", lm_hidden, where=_WHERE),
                window_size=cfg_int(vision, "window_size", 112, where=_WHERE),
                fullatt_blocks=tuple(cfg_int_list(vision, "fullatt_block_indexes", where=_WHERE)),
                **common,
            )
        width = cfg_int(vision, "embed_dim", where=_WHERE)
        ratio = cfg_float(vision, "mlp_ratio", 4.0, positive=True, where=_WHERE)
        return cls(
            width=width,
            mlp_hidden=int(width * ratio),
            hidden_act=cfg_str(vision, "hidden_act", "quick_gelu", where=_WHERE),
            # The merger projects into the language model's width (`hidden_size` of vision_config).
            out_size=cfg_int(vision, "hidden_size", lm_hidden, where=_WHERE),
            **common,
        )

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias, computed in fp32."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor, out_dtype: torch.dtype) -> Tensor:
        y = F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps)
        return y.to(out_dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE in fp32 (as the reference does for the vision tower)."""
    xf = x.float()
    half = xf.shape[-1] // 2
    partner = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + partner * sin).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, prefix: str, args: VisionArgs) -> None:
        super().__init__()
        self.num_heads, self.head_dim = args.num_heads, args.head_dim
        self.qkv = QuantLinear(f"{prefix}.qkv", args.width, 3 * args.width, bias=True)
        self.proj = QuantLinear(f"{prefix}.proj", args.width, args.width, bias=True)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, segments: list[int]) -> Tensor:
        """x [S, width]; attention within each segment of `segments` (cumulative bounds)."""
        s = x.shape[0]
        q, k, v = self.qkv(x).view(s, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        # [1, H, S, D]: SDPA's CPU flash kernel takes 4-D inputs (3-D ones fall back to the math
        # path, about 3x slower on a 448x448 image at Qwen2-VL-2B's width).
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if len(segments) == 2:  # one segment: the whole sequence
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
                    for a, b in itertools.pairwise(segments)
                ],
                dim=2,
            )
        return self.proj(out[0].transpose(0, 1).reshape(s, -1))


class VisionMLP(nn.Module):
    def __init__(self, prefix: str, args: VisionArgs) -> None:
        super().__init__()
        self.gated = args.v25
        self.act = activation(args.hidden_act)
        if self.gated:
            self.gate_proj = QuantLinear(f"{prefix}.gate_proj", args.width, args.mlp_hidden, bias=True)
            self.up_proj = QuantLinear(f"{prefix}.up_proj", args.width, args.mlp_hidden, bias=True)
            self.down_proj = QuantLinear(f"{prefix}.down_proj", args.mlp_hidden, args.width, bias=True)
        else:
            self.fc1 = QuantLinear(f"{prefix}.fc1", args.width, args.mlp_hidden, bias=True)
            self.fc2 = QuantLinear(f"{prefix}.fc2", args.mlp_hidden, args.width, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


def _norm(args: VisionArgs, size: int) -> nn.Module:
    return RMSNorm(size, 1e-6) if args.v25 else LayerNorm(size, 1e-6)


class VisionBlock(nn.Module):
    def __init__(self, prefix: str, args: VisionArgs) -> None:
        super().__init__()
        self.norm1 = _norm(args, args.width)
        self.norm2 = _norm(args, args.width)
        self.attn = VisionAttention(f"{prefix}.attn", args)
        self.mlp = VisionMLP(f"{prefix}.mlp", args)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, segments: list[int], dtype: torch.dtype) -> Tensor:
        x = x + self.attn(self.norm1(x, dtype), cos, sin, segments)
        return x + self.mlp(self.norm2(x, dtype))


class PatchMerger(nn.Module):
    def __init__(self, prefix: str, args: VisionArgs) -> None:
        super().__init__()
        self.merged = args.width * args.spatial_merge_size**2
        self.ln_q = _norm(args, args.width)
        self.mlp = nn.Module()  # the checkpoint's nn.Sequential: mlp.0 (linear), GELU, mlp.2
        self.mlp.add_module("0", QuantLinear(f"{prefix}.mlp.0", self.merged, self.merged, bias=True))
        self.mlp.add_module("2", QuantLinear(f"{prefix}.mlp.2", self.merged, args.out_size, bias=True))

    def forward(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        h = self.ln_q(x, dtype).reshape(-1, self.merged)
        first, second = getattr(self.mlp, "0"), getattr(self.mlp, "2")
        return second(F.gelu(first(h)))


class PatchEmbed(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.proj = nn.Module()
        p, t = args.patch_size, args.temporal_patch_size
        self.proj.weight = nn.Parameter(
            torch.empty(args.width, args.in_channels, t, p, p), requires_grad=False
        )

    @property
    def weight(self) -> Tensor:
        w = self.proj.weight
        assert isinstance(w, Tensor)
        return w

    def forward(self, pixels: Tensor) -> Tensor:
        w = self.weight
        return pixels.to(w.dtype) @ w.reshape(w.shape[0], -1).T


class VisionTransformer(nn.Module):
    def __init__(self, prefix: str, args: VisionArgs) -> None:
        super().__init__()
        self.args = args
        self.patch_embed = PatchEmbed(args)
        self.blocks = nn.ModuleList(VisionBlock(f"{prefix}.blocks.{i}", args) for i in range(args.depth))
        self.merger = PatchMerger(f"{prefix}.merger", args)
        quarter = args.head_dim // 2  # each of the two axes turns head_dim / 4 frequencies
        exponents = torch.arange(0, quarter, 2, dtype=torch.float32, device="cpu") / quarter
        self.inv_freq = 1.0 / (args.rope_theta**exponents)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.weight.device

    def forward(self, pixels: Tensor, grids: list[tuple[int, int, int]]) -> Tensor:
        """pixels [patches, C * t * p * p] of the images with these (t, h, w) grids, in order ->
        merged embeddings [patches / merge^2, out_size], image after image."""
        dtype = self.dtype
        x = self.patch_embed(pixels).float()  # the residual stream stays in fp32
        angles = self._angles(grids).to(x.device)
        full = _cumulative([h * w for t, h, w in grids for _ in range(t)])
        order: Tensor | None = None
        windows = full
        if self.args.v25:
            order, windows = self._windows(grids)
            unit = self.args.spatial_merge_size**2
            order = order.to(x.device)
            x = x.view(-1, unit, x.shape[-1])[order].reshape(x.shape)
            angles = angles.view(-1, unit, angles.shape[-1])[order].reshape(angles.shape)
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        for i, block in enumerate(self.blocks):
            segments = full if not self.args.v25 or i in self.args.fullatt_blocks else windows
            x = block(x, cos, sin, segments, dtype)
        merged = self.merger(x, dtype)
        if order is not None:
            merged = merged[torch.argsort(order)]
        return merged

    def _angles(self, grids: list[tuple[int, int, int]]) -> Tensor:
        """[patches, head_dim / 2]: row-position angles then column-position angles per patch,
        with patches in merge-block order (as the processor emits them)."""
        m = self.args.spatial_merge_size
        out = []
        for t, h, w in grids:
            rows = torch.arange(h)[:, None].expand(h, w)
            cols = torch.arange(w)[None, :].expand(h, w)
            rows = rows.reshape(h // m, m, w // m, m).transpose(1, 2).flatten()
            cols = cols.reshape(h // m, m, w // m, m).transpose(1, 2).flatten()
            pos = torch.stack((rows, cols), dim=-1).repeat(t, 1).float()  # [t*h*w, 2]
            out.append((pos[:, :, None] * self.inv_freq).flatten(1))
        return torch.cat(out)

    def _windows(self, grids: list[tuple[int, int, int]]) -> tuple[Tensor, list[int]]:
        """Qwen2.5-VL window attention: the merge-block order that groups each window's blocks
        together, and the windows' cumulative bounds in patches (ragged windows at the right and
        bottom edges)."""
        m = self.args.spatial_merge_size
        side = self.args.window_size // m // self.args.patch_size  # window side in merge blocks
        order: list[Tensor] = []
        sizes: list[int] = []
        base = 0
        for t, h, w in grids:
            bh, bw = h // m, w // m
            index = torch.arange(t * bh * bw).reshape(t, bh, bw)
            for frame in range(t):
                for r in range(0, bh, side):
                    for c in range(0, bw, side):
                        block = index[frame, r : r + side, c : c + side].flatten()
                        order.append(block + base)
                        sizes.append(block.numel() * m * m)
            base += t * bh * bw
        return torch.cat(order), _cumulative(sizes)


def _cumulative(sizes: list[int]) -> list[int]:
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    return bounds
