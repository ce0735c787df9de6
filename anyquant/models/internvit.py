"""InternViT, InternVL's vision encoder, in the trust_remote_code checkpoint layout (`vision_model.*`).

Owns the patch embedding (a stride-`patch` convolution), the class token, the learned position
table (bicubically resized when the patch grid differs from the trained one), and the pre-norm
layers with layer scale (`ls1`, `ls2`), a fused `attn.qkv` (q, k, v one after the other), optional
q/k RMSNorm over all heads together (the 6B encoders' `qk_normalization`) and LayerNorm or RMSNorm
(`norm_type`). Its linears are QuantLinears: the tensors present decide whether a checkpoint stored
them quantized (usually not). Always replicated under tensor parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anyquant.config_fields import cfg_bool, cfg_float, cfg_int, cfg_str
from anyquant.errors import CheckpointError
from anyquant.layers.activation import activation
from anyquant.layers.linear import QuantLinear
from anyquant.layers.norm import RMSNorm

_WHERE = "config.json vision_config"


@dataclass(frozen=True)
class VisionArgs:
    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_layers: int
    image_size: int  # the trained tile side, in pixels
    patch_size: int
    num_channels: int
    qkv_bias: bool
    qk_norm: bool
    norm_type: str  # "layer_norm" | "rms_norm"
    norm_eps: float
    hidden_act: str

    @classmethod
    def from_hf(cls, vision: dict[str, Any]) -> VisionArgs:
        """InternVisionConfig's keys, with its defaults."""
        hidden = cfg_int(vision, "hidden_size", 3200, where=_WHERE)
        heads = cfg_int(vision, "num_attention_heads", 25, where=_WHERE)
        if hidden % heads:
            raise CheckpointError(
                f"{_WHERE}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}"
            )
        norm_type = cfg_str(vision, "norm_type", "rms_norm", where=_WHERE)
        if norm_type not in ("layer_norm", "rms_norm"):
            raise CheckpointError(f"{_WHERE}: norm_type = {norm_type!r}; expected 'layer_norm' or 'rms_norm'")
        return cls(
            hidden_size=hidden,
            num_heads=heads,
            intermediate_size=cfg_int(vision, "intermediate_size", 12800, where=_WHERE),
            num_layers=cfg_int(vision, "num_hidden_layers", 48, where=_WHERE),
            image_size=_side(vision, "image_size", 224),
            patch_size=_side(vision, "patch_size", 14),
            num_channels=cfg_int(vision, "num_channels", 3, where=_WHERE),
            qkv_bias=cfg_bool(vision, "qkv_bias", False, where=_WHERE),
            qk_norm=cfg_bool(vision, "qk_normalization", False, where=_WHERE),
            norm_type=norm_type,
            norm_eps=cfg_float(vision, "layer_norm_eps", 1e-6, minimum=0.0, where=_WHERE),
            hidden_act=cfg_str(vision, "hidden_act", "gelu", where=_WHERE),
        )


