"""Shared pieces of decoder-only causal LMs: config reading, the dense decoder stack, the LM head.

Owns `DecoderArgs` (what every dense family reads from config.json, with transformers' defaults)
and `DecoderLM` (embedding -> layers -> norm -> lm_head). Family modules configure it; nothing here
loads weights (the loader does) or knows about quantization (QuantLinear kernels do).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from anyquant.config_fields import cfg_bool, cfg_float, cfg_int, cfg_str
from anyquant.errors import CheckpointError, UnsupportedError
from anyquant.layers.attention import Attention, AttentionContext
from anyquant.layers.embedding import HeadEmbedding, VocabParallelEmbedding
from anyquant.layers.kv_quant import is_quantized_dtype, stored_width
from anyquant.layers.linear import QuantLinear, SplitGroup, TensorParallelLayer
from anyquant.layers.mlp import GatedMLP
from anyquant.layers.norm import RMSNorm, add_rms_norm
from anyquant.layers.rotary import RotaryEmbedding, rope_parameters

if TYPE_CHECKING:
    from anyquant.parallel.partition import Partition
    from anyquant.parallel.state import ParallelState


@dataclass(frozen=True)
class DecoderArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: dict[str, Any]
    max_position: int
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    torch_dtype: str = "float32"
    # Per layer: the sliding attention window (None: full attention); empty: full everywhere.
    sliding_windows: tuple[int | None, ...] = ()

    @classmethod
    def from_hf(cls, config: dict[str, Any], **family: Any) -> DecoderArgs:
        """Read a Llama-like config.json; `family` overrides family-specific defaults."""
        hidden = cfg_int(config, "hidden_size")
        heads = cfg_int(config, "num_attention_heads")
        kv_heads = cfg_int(config, "num_key_value_heads", heads)
        if heads % kv_heads:
            raise CheckpointError(
                f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        head_dim = cfg_int(config, "head_dim", hidden // heads)
        if head_dim < 1:
            raise CheckpointError(
                f"config.json: hidden_size={hidden} / num_attention_heads={heads} gives no head_dim; set head_dim"
            )
        attention_bias = cfg_bool(config, "attention_bias", False)
        num_layers = cfg_int(config, "num_hidden_layers")
        values: dict[str, Any] = dict(
            vocab_size=cfg_int(config, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=cfg_int(config, "intermediate_size"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg_float(config, "rms_norm_eps", 1e-6, minimum=0.0),
            rope=rope_parameters(config),
            max_position=cfg_int(config, "max_position_embeddings", 2048),
            tie_word_embeddings=cfg_bool(config, "tie_word_embeddings", False),
            hidden_act=cfg_str(config, "hidden_act", "silu"),
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=cfg_bool(config, "mlp_bias", False),
            torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
            sliding_windows=sliding_windows(config, num_layers),
        )
        values.update(family)
        return cls(**values)


def sliding_windows(config: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Which layers attend through a sliding window, and how wide, by the rules transformers
    applies to each family's config (Qwen configs carry a window that is off unless
    `use_sliding_window`; Mistral-style configs apply `sliding_window` to every layer)."""
    model_type = str(config.get("model_type", ""))
    window = cfg_int(config, "sliding_window", 0, minimum=0)  # null or 0: no window
    if model_type.startswith("qwen") and not cfg_bool(config, "use_sliding_window", False):
        window = 0
    if not window:
        return ()
    if model_type in ("mistral", "mixtral", "qwen3_moe"):
        return (window,) * num_layers
    types = config.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != num_layers:
            raise CheckpointError(
                f"config.json: field 'layer_types' = {types!r:.80}; expected a list of "
                f"num_hidden_layers={num_layers} entries"
            )
        return tuple(window if t == "sliding_attention" else None for t in types)
    first_full = cfg_int(config, "max_window_layers", 28, minimum=0)
    if model_type in ("qwen2", "qwen3"):
        return tuple(window if i >= first_full else None for i in range(num_layers))
    if model_type == "qwen2_moe":
        return tuple(window if (i + 1) % 2 and i < first_full else None for i in range(num_layers))
    return ()


