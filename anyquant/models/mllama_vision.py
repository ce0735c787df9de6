"""The Llama-3.2-Vision (mllama) tiled vision encoder.

Each image arrives as `max_num_tiles` tiles (unused ones zero) with the id of its tile arrangement.
Per tile: a patch convolution, a gated embedding of the arrangement added to every patch
(pre-tile), a class token, position embeddings gated against per-arrangement tile-position
embeddings, LayerNorm; the patches of a tile are zero-padded to a multiple of 8. The local
transformer then runs over all tiles of an image at once, keeping the outputs of the layers in
`intermediate_layers_indices`; after a LayerNorm and a second gated arrangement embedding
(post-tile), the global transformer (tanh-gated residual branches) runs. Its output, padding
removed, concatenated with the kept intermediate outputs (interleaved as the reference stacks
them) is `vision_output_dim` wide per patch; the multi-modal projector maps it into the language
model's width. The attention mask is the reference's: only pairs of two padding positions (padding
patches, or unused tiles) are masked, so real patches see everything.

Linear layers are `QuantLinear`s, replicated under tensor parallelism: the tensors present decide
whether the tower runs quantized or dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anyquant.config_fields import cfg_float, cfg_int, cfg_int_list, cfg_str
from anyquant.errors import CheckpointError
from anyquant.layers.activation import activation
from anyquant.layers.linear import QuantLinear
from anyquant.models.qwen2_vl_vision import LayerNorm

_WHERE = "config.json vision_config"


@dataclass(frozen=True)
class MllamaVisionArgs:
    width: int
    num_heads: int
    mlp_hidden: int
    hidden_act: str
    num_layers: int
    num_global_layers: int
    in_channels: int
    image_size: int
    patch_size: int
    max_num_tiles: int
    num_aspect_ratios: int  # arrangement ids are 1..num_aspect_ratios (0: no image)
    intermediate_layers: tuple[int, ...]
    output_dim: int
    norm_eps: float

    @classmethod
    def from_hf(cls, vision: dict[str, Any]) -> MllamaVisionArgs:
        width = cfg_int(vision, "hidden_size", 1280, where=_WHERE)
        tiles = cfg_int(vision, "max_num_tiles", 4, minimum=1, where=_WHERE)
        ratios = vision.get("supported_aspect_ratios")
        num_ratios = (
            len(ratios)
            if isinstance(ratios, list)
            else sum(1 for a in range(1, tiles + 1) for b in range(1, tiles + 1) if a * b <= tiles)
        )
        layers = cfg_int(vision, "num_hidden_layers", 32, where=_WHERE)
        kept = tuple(cfg_int_list(vision, "intermediate_layers_indices", where=_WHERE) or (3, 7, 15, 23, 30))
        if any(not -layers <= i < layers for i in kept):
            raise CheckpointError(
                f"{_WHERE}: intermediate_layers_indices {list(kept)} outside the {layers} layers"
            )
        args = cls(
            width=width,
            num_heads=cfg_int(vision, "attention_heads", vision.get("num_attention_heads", 16), where=_WHERE),
            mlp_hidden=cfg_int(vision, "intermediate_size", 5120, where=_WHERE),
            hidden_act=cfg_str(vision, "hidden_act", "gelu", where=_WHERE),
            num_layers=layers,
            num_global_layers=cfg_int(vision, "num_global_layers", 8, where=_WHERE),
            in_channels=cfg_int(vision, "num_channels", 3, where=_WHERE),
            image_size=cfg_int(vision, "image_size", 448, where=_WHERE),
            patch_size=cfg_int(vision, "patch_size", 14, where=_WHERE),
            max_num_tiles=tiles,
            num_aspect_ratios=num_ratios,
            intermediate_layers=kept,
            output_dim=cfg_int(vision, "vision_output_dim", 7680, where=_WHERE),
            norm_eps=cfg_float(vision, "norm_eps", 1e-5, minimum=0.0, where=_WHERE),
        )
        if args.output_dim != width * (1 + len(kept)):
            raise CheckpointError(
                f"{_WHERE}: vision_output_dim {args.output_dim} != hidden_size {width} x (1 + "
                f"{len(kept)} intermediate layers)"
            )
        return args

    @property
    def patches_per_tile(self) -> int:
        """Patches of one tile plus its class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class _Table(nn.Module):
    """A checkpoint `nn.Embedding` read as a lookup table (`.weight`)."""

    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.weight = _param(rows, width)


