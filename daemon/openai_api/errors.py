"""OpenAI-shaped errors and limits for the OpenAI-compatible endpoints (`kmd.daemon.openai_api`)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from loguru import logger

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt the context allows
MAX_PROMPT_TOKENS = 8192  # on top of the model's own context limit
MAX_MESSAGES = 128
MAX_CONTENT_CHARS = 32_000
MAX_STOP = 4  # as OpenAI
MAX_STOP_CHARS = 128

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}  # fmt: skip


def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    body = {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    return _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class OpenAIError(Exception):
    """A request kmd refuses, with OpenAI's error fields (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    problems, param = [], None
    for e in exc.errors():
        if e["type"] == "json_invalid":
            return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}", None
        loc = [str(p) for p in e["loc"] if p != "body"]
        name = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        problems.append(f"unsupported parameter: {name}" if e["type"] == "extra_forbidden" else f"{name}: {e['msg']}")
    return "; ".join(problems) or "invalid request", param


class OpenAIRoute(APIRoute):
    """Routes of this module: a bounded body, and every error in OpenAI's shape.

    The app's own error handlers answer FastAPI's shapes (`{"detail": ...}`, `{"error":
    "invalid request", "problems": [...]}`); OpenAI clients parse `{"error": {...}}`, so
    these routes convert, including the 401s of the shared auth dependency.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                await _read_bounded(request)
                return await handler(request)
            except OpenAIError as exc:
                return openai_error(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)
            except RequestValidationError as exc:
                message, param = _validation_message(exc)
                return openai_error(400, message, param=param)
            except HTTPException as exc:
                return openai_error(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
            except Exception as exc:  # a bug: logged with its traceback, answered in the shape clients parse
                logger.exception("{} {} failed", request.method, request.url.path)
                return openai_error(500, f"internal error: {type(exc).__name__}", code="internal_error")

        return route


async def _read_bounded(request: Request) -> None:
    """Read the body up to MAX_BODY_BYTES (413 beyond), so later parsing uses the copy."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise OpenAIError(413, f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise OpenAIError(413, f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
    request._body = bytes(body)  # Starlette's cache of the body: the handler parses this copy