# Family hooks: how a layer's MLP and attention are built. Dense families use the defaults; MoE and
# latent-attention families pass their own (their modules take the same forward arguments).
MlpFactory = Callable[[DecoderArgs, int, str], nn.Module]  # (args, layer index, prefix) -> module
AttentionFactory = Callable[[DecoderArgs, int, str, RotaryEmbedding], nn.Module]


def dense_mlp(args: DecoderArgs, index: int, prefix: str) -> nn.Module:
    return GatedMLP(prefix, args.hidden_size, args.intermediate_size, args.hidden_act, args.mlp_bias)


def gqa_attention(args: DecoderArgs, index: int, prefix: str, rotary: RotaryEmbedding) -> nn.Module:
    return Attention(
        prefix,
        index,
        args.hidden_size,
        args.num_heads,
        args.num_kv_heads,
        args.head_dim,
        rotary,
        qkv_bias=args.qkv_bias,
        o_bias=args.o_bias,
        qk_norm_eps=args.rms_norm_eps if args.qk_norm else None,
        sliding_window=args.sliding_windows[index] if args.sliding_windows else None,
    )


@dataclass(frozen=True)
class CacheShape:
    """Per-token, per-layer KV cache geometry of a family.

    `value_in_key`: the value is the key's first `v_dim` values (latent attention, layers/mla.py),
    so the cache stores the key alone and reads the value as a view of it."""

    num_kv_heads: int
    k_dim: int
    v_dim: int
    value_in_key: bool = False

    def __post_init__(self) -> None:
        if self.value_in_key and self.v_dim > self.k_dim:
            raise ValueError(f"a value inside the key needs v_dim {self.v_dim} <= k_dim {self.k_dim}")

    @property
    def stored_width(self) -> int:
        """Values stored per token, layer and KV head."""
        return self.k_dim if self.value_in_key else self.k_dim + self.v_dim

    def check_cache_dtype(self, cache_dtype: torch.dtype, family: str) -> None:
        """Refuse, naming the family and the option, a cache dtype this cache cannot take: a
        latent (MLA) cache keeps its value inside the key, which an int8 row cannot (the value's
        codes would lie before the key's rope part, their scale at the row's end)."""
        if is_quantized_dtype(cache_dtype) and self.value_in_key:
            raise UnsupportedError(
                f"kv_cache_dtype='int8' is not supported for {family}: its latent attention (MLA) "
                "cache stores the value inside the key, which an int8 row (codes, then one scale) "
                "cannot hold; use kv_cache_dtype='auto'"
            )

    def token_bytes(self, cache_dtype: torch.dtype) -> int:
        """Bytes one token takes in one layer's cache of `cache_dtype`, all its KV heads (an int8
        cache's rows carry their scale: layers/kv_quant.py)."""
        width = stored_width(self.k_dim, cache_dtype)
        if not self.value_in_key:
            width += stored_width(self.v_dim, cache_dtype)
        return self.num_kv_heads * width * cache_dtype.itemsize


class DecoderLayer(nn.Module):
    def __init__(
        self,
        args: DecoderArgs,
        index: int,
        rotary: RotaryEmbedding,
        make_mlp: MlpFactory,
        make_attention: AttentionFactory,
        body_path: str = "model",
    ) -> None:
        super().__init__()
        prefix = f"{body_path}.layers.{index}"
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = make_attention(args, index, f"{prefix}.self_attn", rotary)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = make_mlp(args, index, f"{prefix}.mlp")
        # What the norms cast into (the sublayers' input dtype); the loader sets it with the
        # weights (`DecoderLM.set_compute_dtype`).
        self.compute_dtype = torch.float32

    def forward(
        self, x: Tensor, positions: Tensor, cos_sin: tuple[Tensor, Tensor], ctx: AttentionContext
    ) -> Tensor:
        return pre_norm_layer(
            x, positions, cos_sin, ctx, self.input_layernorm, self.self_attn,
            self.post_attention_layernorm, self.mlp, self.compute_dtype,
        )  # fmt: skip


