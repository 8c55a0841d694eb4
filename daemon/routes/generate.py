"""POST /v1/generate (`generate_router`): greedy generation through the committed edits.

A coroutine: it submits to the serving engine and awaits its tokens without holding a
worker thread. 429 + Retry-After when the caller's budget is spent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import Field

from kmd.daemon.auth import Read, caller
from kmd.daemon.serving import GenerationRequest, Refused
from kmd.daemon.surface import NotServingError
from kmd.daemon.web import MAX_NEW_TOKENS, StrictBody

if TYPE_CHECKING:
    from kmd.daemon.surface import Service

__all__ = ["GenerateBody", "generate_router"]


class GenerateBody(StrictBody):
    prompt: str = Field(min_length=1, max_length=4000)
    max_new_tokens: int = Field(default=32, ge=1, le=MAX_NEW_TOKENS)


def generate_router(daemon: Service) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/generate")
    async def generate(body: GenerateBody, request: Request, _: Read) -> dict[str, Any]:
        try:
            engine, who = daemon.engine(), caller(request)
            engine.scheduler.check(who, body.max_new_tokens)  # refused before any work is spent on the request
            prompt_ids = engine.host.encode(engine.host.format_prompt(body.prompt))
            stream = engine.submit(GenerationRequest(prompt_ids, body.max_new_tokens, caller=who))
            tokens = [token async for token in stream]
        except NotServingError as exc:
            raise HTTPException(503, str(exc)) from exc
        except Refused as exc:
            status = 422 if exc.status == 400 else exc.status  # this route's bad bodies are 422s
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            raise HTTPException(status, f"max_new_tokens: {exc}" if status == 422 else str(exc), headers=headers) from exc
        text = engine.host.tokenizer.decode(tokens, skip_special_tokens=True)
        # `edits`: committed edits in the state that answered (lets clients see which state they read)
        return {"prompt": body.prompt, "text": text, "edits": stream.state.edits if stream.state else 0}

    return router
