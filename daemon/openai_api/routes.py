"""The OpenAI-compatible routes (`openai_router`).

The generation routes are coroutines: they submit to the serving engine and await its
tokens without holding a worker thread, so any number of open requests leaves the thread
pool to the ledger, health checks and operator actions.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from loguru import logger

from kmd.daemon.auth import Read, caller
from kmd.daemon.openai_api.bodies import ChatBody, CompletionBody, GenerationBody
from kmd.daemon.openai_api.errors import OpenAIError, OpenAIRoute
from kmd.daemon.openai_api.generation import (
    Generation,
    chat_prompt_ids,
    check_length,
    check_model,
    edit_state,
    error_event,
    fingerprint,
    max_tokens_for,
    refusal,
    served_model_id,
    stream_response,
)
from kmd.daemon.serving import Refused
from kmd.daemon.surface import NotServingError

if TYPE_CHECKING:
    from kmd.daemon.serving import ServingEngine
    from kmd.daemon.surface import Service


def openai_router(daemon: Service) -> APIRouter:
    router = APIRouter(route_class=OpenAIRoute)
    created = int(time.time())

    def model_card() -> dict[str, Any]:
        return {"id": served_model_id(daemon), "object": "model", "created": created, "owned_by": "kmd",
                "kmd": edit_state(daemon)}  # fmt: skip

    def engine() -> ServingEngine:
        try:
            return daemon.engine()
        except NotServingError as exc:
            raise OpenAIError(503, str(exc)) from exc

    def start(request: Request, engine: ServingEngine, encode: Callable[[], list[int]], body: GenerationBody,
              param: str) -> Generation:  # fmt: skip
        who = caller(request)
        limit = max_tokens_for(engine, body, who)
        try:
            engine.scheduler.check(who, limit)  # refused before any work is spent on the request
        except Refused as exc:
            raise refusal(exc) from exc
        prompt_ids = encode()
        check_length(engine.host, prompt_ids, limit, param)
        return Generation(engine, prompt_ids, body, limit, who)

    async def collect(gen: Generation) -> str:
        try:
            return await gen.collect()
        except NotServingError as exc:
            raise OpenAIError(503, str(exc)) from exc
        except Exception as exc:
            logger.exception("OpenAI-compatible generation failed")
            raise OpenAIError(500, f"generation failed: {type(exc).__name__}") from exc

    async def head(gen: Generation, prefix: str, name: str) -> dict[str, Any]:
        """The fields every chunk repeats; `system_fingerprint` names the state that answers."""
        try:
            state = await gen.started()
        except NotServingError as exc:
            raise OpenAIError(503, str(exc)) from exc
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": name,
                "system_fingerprint": fingerprint(state)}  # fmt: skip

    @router.get("/v1/models")
    def models(_: Read) -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @router.get("/v1/models/{model_id:path}")
    def model(model_id: str, _: Read) -> dict[str, Any]:
        check_model(daemon, model_id)
        return model_card()

    @router.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatBody, request: Request, _: Read) -> dict[str, Any] | StreamingResponse:
        name = check_model(daemon, body.model)
        e = engine()
        gen = start(request, e, lambda: chat_prompt_ids(e.host, body.messages), body, "messages")
        if not body.stream:
            text = await collect(gen)
            return await head(gen, "chatcmpl", name) | {"object": "chat.completion", "usage": gen.usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": gen.finish_reason}]}  # fmt: skip
        fields = await head(gen, "chatcmpl", name)

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return fields | {"object": "chat.completion.chunk",
                             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}  # fmt: skip

        async def events() -> AsyncIterator[dict[str, Any]]:
            try:
                yield chunk({"role": "assistant", "content": ""}, None)
                async for delta in gen.deltas():
                    yield chunk({"content": delta}, None)
                yield chunk({}, gen.finish_reason)
                if body.include_usage:
                    yield fields | {"object": "chat.completion.chunk", "choices": [], "usage": gen.usage}
            except Exception as exc:  # the response has started: report in the stream
                logger.opt(exception=not isinstance(exc, NotServingError)).warning("streamed generation failed")
                yield error_event(exc)

        return stream_response(events(), gen)

    @router.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody, request: Request, _: Read) -> dict[str, Any] | StreamingResponse:
        name = check_model(daemon, body.model)
        e = engine()
        gen = start(request, e, lambda: e.host.encode(body.text), body, "prompt")  # as is: never chat-wrapped
        if not body.stream:
            text = await collect(gen)
            return await head(gen, "cmpl", name) | {"object": "text_completion", "usage": gen.usage, "choices": [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": gen.finish_reason}]}  # fmt: skip
        fields = await head(gen, "cmpl", name) | {"object": "text_completion"}

        async def events() -> AsyncIterator[dict[str, Any]]:
            try:
                async for delta in gen.deltas():
                    yield fields | {"choices": [{"index": 0, "text": delta, "logprobs": None, "finish_reason": None}]}
                yield fields | {"choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": gen.finish_reason}]}
                if body.include_usage:
                    yield fields | {"choices": [], "usage": gen.usage}
            except Exception as exc:
                logger.opt(exception=not isinstance(exc, NotServingError)).warning("streamed generation failed")
                yield error_event(exc)

        return stream_response(events(), gen)

    return router


__all__ = ["openai_router"]