class AspectRatioEmbedding(nn.Module):
    """`pre_/post_tile_positional_embedding`: a gated per-arrangement vector for each tile."""

    def __init__(self, args: MllamaVisionArgs) -> None:
        super().__init__()
        self.embedding = _Table(args.num_aspect_ratios + 1, args.max_num_tiles * args.width)
        self.gate = _param(1)
        self.tiles, self.width = args.max_num_tiles, args.width

    def forward(self, x: Tensor, ratio_ids: Tensor) -> Tensor:
        """x [B, tiles, patches, width] (fp32)."""
        rows = self.embedding.weight[ratio_ids].float().view(-1, self.tiles, 1, self.width)
        return x + rows * self.gate.float().tanh()


class GatedPositionEmbedding(nn.Module):
    """`gated_positional_embedding`: patch positions, gated against per-arrangement tile positions."""

    def __init__(self, args: MllamaVisionArgs) -> None:
        super().__init__()
        self.patches = args.patches_per_tile
        self.embedding = _param(self.patches, args.width)
        self.gate = _param(1)
        self.tile_embedding = _Table(
            args.num_aspect_ratios + 1, args.max_num_tiles * self.patches * args.width
        )
        self.tiles, self.width = args.max_num_tiles, args.width

    def forward(self, x: Tensor, ratio_ids: Tensor) -> Tensor:
        gate = self.gate.float().tanh()
        x = x + (1 - gate) * self.embedding.float().view(1, 1, self.patches, self.width)
        tiles = self.tile_embedding.weight[ratio_ids].float().view(-1, self.tiles, self.patches, self.width)
        return x + gate * tiles