def _side(config: dict[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, list | tuple):  # some exports write [h, w]; InternViT tiles are square
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{_WHERE}: {key} = {value!r}; expected one side (square tiles)")
        value = value[0]
    return cfg_int({key: value}, key, where=_WHERE)


def make_norm(args: VisionArgs) -> nn.Module:
    if args.norm_type == "rms_norm":
        return RMSNorm(args.hidden_size, args.norm_eps)
    return FloatLayerNorm(args.hidden_size, args.norm_eps)


class FloatLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the compute dtype (as RMSNorm is)."""

    def forward(self, x: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        y = F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)
        return y.to(out_dtype or x.dtype)


class VisionEmbeddings(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.args = args
        c = args.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, c), requires_grad=False)
        self.patch_embedding = nn.Conv2d(args.num_channels, c, args.patch_size, args.patch_size)
        self.patch_embedding.requires_grad_(False)
        grid = args.image_size // args.patch_size
        self.position_embedding = nn.Parameter(torch.empty(1, grid * grid + 1, c), requires_grad=False)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels [N, 3, H, W] -> [N, 1 + (H/p)(W/p), C] in fp32 (class token first)."""
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [N, C, h, w]
        n, c, h, w = patches.shape
        x = patches.flatten(2).transpose(1, 2).float()  # [N, h*w, C]
        table = self.position_embedding.float()
        grid = self.args.image_size // self.args.patch_size
        pos = table[:, 1:]
        if (h, w) != (grid, grid):
            square = pos.reshape(1, grid, grid, c).permute(0, 3, 1, 2)
            pos = F.interpolate(square, size=(h, w), mode="bicubic", align_corners=False)
            pos = pos.reshape(1, c, h * w).transpose(1, 2)
        cls = self.class_embedding.float().expand(n, 1, c) + table[:, :1]
        return torch.cat((cls, x + pos), dim=1)


class VisionAttention(nn.Module):
    def __init__(self, prefix: str, args: VisionArgs) -> None:
        super().__init__()
        c = args.hidden_size
        self.num_heads, self.head_dim = args.num_heads, c // args.num_heads
        self.qkv = QuantLinear(f"{prefix}.qkv", c, 3 * c, args.qkv_bias)
        self.proj = QuantLinear(f"{prefix}.proj", c, c, bias=True)
        # qk_normalization normalises all heads of a token together (width C, not head_dim).
        self.q_norm = RMSNorm(c, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(c, args.norm_eps) if args.qk_norm else None

    def forward(self, x: Tensor) -> Tensor:
        """x [N, L, C] (compute dtype) -> [N, L, C]; every token attends to every token of its tile."""
        n, length, c = x.shape
        q, k, v = self.qkv(x.reshape(n * length, c)).view(n, length, 3, c).unbind(2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)  # [N, heads, L, D]
        return self.proj(o.transpose(1, 2).reshape(n * length, c)).view(n, length, c)


class VisionMLP(nn.Module):
    def __init__(self, prefix: str, args: VisionArgs) -> None:
        super().__init__()
        self.fc1 = QuantLinear(f"{prefix}.fc1", args.hidden_size, args.intermediate_size, bias=True)
        self.fc2 = QuantLinear(f"{prefix}.fc2", args.intermediate_size, args.hidden_size, bias=True)
        self.act = activation(args.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        n, length, c = x.shape
        return self.fc2(self.act(self.fc1(x.reshape(n * length, c)))).view(n, length, c)


class VisionLayer(nn.Module):
    def __init__(self, prefix: str, args: VisionArgs) -> None:
        super().__init__()
        self.norm1 = make_norm(args)
        self.attn = VisionAttention(f"{prefix}.attn", args)
        self.ls1 = nn.Parameter(torch.empty(args.hidden_size), requires_grad=False)
        self.norm2 = make_norm(args)
        self.mlp = VisionMLP(f"{prefix}.mlp", args)
        self.ls2 = nn.Parameter(torch.empty(args.hidden_size), requires_grad=False)

    def forward(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """x: the fp32 residual stream; sublayers run in `dtype`, scaled by ls1 / ls2 in fp32."""
        x = x + self.ls1.float() * self.attn(self.norm1(x, dtype)).float()
        return x + self.ls2.float() * self.mlp(self.norm2(x, dtype)).float()


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            VisionLayer(f"vision_model.encoder.layers.{i}", args) for i in range(args.num_layers)
        )


class InternViT(nn.Module):
    """`vision_model`: tiles [N, 3, H, W] -> hidden states [N, 1 + patches, C] (fp32)."""

    def __init__(self, args: VisionArgs, run_layers: int | None = None) -> None:
        super().__init__()
        self.args = args
        self.embeddings = VisionEmbeddings(args)
        self.encoder = VisionEncoder(args)
        # `select_layer` < -1 reads an earlier layer's output: the layers after it never run.
        self.run_layers = args.num_layers if run_layers is None else run_layers

    def forward(self, pixels: Tensor) -> Tensor:
        dtype = self.embeddings.patch_embedding.weight.dtype  # the compute dtype
        x = self.embeddings(pixels)
        for layer in self.encoder.layers[: self.run_layers]:
            x = layer(x, dtype)
        return x
