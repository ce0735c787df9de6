"""Llama-3.2-Vision (`MllamaForConditionalGeneration`): a Llama decoder with cross-attention
layers at `cross_attention_layers`, the tiled vision encoder (models/mllama_vision.py) and the
multi-modal projector. Images do not become prompt rows: each `<|image|>` stays one token and the
cross-attention layers attend to the projected image states (models/mllama_text.py), with keys and
values built once per request and kept until the engine releases the request.

Tensor layouts: the hub's (`language_model.model.*`, `language_model.lm_head`, `vision_model.*`,
`multi_modal_projector.*`; what transformers 4.45+ and 5 save) and transformers 5's in-memory one
(`model.language_model.*`, `model.vision_model.*`, `model.multi_modal_projector.*`, `lm_head`),
which some export tools write. Configs: `text_config` / `vision_config` with rope in
`rope_scaling` + `rope_theta` (4.45+) or `rope_parameters` (5). The token embedding has 8 rows more
than the vocabulary (the `<|image|>` token's row is one of them): under tensor parallelism it is
split evenly on its own (the LM head's vocab split has 8 rows fewer), the decoder splits as for
text models (cross-attention by heads) and the vision tower is replicated (run on rank 0; its
states travel with the request's first step).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from anyquant.config_fields import cfg_dict, cfg_int_list
from anyquant.errors import CheckpointError
from anyquant.layers.attention import AttentionContext
from anyquant.layers.embedding import VocabParallelEmbedding
from anyquant.layers.linear import QuantLinear, SplitGroup, TensorParallelLayer
from anyquant.layers.norm import RMSNorm
from anyquant.layers.rotary import RotaryEmbedding
from anyquant.models.base import CacheShape, DecoderArgs, DecoderLayer, InputEmbeds, dense_mlp, gqa_attention
from anyquant.models.mllama_processor import MllamaImageProcessor
from anyquant.models.mllama_text import CrossStates, MllamaCrossLayer
from anyquant.models.mllama_vision import MllamaVisionArgs, MllamaVisionModel
from anyquant.models.multimodal import CrossAttentionStep, ImageInput, ImageProcessor
from anyquant.parallel.partition import split_units

if TYPE_CHECKING:
    from anyquant.parallel.partition import Partition
    from anyquant.parallel.state import ParallelState

# transformers sizes the token embedding 8 rows past the vocabulary (the image token and spares).
EXTRA_EMBEDDING_ROWS = 8


def uses_nested_names(tensor_names: Collection[str]) -> bool:
    return any(n.startswith(("model.language_model.", "model.vision_model.")) for n in tensor_names)


class MllamaTextBody(nn.Module):
    """The decoder body: embed_tokens, self-attention layers (their KV-cache slots numbered
    among self-attention layers only) and cross-attention layers, norm."""

    def __init__(
        self, args: DecoderArgs, cross: tuple[int, ...], body_path: str, rotary: RotaryEmbedding
    ) -> None:
        super().__init__()
        self.rotary = rotary
        rows = args.vocab_size + EXTRA_EMBEDDING_ROWS
        self.embed_tokens = nn.Embedding(rows, args.hidden_size, _weight=torch.empty(rows, args.hidden_size))
        self.embed_tokens.weight.requires_grad_(False)
        layers: list[nn.Module] = []
        cached = 0
        for i in range(args.num_layers):
            if i in cross:
                layers.append(MllamaCrossLayer(f"{body_path}.layers.{i}", args))
                continue

            def attention(
                a: DecoderArgs, index: int, prefix: str, r: RotaryEmbedding, slot: int = cached
            ) -> nn.Module:
                return gqa_attention(a, slot, prefix, r)

            layers.append(DecoderLayer(args, i, rotary, dense_mlp, attention, body_path))
            cached += 1
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class MllamaForConditionalGeneration(nn.Module, TensorParallelLayer):
    """The run-time interface of `models.base.DecoderLM` (forward, args, cache_shape, body) plus
    the multimodal hooks; `args.num_layers` counts the layers with a KV cache (self-attention)."""

    ignorable_suffixes: tuple[str, ...] = (".rotary_emb.inv_freq",)
    ignorable_prefixes: tuple[str, ...] = ()

    def __init__(self, config: dict[str, Any], tensor_names: Collection[str]) -> None:
        super().__init__()
        nested = uses_nested_names(tensor_names)
        full = DecoderArgs.from_hf(config)
        cross = tuple(cfg_int_list(config, "cross_attention_layers"))
        if not cross or any(not 0 <= i < full.num_layers for i in cross) or len(set(cross)) != len(cross):
            raise CheckpointError(
                f"config.json text_config: cross_attention_layers {list(cross)} must be distinct indices "
                f"below num_hidden_layers={full.num_layers}"
            )
        vision = cfg_dict(config, "vision_config")
        if not vision:
            raise CheckpointError(
                "config.json: vision_config is missing (needed by a Llama-3.2-Vision model)"
            )
        self.config = config
        self.cross_layer_indices = cross
        self.args = replace(full, num_layers=full.num_layers - len(cross))
        self.vision_args = MllamaVisionArgs.from_hf(vision)
        self.body_path = "model.language_model" if nested else "language_model.model"
        vision_path = "model.vision_model" if nested else "vision_model"
        projector_path = "model.multi_modal_projector" if nested else "multi_modal_projector"
        rotary = RotaryEmbedding(full.head_dim, full.rope, full.max_position)
        body = MllamaTextBody(full, cross, self.body_path, rotary)
        root = nn.Module()
        self.add_module("model" if nested else "language_model", root)
        root.add_module("language_model" if nested else "model", body)
        owner: nn.Module = root if nested else self
        owner.add_module("vision_model", MllamaVisionModel(vision_path, self.vision_args))
        self.projector = QuantLinear(projector_path, self.vision_args.output_dim, full.hidden_size, bias=True)
        head = "lm_head" if nested else "language_model.lm_head"
        self.lm_head = QuantLinear(head, full.hidden_size, full.vocab_size, kind="lm_head", style="vocab")
        self.cache_shape = CacheShape(full.num_kv_heads, full.head_dim, full.head_dim)
        self.vision_path = vision_path
        self.cross_states = CrossStates()
        self.prompt_vocab_size = full.vocab_size + EXTRA_EMBEDDING_ROWS

    @property
    def body(self) -> MllamaTextBody:
        body = self.get_submodule(self.body_path)
        assert isinstance(body, MllamaTextBody)
        return body

    @property
    def vision_tower(self) -> MllamaVisionModel:
        tower = self.get_submodule(self.vision_path)
        assert isinstance(tower, MllamaVisionModel)
        return tower

    @property
    def cross_layers(self) -> list[MllamaCrossLayer]:
        return [m for m in self.body.layers if isinstance(m, MllamaCrossLayer)]

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        for layer in self.body.layers:  # self-attention (DecoderLayer) and cross-attention layers
            assert isinstance(layer, DecoderLayer | MllamaCrossLayer)
            layer.compute_dtype = dtype

    def split_groups(self) -> list[SplitGroup]:
        return [SplitGroup("vocab", self.lm_head.prefix, self.args.vocab_size, ((self.lm_head, 1),))]

    def set_parallel(self, partitions: Mapping[str, Partition], state: ParallelState) -> None:
        if state.is_parallel:  # the embedding's own even split: it has 8 rows more than the head
            rows = split_units(self.prompt_vocab_size, state.world_size)
            self.body.embed_tokens = VocabParallelEmbedding(rows, self.args.hidden_size, state)  # type: ignore[assignment]

    def tied_weights(self) -> dict[str, str]:
        # The embedding has more rows than the head: a tied head would not be this model's.
        return {}

    def cross_attention_summary(self, itemsize: int, kv_heads: int | None = None) -> dict[str, Any]:
        """For `inspect`: the cross-attention layers and the keys and values one image adds to a
        running request (per rank: `kv_heads` of them; default this model's)."""
        v = self.vision_args
        keys = v.max_num_tiles * v.patches_per_tile
        heads = kv_heads or self.cache_shape.num_kv_heads
        per_image = len(self.cross_layer_indices) * 2 * keys * heads * self.args.head_dim * itemsize
        return {
            "layers": list(self.cross_layer_indices),
            "keys_per_image": keys,
            "kv_bytes_per_image": per_image,
        }

    def image_processor(self, model_dir: Path) -> ImageProcessor:
        v = self.vision_args
        return MllamaImageProcessor(Path(model_dir), self.config, v.image_size, v.max_num_tiles, v.patch_size)

    def embed_images(self, images: list[ImageInput]) -> list[Tensor]:
        """The vision tower and projector over all `images` -> [tiles * patches, hidden] each
        (every tile, unused ones included: the reference attends to them on full-row-masked rows)."""
        tower = self.vision_tower
        dev = tower.device
        pixels = torch.stack([im.tensors["pixel_values"] for im in images]).to(dev)
        ratio_ids = torch.stack([im.tensors["aspect_ratio_id"] for im in images]).to(dev)
        num_tiles = torch.stack([im.tensors["num_tiles"] for im in images]).to(dev)
        with torch.inference_mode():
            states = tower(pixels, ratio_ids, num_tiles)
            rows = states.reshape(-1, states.shape[-1]).to(tower.conv_weight.dtype)
            # In the compute dtype: the encoder cache keeps these rows, the K/V are built from them.
            out = self.projector(rows).view(len(images), states.shape[1], -1)
        return list(out.unbind(0))

    def forward(
        self,
        token_ids: Tensor,
        positions: Tensor,
        ctx: AttentionContext,
        logits_rows: Tensor | None = None,
        input_embeds: InputEmbeds | None = None,
        cross: CrossAttentionStep | None = None,
    ) -> Tensor:
        """As `DecoderLM.forward`; `cross` names the step's sequences that attend images (the
        cross-attention layers run on their rows only) and the states to build or free."""
        if input_embeds is not None:
            raise ValueError("Llama-3.2-Vision takes images through cross-attention, not input rows")
        body = self.body
        dtype = body.embed_tokens.weight.dtype
        prepared = None
        if cross is not None:
            prepared = self.cross_states.prepare(cross, self.cross_layers, dtype)
        cos_sin = body.rotary.cos_sin(positions, dtype, ctx.max_position)
        x = body.embed_tokens(token_ids).float()
        index = 0
        for layer in body.layers:
            if isinstance(layer, MllamaCrossLayer):
                if prepared is not None:
                    x = layer(x, prepared, index)
                index += 1
            else:
                x = layer(x, positions, cos_sin, ctx)
        if logits_rows is not None:
            x = x[logits_rows]
        return self.lm_head(body.norm(x, dtype)).float()


def build(config: dict[str, Any], tensor_names: Collection[str] = ()) -> MllamaForConditionalGeneration:
    return MllamaForConditionalGeneration(config, tensor_names)
