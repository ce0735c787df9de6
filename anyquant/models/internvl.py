"""InternVL 2 / 2.5 (`InternVLChatModel`, trust_remote_code layout): InternViT + pixel shuffle +
the `mlp1` projector in front of a Qwen2 / Qwen2.5 / InternLM2 / Llama language model.

Checkpoint names: `vision_model.*` (anyquant.models.internvit), `mlp1.{0: LayerNorm, 1: Linear,
3: Linear}` with an exact GELU between, `language_model.*` (the text family's own names). Config:
`vision_config`, `llm_config`, `downsample_ratio`, `select_layer`, `ps_version`,
`force_image_size`, `min/max_dynamic_patch`, `use_thumbnail`.

What multimodal plumbing uses: `image_token` (`<IMG_CONTEXT>`: one per image embedding),
`tokens_per_tile`, `image_pixels(image)` -> tiles, `embed_images(images)` -> [tiles *
tokens_per_tile, hidden] per image (`encode_tiles` for one tensor of tiles), `expand_image_prompt`
(the `<image>` markers -> `<img>` + N x `<IMG_CONTEXT>` + `</img>`) and
`forward(token_ids, positions, ctx, logits_rows, input_embeds)`, whose `input_embeds` (rows,
values) replace the placeholder rows' token embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from anyquant.config_fields import cfg_bool, cfg_dict, cfg_float, cfg_int, cfg_str
from anyquant.errors import AnyquantError, CheckpointError
from anyquant.layers.attention import AttentionContext
from anyquant.layers.linear import QuantLinear
from anyquant.models.base import InputEmbeds
from anyquant.models.internvit import InternViT, VisionArgs

if TYPE_CHECKING:
    from PIL.Image import Image

    from anyquant.models.protocol import CausalLM

IMAGE_MARKER = "<image>"  # what chat templates and users write where an image goes
IMAGE_START, IMAGE_TOKEN, IMAGE_END = "<img>", "<IMG_CONTEXT>", "</img>"
_LM = "language_model."


def pixel_shuffle(x: Tensor, ratio: float, version: str) -> Tensor:
    """[N, h, w, C] -> [N, h*r, w*r, C/r^2]: InternVL's space-to-depth (r = 0.5 merges 2x2 patches).

    ps_version "v2" (InternVL 1.5 and later) transposes back at the end; "v1" leaves the grid
    transposed, as the first releases did."""
    n, h, w, c = x.shape
    if h * ratio != int(h * ratio) or w * ratio != int(w * ratio) or c / ratio**2 != int(c / ratio**2):
        raise AnyquantError(f"a {h}x{w} patch grid cannot be pixel-shuffled by {ratio}")
    x = x.reshape(n, h, int(w * ratio), int(c / ratio)).permute(0, 2, 1, 3)
    x = x.reshape(n, int(w * ratio), int(h * ratio), int(c / (ratio * ratio)))
    return x.permute(0, 2, 1, 3) if version == "v2" else x


class Projector(nn.Sequential):
    """`mlp1`: LayerNorm -> Linear -> GELU -> Linear, in fp32 around the LayerNorm."""

    def __init__(self, vision_width: int, text_width: int) -> None:
        super().__init__(
            nn.LayerNorm(vision_width),
            QuantLinear("mlp1.1", vision_width, text_width, bias=True),
            nn.GELU(),
            QuantLinear("mlp1.3", text_width, text_width, bias=True),
        )
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        norm = cast(nn.LayerNorm, self[0])
        fc1, act, fc2 = self[1], self[2], self[3]
        y = nn.functional.layer_norm(
            x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps
        )
        return fc2(act(fc1(y.to(dtype or x.dtype))))


class InternVLChatModel(nn.Module):
    def __init__(self, root: dict[str, Any], language_model: CausalLM) -> None:
        super().__init__()
        vision = cfg_dict(root, "vision_config")
        if not vision:
            raise CheckpointError("config.json: InternVLChatModel needs a 'vision_config' section")
        self.vision_args = VisionArgs.from_hf(vision)
        self.tile_size = cfg_int(root, "force_image_size", self.vision_args.image_size)
        self.downsample_ratio = cfg_float(root, "downsample_ratio", 0.5, positive=True)
        self.ps_version = cfg_str(root, "ps_version", "v1")
        if self.ps_version not in ("v1", "v2"):
            raise CheckpointError(f"config.json: ps_version = {self.ps_version!r}; expected 'v1' or 'v2'")
        self.min_tiles = cfg_int(root, "min_dynamic_patch", 1)
        self.max_tiles = cfg_int(root, "max_dynamic_patch", 12)
        self.dynamic_tiles = cfg_bool(root, "dynamic_image_size", True)
        self.use_thumbnail = cfg_bool(root, "use_thumbnail", True)
        select = cfg_int(root, "select_layer", -1, minimum=-self.vision_args.num_layers)
        if select >= 0:
            raise CheckpointError(f"config.json: select_layer = {select}; expected a negative layer index")
        self.vision_model = InternViT(self.vision_args, run_layers=self.vision_args.num_layers + 1 + select)
        grid = self.tile_size // self.vision_args.patch_size
        self.tokens_per_tile = int(grid * self.downsample_ratio) ** 2
        vision_width = self.vision_args.hidden_size * int(1 / self.downsample_ratio) ** 2
        self.language_model = language_model
        self.args = language_model.args
        self.mlp1 = Projector(vision_width, self.args.hidden_size)
        self.cache_shape = language_model.cache_shape
        self.image_token = IMAGE_TOKEN
        self.ignorable_suffixes = language_model.ignorable_suffixes
        self.ignorable_prefixes = tuple(_LM + p for p in language_model.ignorable_prefixes)

    def tied_weights(self) -> dict[str, str]:
        return {_LM + k: _LM + v for k, v in self.language_model.tied_weights().items()}

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        self.language_model.set_compute_dtype(dtype)

    # -- images ---------------------------------------------------------------------------------
    def image_pixels(self, image: Image) -> Tensor:
        """One image -> [tiles, 3, S, S] pixel values (dynamic tiles + thumbnail, or one tile)."""
        from anyquant.models.internvl_image import pixel_values

        if not self.dynamic_tiles:
            return pixel_values(image, self.tile_size, 1, 1, False)
        return pixel_values(image, self.tile_size, self.min_tiles, self.max_tiles, self.use_thumbnail)

    def image_processor(self, model_dir: Path) -> Any:
        """The engine's `ImageProcessor` for this checkpoint (anyquant.models.internvl_processor)."""
        from anyquant.models.internvl_processor import InternVLImageProcessor

        return InternVLImageProcessor(self, Path(model_dir))

    def embed_images(self, images: Sequence[Any]) -> list[Tensor]:
        """Images preprocessed into `tensors["pixel_values"]` [tiles, 3, S, S] -> per image, fp32
        [tiles * tokens_per_tile, hidden]; all tiles go through the encoder in one batch."""
        pixels = [image.tensors["pixel_values"] for image in images]
        rows = self.encode_tiles(torch.cat(pixels)) if pixels else torch.empty(0)
        return list(rows.split([p.shape[0] * self.tokens_per_tile for p in pixels]))

    def encode_tiles(self, pixels: Tensor) -> Tensor:
        """pixels [tiles, 3, S, S] -> fp32 [tiles * tokens_per_tile, hidden], one row per
        `<IMG_CONTEXT>` token, tile by tile."""
        if pixels.dim() != 4 or pixels.shape[1:] != (3, self.tile_size, self.tile_size):
            raise AnyquantError(
                f"InternVL expects pixel values [tiles, 3, {self.tile_size}, {self.tile_size}], got {list(pixels.shape)}"
            )
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        states = self.vision_model(pixels)[:, 1:]  # drop the class token: [N, h*w, C]
        n, patches, c = states.shape
        side = int(patches**0.5)
        shuffled = pixel_shuffle(states.reshape(n, side, side, c), self.downsample_ratio, self.ps_version)
        merged = shuffled.reshape(n * self.tokens_per_tile, -1)
        return self.mlp1(merged, dtype).float()

    def expand_image_prompt(self, prompt: str, tiles_per_image: list[int]) -> str:
        """Each `<image>` marker, in order, -> `<img>` + tiles * tokens_per_tile `<IMG_CONTEXT>` +
        `</img>`. A prompt without markers gets one `<image>\\n` per image in front (what
        InternVL's own chat helper does)."""
        found = prompt.count(IMAGE_MARKER)
        if found == 0 and tiles_per_image:
            prompt = f"{IMAGE_MARKER}\n" * len(tiles_per_image) + prompt
        elif found != len(tiles_per_image):
            raise AnyquantError(
                f"the prompt has {found} {IMAGE_MARKER} markers for {len(tiles_per_image)} images"
            )
        parts = prompt.split(IMAGE_MARKER)
        out = [parts[0]]
        for tiles, rest in zip(tiles_per_image, parts[1:]):
            out.append(IMAGE_START + IMAGE_TOKEN * (tiles * self.tokens_per_tile) + IMAGE_END + rest)
        return "".join(out)

    # -- language model ---------------------------------------------------------------------------
    def forward(
        self,
        token_ids: Tensor,
        positions: Tensor,
        ctx: AttentionContext,
        logits_rows: Tensor | None = None,
        input_embeds: InputEmbeds | None = None,
    ) -> Tensor:
        """The language model's forward; `input_embeds` (rows, values) replace the token
        embeddings of the image placeholder rows."""
        return self.language_model(token_ids, positions, ctx, logits_rows, input_embeds)

    @property
    def model(self) -> nn.Module:
        """The language model's decoder body (what memory estimates read the embedding width from)."""
        lm: Any = self.language_model
        return lm.model

    @property
    def body(self) -> nn.Module:
        lm: Any = self.language_model
        return lm.body if hasattr(lm, "body") else lm.model