def pre_norm_layer(
    x: Tensor,
    positions: Tensor,
    cos_sin: tuple[Tensor, Tensor],
    ctx: AttentionContext,
    attention_norm: RMSNorm,
    attention: nn.Module,
    mlp_norm: RMSNorm,
    mlp: nn.Module,
    dtype: torch.dtype,
) -> Tensor:
    """One pre-norm decoder layer over the residual stream x [T, hidden] (fp32): x + attention of
    its norm, then + the MLP of that sum's norm. Every family's layer runs it under its own
    checkpoint names (DecoderLayer, InternLM2Layer)."""
    # The residual stream stays in fp32 so that fp16/bf16 compute cannot overflow or drift it;
    # sublayer outputs join it through type promotion inside the add (no separate cast), and
    # each norm casts into the compute dtype once.
    attn = attention(attention_norm(x, dtype), positions, cos_sin, ctx)
    x, h = add_rms_norm(x, attn, mlp_norm, dtype)
    return x + mlp(h)


class DecoderBody(nn.Module):
    """`model.*` of a HF checkpoint (`body_path`: where it sits, e.g. `model.language_model` in a
    vision-language checkpoint): embed_tokens, layers, norm."""

    def __init__(
        self,
        args: DecoderArgs,
        rotary: RotaryEmbedding,
        make_mlp: MlpFactory,
        make_attention: AttentionFactory,
        body_path: str = "model",
    ) -> None:
        super().__init__()
        self.rotary = rotary
        # An explicit (empty) weight skips nn.Embedding's random init: on the meta device that init
        # runs a reference kernel whose first use imports torch._dynamo (~1 s per process).
        self.embed_tokens = nn.Embedding(
            args.vocab_size, args.hidden_size, _weight=torch.empty(args.vocab_size, args.hidden_size)
        )
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            DecoderLayer(args, i, rotary, make_mlp, make_attention, body_path) for i in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class DecoderLM(nn.Module, TensorParallelLayer):
    """Decoder-only causal LM: dense families as is, MoE / MLA families through the hooks.

    Under tensor parallelism the embedding and the LM head are vocab-parallel (the logits are
    gathered on rank 0) and `cache_shape` holds this rank's KV heads.

    `body_path` is where the decoder body sits in the checkpoint's names (`model` for text
    models; vision-language checkpoints nest it, e.g. `model.language_model`): the module tree
    mirrors it, since module paths are the checkpoint names."""

    def __init__(
        self,
        args: DecoderArgs,
        make_mlp: MlpFactory = dense_mlp,
        make_attention: AttentionFactory = gqa_attention,
        rotary: RotaryEmbedding | None = None,
        cache_shape: CacheShape | None = None,
        body_path: str = "model",
    ) -> None:
        super().__init__()
        self.args = args
        self.body_path = body_path
        rotary = rotary or RotaryEmbedding(args.head_dim, args.rope, args.max_position)
        body = DecoderBody(args, rotary, make_mlp, make_attention, body_path)
        parent: nn.Module = self
        *outer, leaf = body_path.split(".")
        for name in outer:  # containers for the nesting (e.g. `model` of `model.language_model`)
            if not hasattr(parent, name):
                parent.add_module(name, nn.Module())
            parent = getattr(parent, name)
        parent.add_module(leaf, body)
        self.lm_head = QuantLinear(
            "lm_head", args.hidden_size, args.vocab_size, kind="lm_head", style="vocab"
        )
        self.cache_shape = cache_shape or CacheShape(args.num_kv_heads, args.head_dim, args.head_dim)

    @property
    def body(self) -> DecoderBody:
        body = self.get_submodule(self.body_path)
        assert isinstance(body, DecoderBody)
        return body

    # Checkpoint tensors the loader may leave unused (e.g. precomputed rotary tables of old exports).
    ignorable_suffixes: tuple[str, ...] = (".rotary_emb.inv_freq",)
    ignorable_prefixes: tuple[str, ...] = ()

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        for layer in self.body.layers:
            assert isinstance(layer, DecoderLayer)
            layer.compute_dtype = dtype

    def split_groups(self) -> list[SplitGroup]:
        return [SplitGroup("vocab", "lm_head", self.args.vocab_size, ((self.lm_head, 1),))]

    def set_parallel(self, partitions: Mapping[str, Partition], state: ParallelState) -> None:
        if state.is_parallel:
            self.body.embed_tokens = VocabParallelEmbedding(partitions["vocab"], self.args.hidden_size, state)  # type: ignore[assignment]

    def tied_weights(self) -> dict[str, str]:
        """Checkpoint name -> name it falls back to when absent."""
        if not self.args.tie_word_embeddings:
            return {}
        return {"lm_head.weight": f"{self.body_path}.embed_tokens.weight"}

    def embed_from_head(self) -> bool:
        """With tied weights, look tokens up in the LM head kernel's copy of the table (a kernel
        with `rows`, in the embedding's dtype) and drop the embedding's own: the table is held
        once. The caller vouches that the head was loaded from the embedding's tensor. True when
        the embedding now reads the head."""
        kernel = self.lm_head.kernel
        embedding = self.body.embed_tokens
        rows = getattr(kernel, "rows", None)
        if (
            not self.args.tie_word_embeddings
            or kernel is None
            or not callable(rows)
            or self.lm_head.parallel is not None
            or type(embedding) is not nn.Embedding
            or embedding.weight.dtype != kernel.compute_dtype
            or tuple(embedding.weight.shape) != tuple(kernel.shape)
        ):
            return False
        self.body.embed_tokens = HeadEmbedding(rows, embedding.weight.dtype)  # type: ignore[assignment]
        return True

    def forward(
        self,
        token_ids: Tensor,
        positions: Tensor,
        ctx: AttentionContext,
        logits_rows: Tensor | None = None,
        input_embeds: InputEmbeds | None = None,
    ) -> Tensor:
        """token_ids [T] at `positions` [T] (or [3, T] for multimodal rotary positions; one or
        many sequences, as `ctx` says) -> fp32 logits [rows, vocab] for `logits_rows` (all rows by
        default). `input_embeds` replaces the embeddings of some rows (image placeholders)."""
        body = self.body
        return run_decoder(
            body.embed_tokens, body.rotary, body.layers, body.norm, self.lm_head,
            token_ids, positions, ctx, logits_rows, input_embeds,
        )  # fmt: skip


