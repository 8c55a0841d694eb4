"""The served model, its edit state, and generation for the OpenAI-compatible endpoints:
requests to the serving engine (`kmd.daemon.serving`), then text with stop strings."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from fastapi.responses import StreamingResponse

from kmd.daemon.web import MAX_NEW_TOKENS
from kmd.daemon.openai_api.bodies import GenerationBody, Message
from kmd.daemon.openai_api.errors import MAX_PROMPT_TOKENS, OpenAIError, error_type
from kmd.daemon.serving import GenerationRequest, Refused, Sampling
from kmd.daemon.surface import NotServingError

if TYPE_CHECKING:
    from kmd.daemon.serving import ServedState, ServingEngine
    from kmd.daemon.surface import Service
    from kmd.editors.model import ModelHost

# ----- the model and its edit state ----------------------------------------------------------


def served_model_id(daemon: Service) -> str:
    """The id clients pass as `model`: the base model's name (its hub id or path as configured;
    the embedded model's own name)."""
    from kmd.editors.model import EMBEDDED, EMBEDDED_NAME

    name = daemon.served_model_name()
    if name is not None:
        return name
    configured = daemon.settings.model.model
    return EMBEDDED_NAME if configured == EMBEDDED else configured


def edit_state(daemon: Service) -> dict[str, Any]:
    """What the served model is: the base model plus which committed edit state.

    `version` is the sha256 of the state's manifest.json, the same id replicas load and
    the ledger records for published states (None before the first edit is saved).
    """
    info: dict[str, Any] = {"role": daemon.settings.cluster.role, "backend": daemon.policy.backend,
                            "ready": daemon.ready, "edits": None, "state_version": None}  # fmt: skip
    try:
        served = daemon.served_state()
    except NotServingError:
        return info
    return info | {"edits": served.edits, "state_version": served.version}


def fingerprint(state: ServedState | None) -> str:
    """`system_fingerprint`: which committed state answered."""
    return f"kmd-{state.version[:12]}" if state is not None and state.version else "kmd-base"


def check_model(daemon: Service, requested: str) -> str:
    served = served_model_id(daemon)
    if requested not in (served, daemon.settings.model.model):
        raise OpenAIError(404, f"model {requested!r} is not served here; this server serves {served!r}",
                          param="model", code="model_not_found")  # fmt: skip
    return served


def _context_limit(host: ModelHost) -> int:
    context = getattr(host.model.config, "max_position_embeddings", None) or MAX_PROMPT_TOKENS
    return min(int(context), MAX_PROMPT_TOKENS + MAX_NEW_TOKENS)


def check_length(host: ModelHost, prompt_ids: Sequence[int], max_tokens: int, param: str = "messages") -> None:
    context = _context_limit(host)
    if not prompt_ids:
        raise OpenAIError(400, "the prompt encodes to no tokens", param=param)
    if len(prompt_ids) + max_tokens > context or len(prompt_ids) > MAX_PROMPT_TOKENS:
        raise OpenAIError(400, f"the prompt is {len(prompt_ids)} tokens and max_tokens {max_tokens}: over this "
                               f"model's context of {context} tokens", param=param, code="context_length_exceeded")  # fmt: skip


def refusal(exc: Refused) -> OpenAIError:
    """The serving engine's refusal in OpenAI's shape (429 with Retry-After: the budget is spent)."""
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    code = {429: "rate_limit_exceeded", 400: "max_tokens_over_budget"}.get(exc.status)
    return OpenAIError(exc.status, str(exc), param="max_tokens" if exc.status == 400 else None, code=code, headers=headers)


def max_tokens_for(engine: ServingEngine, body: GenerationBody, caller: str) -> int:
    """The request's max_tokens; unasked, OpenAI's default capped by the caller's budget (a
    request that asks for more than its budget allows is refused when submitted)."""
    requested = body.requested_tokens
    return requested if requested is not None else min(body.default_tokens, engine.scheduler.budget(caller).max_tokens)


