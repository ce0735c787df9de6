"""OpenAI-compatible HTTP server (`anyquant serve`): FastAPI app, wire protocol, SSE, metrics.

Needs the `server` extra (fastapi, uvicorn, pydantic, prometheus-client); nothing outside
`anyquant serve` imports this package, so `import anyquant` never pulls these in.
"""

from __future__ import annotations

from anyquant.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
