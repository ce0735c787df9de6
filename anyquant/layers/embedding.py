"""Token embeddings other than a plain `nn.Embedding` table.

`VocabParallelEmbedding`: each tensor-parallel rank holds a contiguous slice of the table; owns
the lookup of the ids that fall in this rank's slice (zeros elsewhere) and the sum over ranks
that assembles every id's row. Used only at world size > 1; one process keeps `nn.Embedding`.
The matching vocab-parallel LM head is a `QuantLinear` of style "vocab".

`HeadEmbedding`: a table tied to the LM head, looked up in the head kernel's own copy of the
weight (its `rows`), so that the largest tensor of a small model is held once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from anyquant.parallel.comm import all_reduce

if TYPE_CHECKING:
    from anyquant.parallel.partition import Partition
    from anyquant.parallel.state import ParallelState


class VocabParallelEmbedding(nn.Module):
    def __init__(self, partition: Partition, hidden_size: int, state: ParallelState) -> None:
        super().__init__()
        (segment,) = partition.shards[state.rank]  # vocab splits are one contiguous run per rank
        self.partition = partition
        self.rank = state.rank
        self.start, self.length = segment.start, segment.length
        self.state = state
        self.weight = nn.Parameter(torch.empty(partition.local_size, hidden_size), requires_grad=False)

    def forward(self, token_ids: Tensor) -> Tensor:
        """token_ids [T] -> [T, hidden]: own rows looked up, other ids contribute exact zeros."""
        local = token_ids - self.start
        mine = (local >= 0) & (local < self.length)
        rows = nn.functional.embedding(torch.where(mine, local, 0), self.weight)
        return all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype), self.state)

    def extra_repr(self) -> str:
        return f"vocab [{self.start}, {self.start + self.length}) of {self.partition.size}, rank {self.rank}"


class HeadEmbedding(nn.Module):
    """Token ids [T] -> their rows [T, hidden] in `dtype`, read from the LM head's kernel (held
    through its bound `rows` method, not registered: the kernel stays a submodule of the head)."""

    def __init__(self, lookup: Callable[[Tensor], Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        self.lookup = lookup
        self.dtype = dtype

    def forward(self, token_ids: Tensor) -> Tensor:
        return self.lookup(token_ids.reshape(-1)).view(*token_ids.shape, -1)
