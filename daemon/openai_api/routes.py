"""The OpenAI-compatible routes (`openai_router`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from loguru import logger

from kmd.daemon.api import Read
from kmd.daemon.openai_api.bodies import ChatBody, CompletionBody, _Body
from kmd.daemon.openai_api.errors import OpenAIError, OpenAIRoute
from kmd.daemon.openai_api.generation import (
    Generation,
    _check_length,
    _check_model,
    _error_event,
    _fingerprint,
    _serving,
    _stream_response,
    chat_prompt_ids,
    edit_state,
    served_model_id,
)
from kmd.daemon.surface import NotServingError

if TYPE_CHECKING:
    from kmd.daemon.surface import Service
    from kmd.editors.model import ModelHost

def openai_router(daemon: Service) -> APIRouter:
    router = APIRouter(route_class=OpenAIRoute)
    created = int(time.time())

    def model_card() -> dict[str, Any]:
        return {"id": served_model_id(daemon), "object": "model", "created": created, "owned_by": "kmd",
                "kmd": edit_state(daemon)}  # fmt: skip

    def host() -> ModelHost:
        try:
            return _serving(daemon).host
        except NotServingError as exc:
            raise OpenAIError(503, str(exc)) from exc

    def start(prompt_ids: list[int], body: _Body, max_tokens: int) -> Generation:
        try:
            return Generation(daemon, prompt_ids, body, max_tokens)
        except NotServingError as exc:
            raise OpenAIError(503, str(exc)) from exc

    def collect(gen: Generation) -> str:
        try:
            return "".join(gen.deltas())
        except NotServingError as exc:
            raise OpenAIError(503, str(exc)) from exc
        except Exception as exc:
            logger.exception("OpenAI-compatible generation failed")
            raise OpenAIError(500, f"generation failed: {type(exc).__name__}") from exc

    @router.get("/v1/models")
    def models(_: Read) -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @router.get("/v1/models/{model_id:path}")
    def model(model_id: str, _: Read) -> dict[str, Any]:
        _check_model(daemon, model_id)
        return model_card()

    @router.post("/v1/chat/completions", response_model=None)
    def chat(body: ChatBody, _: Read) -> dict[str, Any] | StreamingResponse:
        name = _check_model(daemon, body.model)
        h = host()
        prompt_ids = chat_prompt_ids(h, body.messages)
        _check_length(h, prompt_ids, body.limit)
        fingerprint = _fingerprint(edit_state(daemon))
        gen = start(prompt_ids, body, body.limit)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name,
                "system_fingerprint": fingerprint}  # fmt: skip
        if not body.stream:
            text = collect(gen)
            return head | {"object": "chat.completion", "usage": gen.usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": gen.finish_reason}]}  # fmt: skip

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return head | {"object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}  # fmt: skip

        def events() -> Iterator[dict[str, Any]]:
            try:
                yield chunk({"role": "assistant", "content": ""}, None)
                for delta in gen.deltas():
                    yield chunk({"content": delta}, None)
                yield chunk({}, gen.finish_reason)
                if body.include_usage:
                    yield head | {"object": "chat.completion.chunk", "choices": [], "usage": gen.usage}
            except Exception as exc:  # the response has started: report in the stream
                logger.opt(exception=not isinstance(exc, NotServingError)).warning("streamed generation failed")
                yield _error_event(exc)

        return _stream_response(events(), gen.cancel)

    @router.post("/v1/completions", response_model=None)
    def completions(body: CompletionBody, _: Read) -> dict[str, Any] | StreamingResponse:
        name = _check_model(daemon, body.model)
        h = host()
        prompt_ids = h.encode(body.text)  # as is: never chat-wrapped
        try:
            _check_length(h, prompt_ids, body.limit)
        except OpenAIError as exc:
            exc.param = "prompt"
            raise
        fingerprint = _fingerprint(edit_state(daemon))
        gen = start(prompt_ids, body, body.limit)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name, "system_fingerprint": fingerprint}  # fmt: skip
        if not body.stream:
            text = collect(gen)
            return head | {"usage": gen.usage, "choices": [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": gen.finish_reason}]}  # fmt: skip

        def events() -> Iterator[dict[str, Any]]:
            try:
                for delta in gen.deltas():
                    yield head | {"choices": [{"index": 0, "text": delta, "logprobs": None, "finish_reason": None}]}
                yield head | {"choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": gen.finish_reason}]}
                if body.include_usage:
                    yield head | {"choices": [], "usage": gen.usage}
            except Exception as exc:
                logger.opt(exception=not isinstance(exc, NotServingError)).warning("streamed generation failed")
                yield _error_event(exc)

        return _stream_response(events(), gen.cancel)

    return router


__all__ = ["openai_router"]