def _add_prefix(module: CausalLM, root: str) -> None:
    """Move a text family built with top-level names under `root` (its checkpoint prefix): the
    prefixes layers use to find their tensors and name their split groups."""
    for m in module.modules():
        prefix = getattr(m, "prefix", None)
        if isinstance(prefix, str):
            m.prefix = root + prefix  # type: ignore[assignment]


# llm_config.model_type -> the text family (the loader hands the language model's fields merged
# with the top-level ones, so its own `architectures` is replaced by InternVLChatModel's).
TEXT_FAMILIES = {
    "internlm2": "InternLM2ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}


def build(config: dict[str, Any]) -> InternVLChatModel:
    """From the loader's text config (the llm_config fields with the top-level ones beside them)
    or from a whole config.json (with its `llm_config`)."""
    from anyquant.models.registry import build_model

    nested = cfg_dict(config, "llm_config")
    if nested:
        llm = dict(nested)
    else:
        llm = dict(config)
        model_type = config.get("model_type")
        if model_type not in TEXT_FAMILIES:
            raise CheckpointError(
                f"config.json: llm_config.model_type = {model_type!r}; InternVL runs with the language "
                f"models {', '.join(sorted(TEXT_FAMILIES))}"
            )
        llm["architectures"] = [TEXT_FAMILIES[model_type]]
    if not llm.get("architectures"):
        raise CheckpointError(
            "config.json: llm_config.architectures is missing (e.g. ['InternLM2ForCausalLM'])"
        )
    language_model = build_model(llm)
    _add_prefix(language_model, _LM)
    return InternVLChatModel(config, language_model)
