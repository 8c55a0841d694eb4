"""What every HTTP surface shares (the API's routes, the OpenAI-compatible endpoints, the
console): the generation limit, strict request bodies, and the body-size limit that holds
before anything else runs. Nothing here knows the app or a route: the surfaces import this
module, and `kmd.daemon.api` (the app assembly) imports them.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["MAX_NEW_TOKENS", "BodyLimit", "StrictBody"]

MAX_NEW_TOKENS = 256  # tokens one request may generate, whatever its caller's budget


class StrictBody(BaseModel):
    """A request body that refuses unknown fields and strips whitespace around text."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class BodyLimit:
    """Pure ASGI middleware: request bodies over `limit` bytes get 413 before any route,
    auth check or body parser sees them. A declared Content-Length over the limit is refused
    without reading; a body without one (chunked) is counted as it streams in and refused
    as soon as it passes the limit. What is kept is at most `limit` bytes, replayed to the app."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await self._refuse(scope, send, 400, "invalid Content-Length")
                return
            if size > self.limit:
                await self._refuse(scope, send, 413, f"request body over {self.limit} bytes")
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, send, 413, f"request body over {self.limit} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # only a disconnect can follow

        await self.app(scope, replay, send)

    # Paths whose clients expect OpenAI's error shape (kmd.daemon.openai_api).
    OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")

    @classmethod
    async def _refuse(cls, scope: dict, send: Any, status: int, message: str) -> None:
        error: Any = message
        if str(scope.get("path", "")).startswith(cls.OPENAI_PATHS):
            code = "request_too_large" if status == 413 else "invalid_request"
            error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        payload = json.dumps({"error": error}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})  # fmt: skip
        await send({"type": "http.response.body", "body": payload})