class VisionLayer(nn.Module):
    """A pre-norm block; `gated` (global layers): tanh gates on both residual branches."""

    def __init__(self, prefix: str, args: MllamaVisionArgs, gated: bool) -> None:
        super().__init__()
        w = args.width
        self.num_heads, self.head_dim = args.num_heads, w // args.num_heads
        self.input_layernorm = LayerNorm(w, args.norm_eps)
        self.post_attention_layernorm = LayerNorm(w, args.norm_eps)
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            self.self_attn.add_module(name, QuantLinear(f"{prefix}.self_attn.{name}", w, w))
        self.mlp = nn.Module()
        self.mlp.add_module("fc1", QuantLinear(f"{prefix}.mlp.fc1", w, args.mlp_hidden, bias=True))
        self.mlp.add_module("fc2", QuantLinear(f"{prefix}.mlp.fc2", args.mlp_hidden, w, bias=True))
        self.act = activation(args.hidden_act)
        self.gated = gated
        if gated:
            self.gate_attn = _param(1)
            self.gate_ffn = _param(1)

    def _linear(self, owner: nn.Module, name: str) -> QuantLinear:
        layer = getattr(owner, name)
        assert isinstance(layer, QuantLinear)
        return layer

    def forward(self, x: Tensor, attend: Tensor, dtype: torch.dtype) -> Tensor:
        """x [B, S, width] fp32; attend [B, 1, S, S] bool. Linear layers see 2-D rows."""
        b, s, w = x.shape
        h = self.input_layernorm(x, dtype).view(b * s, w)
        attn = self.self_attn
        q, k, v = (
            self._linear(attn, n)(h).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
            for n in ("q_proj", "k_proj", "v_proj")
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        out = self._linear(attn, "o_proj")(out.transpose(1, 2).reshape(b * s, -1)).view(b, s, w)
        if self.gated:
            out = out * self.gate_attn.float().tanh()
        x = x + out
        h = self.post_attention_layernorm(x, dtype).view(b * s, w)
        out = self._linear(self.mlp, "fc2")(self.act(self._linear(self.mlp, "fc1")(h))).view(b, s, w)
        if self.gated:
            out = out * self.gate_ffn.float().tanh()
        return x + out


class _Encoder(nn.Module):
    def __init__(self, prefix: str, args: MllamaVisionArgs, count: int, gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(f"{prefix}.layers.{i}", args, gated) for i in range(count))


class MllamaVisionModel(nn.Module):
    """`vision_model.*`: pixel tiles -> [images, tiles * patches, vision_output_dim]."""

    def __init__(self, prefix: str, args: MllamaVisionArgs) -> None:
        super().__init__()
        self.args = args
        self.patch_embedding = nn.Module()
        p = args.patch_size
        self.patch_embedding.weight = _param(args.width, args.in_channels, p, p)
        self.class_embedding = _param(args.width)
        self.gated_positional_embedding = GatedPositionEmbedding(args)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(args)
        self.post_tile_positional_embedding = AspectRatioEmbedding(args)
        self.layernorm_pre = LayerNorm(args.width, 1e-5)  # the reference's nn.LayerNorm default
        self.layernorm_post = LayerNorm(args.width, 1e-5)
        self.transformer = _Encoder(f"{prefix}.transformer", args, args.num_layers, gated=False)
        self.global_transformer = _Encoder(f"{prefix}.global_transformer", args, args.num_global_layers, True)

    @property
    def conv_weight(self) -> Tensor:
        w = self.patch_embedding.weight
        assert isinstance(w, Tensor)
        return w

    @property
    def device(self) -> torch.device:
        return self.conv_weight.device

    def forward(self, pixels: Tensor, ratio_ids: Tensor, num_tiles: Tensor) -> Tensor:
        """pixels [B, tiles, C, size, size], ratio_ids [B], num_tiles [B] ->
        [B, tiles * patches_per_tile, vision_output_dim] (fp32)."""
        a = self.args
        weight = self.conv_weight
        dtype = weight.dtype
        b, tiles = pixels.shape[:2]
        x = F.conv2d(pixels.flatten(0, 1).to(dtype), weight, stride=a.patch_size)
        x = x.flatten(2).transpose(1, 2).float().reshape(b, tiles, -1, a.width)
        x = self.pre_tile_positional_embedding(x, ratio_ids)
        cls = self.class_embedding.float().expand(b, tiles, 1, a.width)
        x = self.gated_positional_embedding(torch.cat([cls, x], dim=2), ratio_ids)
        x = self.layernorm_pre(x, torch.float32)
        patches = a.patches_per_tile
        padded = -(-patches // 8) * 8
        x = F.pad(x, (0, 0, 0, padded - patches))
        attend = self._attend_mask(num_tiles, tiles, patches, padded)
        x = x.reshape(b, tiles * padded, a.width)
        kept: list[Tensor] = []
        wanted = {i % a.num_layers for i in a.intermediate_layers}
        outputs: dict[int, Tensor] = {}
        for i, layer in enumerate(self.transformer.layers):
            x = layer(x, attend, dtype)
            if i in wanted:
                outputs[i] = x
        kept = [outputs[i % a.num_layers] for i in a.intermediate_layers]
        x = self.layernorm_post(x, torch.float32).view(b, tiles, padded, a.width)
        x = self.post_tile_positional_embedding(x, ratio_ids).view(b, tiles * padded, a.width)
        for layer in self.global_transformer.layers:
            x = layer(x, attend, dtype)
        inter = torch.stack(kept, dim=-1).reshape(b, tiles, padded, -1)[:, :, :patches]
        x = x.view(b, tiles, padded, a.width)[:, :, :patches]
        return torch.cat([x, inter], dim=-1).reshape(b, tiles * patches, a.output_dim)

    def _attend_mask(self, num_tiles: Tensor, tiles: int, patches: int, padded: int) -> Tensor:
        """[B, 1, S, S] bool: False only where query and key are both padding (the reference
        masks the product of the two padding indicators, nothing else)."""
        tile_pad = torch.arange(tiles, device=num_tiles.device)[None, :] >= num_tiles[:, None]  # [B, tiles]
        patch_pad = torch.arange(padded, device=num_tiles.device) >= patches  # [padded]
        pad = (tile_pad[:, :, None] | patch_pad[None, None, :]).reshape(num_tiles.shape[0], -1)
        return ~(pad[:, :, None] & pad[:, None, :]).unsqueeze(1)
