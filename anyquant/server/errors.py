"""`ApiError`: every failure the server answers, in OpenAI's error shape."""

from __future__ import annotations

import json

from starlette.responses import Response


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.headers = headers

    def response(self) -> Response:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}
        # ASCII-escaped: a message may quote client input, which can hold lone surrogates that have
        # no UTF-8 form (rendering them as UTF-8 would turn this 4xx into a 500).
        content = json.dumps({"error": error}, ensure_ascii=True, allow_nan=False)
        return Response(content, self.status, self.headers, media_type="application/json")