def run_decoder(
    embed_tokens: nn.Embedding,
    rotary: RotaryEmbedding,
    layers: Iterable[nn.Module],
    norm: nn.Module,
    head: nn.Module,
    token_ids: Tensor,
    positions: Tensor,
    ctx: AttentionContext,
    logits_rows: Tensor | None,
    input_embeds: InputEmbeds | None,
) -> Tensor:
    """The decoder step every family shares, whatever its modules are named: embed (some rows
    replaced by `input_embeds`), the layers on an fp32 residual stream, the final norm and the head
    on `logits_rows` only."""
    # The compute dtype: the table's (or, read from the LM head, the dtype it gives).
    dtype = embed_tokens.dtype if isinstance(embed_tokens, HeadEmbedding) else embed_tokens.weight.dtype
    cos_sin = rotary.cos_sin(positions, dtype, ctx.max_position)
    x = embed_tokens(token_ids).float()
    if input_embeds is not None:
        x.index_copy_(0, input_embeds.rows, input_embeds.values.float())
    for layer in layers:
        x = layer(x, positions, cos_sin, ctx)
    if logits_rows is not None:
        x = x[logits_rows]
    return head(norm(x, dtype)).float()


@dataclass(frozen=True)
class InputEmbeds:
    """Embeddings that replace the token embeddings of some rows of a step (an encoder's output
    at its placeholder tokens): `values[i]` goes to row `rows[i]`."""

    rows: Tensor  # [N] long
    values: Tensor  # [N, hidden]
