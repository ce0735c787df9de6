"""Errors anyquant raises on bad input.

Every error a user can provoke with a checkpoint or a flag is an `AnyquantError` whose message
names the file, tensor or field involved and what was expected, so commands can print it without
a traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class AnyquantError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""


class CheckpointError(AnyquantError):
    """A model directory or safetensors file is missing, truncated, corrupt or inconsistent."""


class TensorError(CheckpointError):
    """A tensor is missing, or has the wrong shape, dtype or values."""

    def __init__(self, tensor: str, problem: str, *, file: str | None = None) -> None:
        where = f" (in {file})" if file else ""
        super().__init__(f"tensor {tensor!r}{where}: {problem}")
        self.tensor = tensor
        self.file = file


class QuantConfigError(AnyquantError):
    """A quantization_config field is missing, unknown or has an unsupported value."""


class UnsupportedError(AnyquantError):
    """The input is valid but anyquant does not support it (yet); the message says what does."""


class NumericsError(AnyquantError):
    """Non-finite values where finite ones are required (scales, logits)."""


class EngineDeadError(AnyquantError):
    """The engine itself cannot go on (e.g. a tensor-parallel rank died): never blamed on one
    request, so a step that raises it is not retried request by request."""
