"""Activation functions by their config.json name (`hidden_act`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from anyquant.errors import UnsupportedError

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": torch.nn.functional.silu,
    "swish": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.nn.functional.relu,
    # CLIP-style vision towers (Qwen2-VL): the sigmoid approximation of GELU.
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in _ACTIVATIONS:
        raise UnsupportedError(
            f"config.json: hidden_act {name!r} is not supported; supported: {', '.join(sorted(_ACTIVATIONS))}"
        )
    return _ACTIVATIONS[name]
