"""`ServerConfig`: how one server runs (its name, auth, limits, engine thread, tools, media)."""

from __future__ import annotations

from dataclasses import dataclass, field

from anyquant.models.media import MediaLimits
from anyquant.server.tool_parsers import PARSERS


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = 8 * 2**20
    max_waiting: int = 256  # requests admitted beyond the running batch before 429
    shutdown_timeout: float = 10.0  # seconds in-flight requests get to finish on shutdown
    # True: the engine loop gets a thread of its own. False: the caller runs it with
    # `app.state.server.engine.run_here()` (`anyquant serve` does, on the main thread).
    engine_thread: bool = True
    # The model's tool-call format (vLLM's --tool-call-parser); None: tool_choice "none" only.
    tool_call_parser: str | None = None
    # A request's own `chat_template` runs code-like Jinja on the server: off unless trusted.
    trust_request_chat_template: bool = False
    media: MediaLimits = field(default_factory=MediaLimits)  # images in chat messages

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(f"tool_call_parser {self.tool_call_parser!r}: choose one of {sorted(PARSERS)}")
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (omit it to disable auth)")
