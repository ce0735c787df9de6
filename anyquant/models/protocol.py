"""What the engine and the loader may use of a model: `EngineModel` and `CausalLM`.

A family is an `nn.Module` (most are `DecoderLM`; InternLM2 and InternVL are their own classes)
whose module paths are the checkpoint's tensor names. The engine runs an `EngineModel` (a
family, or rank 0's tensor-parallel proxy of one): sizes and one forward step. The loader builds
and fills a `CausalLM`, an `EngineModel` that also names its checkpoint tensors. Everything else
is each family's own business, so a new family knows what to provide and a caller what it may
rely on; `check_causal_lm` says at build time which member a family lacks. Models that take
images also meet `models.multimodal.ImageEncoder` (the engine) and `MultimodalModel` (the
front ends).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from anyquant.errors import AnyquantError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from anyquant.layers.attention import AttentionContext
    from anyquant.models.base import CacheShape, DecoderArgs, InputEmbeds


@runtime_checkable
class EngineModel(Protocol):
    """What the engine runs: a family's root module, or rank 0's tensor-parallel proxy of one."""

    args: DecoderArgs  # num_layers, vocab_size, hidden_size...
    cache_shape: CacheShape  # per-token, per-layer KV geometry (this rank's heads under TP)

    def __call__(
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
        ...


@runtime_checkable
class CausalLM(EngineModel, Protocol):
    """A model family's root module as the loader builds, fills and hands it to the engine."""

    # Stored tensors the family leaves unused, by name suffix (e.g. old rotary tables) and by
    # name prefix (whole sub-trees it does not run, e.g. DeepSeek-V3's multi-token prediction).
    ignorable_suffixes: tuple[str, ...]
    ignorable_prefixes: tuple[str, ...]

    def tied_weights(self) -> dict[str, str]:
        """Checkpoint name -> the name it falls back to when absent (tied embeddings)."""
        ...

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        """The dtype activations are computed in (the residual stream stays fp32); the loader
        sets it once the weights are loaded in it."""
        ...

    # The module tree: module paths are checkpoint names.
    def modules(self) -> Iterator[nn.Module]: ...

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]: ...

    def to(self, device: torch.device) -> object: ...

    def eval(self) -> object: ...


def _members() -> list[str]:
    """The protocols' members, read from their definitions above."""
    names: set[str] = set()
    for protocol in (EngineModel, CausalLM):
        names |= set(protocol.__annotations__)
        names |= {n for n, v in vars(protocol).items() if inspect.isfunction(v) and not n.startswith("_")}
    return [*sorted(names), "__call__"]


def check_causal_lm(model: Any, architecture: str) -> CausalLM:
    """`model` as a `CausalLM`, or an error naming the members its family lacks."""
    if isinstance(model, CausalLM):
        return model
    missing = [m for m in _members() if not hasattr(model, m)]
    raise AnyquantError(
        f"model family of {architecture} ({type(model).__name__}) lacks {', '.join(missing)} "
        "of anyquant.models.protocol.CausalLM"
    )