def chat_prompt_ids(host: ModelHost, messages: Sequence[Message]) -> list[int]:
    """Token ids of the conversation through the tokenizer's chat template, reply opened
    (editors/chat.py: the same rendering the benchmark's chat forms and routing read)."""
    from kmd.editors.chat import ChatTemplateError

    if not host.chat.available:
        raise OpenAIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages",
                          code="no_chat_template")  # fmt: skip
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        return host.chat.encode(conversation)
    except ChatTemplateError as exc:  # e.g. a template that insists on alternating roles
        raise OpenAIError(400, str(exc), param="messages") from exc


# ----- tokens to text, with stop strings -----------------------------------------------------


class StopText:
    """Token ids in, text deltas out, cut before the first stop string.

    Text that might be the start of a stop string (or an incomplete character) is held
    back until the next tokens decide, so a streamed reply never shows a stop string.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.tokens: list[int] = []
        self.emitted = ""
        self.stopped = False  # a stop string was found

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self._decode()
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            return self._advance(text[: min(found)])
        hold = len(text) - len(text.rstrip("\ufffd"))  # bytes of a character still to come
        for stop in self.stops:
            hold = max(hold, next((k for k in range(len(stop) - 1, 0, -1) if text.endswith(stop[:k])), 0))
        return self._advance(text[: len(text) - hold])

    def finish(self) -> str:
        """What was held back, once no token follows."""
        return "" if self.stopped else self._advance(self._decode())

    def _advance(self, text: str) -> str:
        # A tokenizer may re-decode earlier text differently once more tokens follow; what
        # was already sent stays sent, so only text that extends it goes out.
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta


class Generation:
    """One request through the serving engine: its text deltas, cut before a stop string;
    `finish_reason`, `usage` and `state` (what answered) once they are exhausted."""

    def __init__(self, engine: ServingEngine, prompt_ids: list[int], body: GenerationBody, max_tokens: int,
                 caller: str) -> None:  # fmt: skip
        self.max_tokens = max_tokens
        sampling = Sampling(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
        try:
            self.stream = engine.submit(GenerationRequest(prompt_ids, self.max_tokens, caller=caller, sampling=sampling))
        except Refused as exc:
            raise refusal(exc) from exc
        self.text = StopText(engine.host.tokenizer, body.stops)
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    @property
    def state(self) -> ServedState | None:
        return self.stream.state

    async def started(self) -> ServedState | None:
        """Wait for the prefill (the state that answers is known then)."""
        return await self.stream.started()

    async def deltas(self) -> AsyncIterator[str]:
        try:
            async for token in self.stream:
                self.completion_tokens += 1
                delta = self.text.push(token)
                if delta:
                    yield delta
                if self.text.stopped:
                    break
            tail = self.text.finish()
            if tail:
                yield tail
        finally:
            self.cancel()
        self.finish_reason = "stop" if self.text.stopped or self.stream.finish_reason == "stop" else "length"

    async def collect(self) -> str:
        return "".join([delta async for delta in self.deltas()])

    def cancel(self) -> None:
        """Nothing more is wanted (a stop string, a disconnect): the row leaves the batch."""
        if not self.stream.done:
            self.stream.cancel()

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}  # fmt: skip


async def _sse(events: AsyncIterator[dict[str, Any]], gen: Generation) -> AsyncIterator[str]:
    """Server-sent events: each chunk as `data: <json>`, then `data: [DONE]`."""
    try:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        gen.cancel()  # the client went away, or the stream ended: stop generating


def error_event(exc: Exception) -> dict[str, Any]:
    status = 503 if isinstance(exc, NotServingError) else 500
    message = str(exc) if status == 503 else f"generation failed: {type(exc).__name__}"
    return {"error": {"message": message, "type": error_type(status), "param": None, "code": None}}


def stream_response(events: AsyncIterator[dict[str, Any]], gen: Generation) -> StreamingResponse:
    return StreamingResponse(_sse(events, gen), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
