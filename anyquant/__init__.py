"""anyquant: run quantized LLM checkpoints written by any tool, on CPU or GPU.

Public API: `LLM`, `SamplingParams`, `GuidedDecodingParams`, `__version__`. Heavy modules load on first use so that
`import anyquant` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "GuidedDecodingParams", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from anyquant.engine.sampling import GuidedDecodingParams, SamplingParams
    from anyquant.llm import LLM


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from anyquant.llm import LLM

        return LLM
    if name == "SamplingParams":
        from anyquant.engine.sampling import SamplingParams

        return SamplingParams
    if name == "GuidedDecodingParams":
        from anyquant.engine.sampling import GuidedDecodingParams

        return GuidedDecodingParams
    raise AttributeError(f"module 'anyquant' has no attribute {name!r}")
