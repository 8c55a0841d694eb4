"""OpenAI-compatible endpoints for the edited model.

    GET  /v1/models                 the served (base) model; the edit state as `kmd` metadata
    GET  /v1/models/{id}            the same, one model
    POST /v1/chat/completions       messages through the tokenizer's chat template
    POST /v1/completions            a plain prompt, as is

Everything goes through the edited model with per-row routing (`Editor.query` on the
prompt tokens, the same path as `/v1/generate`), under the lock that keeps generation off
a model half-way through an edit. `temperature` 0 is greedy; `stop` strings cut the text
(and are not returned); `stream: true` sends server-sent events (`data: {...}` chunks, then
`data: [DONE]`); `usage` counts prompt and completion tokens.

Auth and limits follow the rest of the API: reads (all of these) need the bearer token
only when `api.protect_reads` is set; `max_tokens` is bounded by `MAX_NEW_TOKENS`, the
prompt by the model's context, the body by `MAX_BODY_BYTES`. Errors, 4xx and 5xx alike,
come in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Parameters kmd cannot honour (n > 1, penalties, logprobs, tools...) are refused with a
400 naming the parameter rather than silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from kmd.daemon.api import MAX_NEW_TOKENS, Read
from kmd.daemon.surface import NotServingError

if TYPE_CHECKING:
    from kmd.daemon.surface import Service
    from kmd.editors.model import ModelHost

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
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body, headers=headers)


class OpenAIError(Exception):
    """A request kmd refuses, with OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


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
                return openai_error(exc.status, exc.message, param=exc.param, code=exc.code)
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


# ----- request bodies ------------------------------------------------------------------------


class _Body(BaseModel):
    # Text is never stripped: whitespace is part of a prompt.
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    user: str | None = Field(default=None, max_length=256)  # accepted, not used
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("penalties are not supported (leave them out or 0)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is None:
            return None
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop sequence must be 1-{MAX_STOP_CHARS} characters")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value: dict[str, bool] | None) -> dict[str, bool] | None:
        if value and set(value) - {"include_usage"}:
            raise ValueError(f"unsupported stream option(s): {sorted(set(value) - {'include_usage'})}")
        return value

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]  # normalised to a list above

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str = Field(max_length=MAX_CONTENT_CHARS)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(max_length=MAX_CONTENT_CHARS)
    name: str | None = Field(default=None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)  # newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @property
    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or MAX_NEW_TOKENS


class CompletionBody(_Body):
    prompt: str | list[str] = Field(max_length=MAX_CONTENT_CHARS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request (a list of one string, or a string)")
        text = value if isinstance(value, str) else value[0]
        if not text:
            raise ValueError("the prompt is empty")
        if len(text) > MAX_CONTENT_CHARS:
            raise ValueError(f"the prompt is over {MAX_CONTENT_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionBody:
        for name, ok in (("echo", not self.echo), ("suffix", self.suffix is None),
                         ("best_of", self.best_of in (None, 1)), ("logprobs", not self.logprobs)):  # fmt: skip
            if not ok:
                raise ValueError(f"{name} is not supported")
        return self

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def limit(self) -> int:
        return self.max_tokens or 16  # OpenAI's default for completions


# ----- the model and its edit state ----------------------------------------------------------


def served_model_id(daemon: Service) -> str:
    """The id clients pass as `model`: the base model's name (its hub id or path as configured;
    the embedded model's own name)."""
    from kmd.editors.model import EMBEDDED, EMBEDDED_NAME

    source = daemon.replica or daemon.maintainer
    if source is not None:
        return source.host.identity.name
    configured = daemon.settings.model.model
    return EMBEDDED_NAME if configured == EMBEDDED else configured


def _serving(daemon: Service) -> Any:
    """The writer's maintainer or the replica: whatever holds the served editor."""
    source = daemon.replica or daemon.maintainer
    if source is None or source.editor is None:
        raise NotServingError("starting: model and state are not loaded yet")
    return source


def edit_state(daemon: Service) -> dict[str, Any]:
    """What the served model is: the base model plus which committed edit state.

    `version` is the sha256 of the state's manifest.json, the same id replicas load and
    the ledger records for published states (None before the first edit is saved).
    """
    source = daemon.replica or daemon.maintainer
    info: dict[str, Any] = {"role": daemon.settings.cluster.role, "backend": daemon.policy.backend,
                            "ready": daemon.ready, "edits": None, "state_version": None}  # fmt: skip
    if source is None or source.editor is None:
        return info
    info["edits"] = len(source.editor.edit_ids)
    if daemon.replica is not None:
        info["state_version"] = daemon.replica.loaded.version if daemon.replica.loaded else None
    else:
        manifest = Path(daemon.maintainer.editor_dir) / "manifest.json"
        if manifest.is_file():
            info["state_version"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    return info


def _fingerprint(state: dict[str, Any]) -> str:
    version = state.get("state_version")
    return f"kmd-{version[:12]}" if version else "kmd-base"


def _check_model(daemon: Service, requested: str) -> str:
    served = served_model_id(daemon)
    if requested not in (served, daemon.settings.model.model):
        raise OpenAIError(404, f"model {requested!r} is not served here; this server serves {served!r}",
                          param="model", code="model_not_found")  # fmt: skip
    return served


def _context_limit(host: ModelHost) -> int:
    context = getattr(host.model.config, "max_position_embeddings", None) or MAX_PROMPT_TOKENS
    return min(int(context), MAX_PROMPT_TOKENS + MAX_NEW_TOKENS)


def _check_length(host: ModelHost, prompt_ids: Sequence[int], max_tokens: int) -> None:
    context = _context_limit(host)
    if not prompt_ids:
        raise OpenAIError(400, "the prompt encodes to no tokens", param="prompt")
    if len(prompt_ids) + max_tokens > context or len(prompt_ids) > MAX_PROMPT_TOKENS:
        raise OpenAIError(400, f"the prompt is {len(prompt_ids)} tokens and max_tokens {max_tokens}: over this "
                               f"model's context of {context} tokens", param="messages", code="context_length_exceeded")  # fmt: skip


def chat_prompt_ids(host: ModelHost, messages: Sequence[Message]) -> list[int]:
    """Token ids of the conversation through the tokenizer's chat template, reply opened."""
    from jinja2 import TemplateError

    if not getattr(host.tokenizer, "chat_template", None):
        raise OpenAIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages",
                          code="no_chat_template")  # fmt: skip
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        text = host.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # e.g. a template that insists on alternating roles
        raise OpenAIError(400, f"the chat template refused these messages: {exc}", param="messages") from exc
    # The template writes its own special tokens: no second BOS (as editors.answers does).
    return host.encode(text, special=False)


# ----- generation: THE SEAM ------------------------------------------------------------------
#
# `token_stream` is the one place these endpoints touch the model. Today it runs
# `model.generate` for one request at a time under the same lock `Daemon.generate` uses;
# a batched serving engine can replace its body as long as it keeps the contract: yield
# the new token ids of one request, in order, as they are produced, through the edited
# model with routing on the prompt tokens; stop early when `cancel` is set; raise
# NotServingError before yielding anything when no model is loaded.


class _Cancelled:
    """Stops `generate` at the next step once the consumer no longer wants tokens."""

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel = cancel

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool, device=input_ids.device)


class _QueueStreamer:
    """A transformers streamer: the first `put` is the prompt (skipped), then one (B,) tensor per step."""

    def __init__(self, out: queue.Queue) -> None:
        self.out, self.prompt_seen = out, False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.out.put(int(token))

    def end(self) -> None:
        pass


@contextmanager
def _seeded(seed: int | None, device: Any) -> Iterator[None]:
    """Seed the sampler for this request only: the global RNG state is put back after."""
    import torch

    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


_END = object()


def token_stream(daemon: Service, input_ids: Sequence[int], *, max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, cancel: threading.Event | None = None) -> Iterator[int]:  # fmt: skip
    """New token ids for one prompt through the served (edited) model, as they come."""
    source = _serving(daemon)  # fail now (503), not after the response started
    cancel = cancel or threading.Event()
    out: queue.Queue = queue.Queue()

    def run() -> None:
        import torch
        from transformers import StoppingCriteriaList

        try:
            # The lock: never generate from a model half-way through an edit or a state swap.
            with source.lock:
                editor, host = source.editor, source.host  # read under the lock: a replica swaps editors
                ids = torch.tensor([list(input_ids)], device=host.device)  # (1, T)
                mask = torch.ones_like(ids)
                sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
                            if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})  # fmt: skip
                with torch.no_grad(), editor.query(mask.bool()), _seeded(seed, host.device):
                    host.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, use_cache=True,
                                        pad_token_id=host.tokenizer.pad_token_id, streamer=_QueueStreamer(out),
                                        stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]), **sampling)  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            out.put(exc)
        finally:
            out.put(_END)

    def tokens() -> Iterator[int]:
        threading.Thread(target=run, name="kmd-openai-generate", daemon=True).start()
        try:
            while (item := out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()  # the consumer stopped (stop string, disconnect, error): stop generating

    return tokens()


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


def _eos_ids(host: ModelHost) -> set[int]:
    ids = {host.tokenizer.eos_token_id}
    configured = getattr(host.model.generation_config, "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list | tuple) else {configured}
    return {i for i in ids if i is not None}


class Generation:
    """One request's text deltas; `finish_reason` and `completion_tokens` once exhausted."""

    def __init__(self, daemon: Service, prompt_ids: list[int], body: _Body, max_tokens: int) -> None:
        source = _serving(daemon)
        self.host = source.host
        self.prompt_tokens = len(prompt_ids)
        self.max_tokens = max_tokens
        self.cancel = threading.Event()
        self.stream = token_stream(daemon, prompt_ids, max_tokens=max_tokens, temperature=body.temperature,
                                   top_p=body.top_p, seed=body.seed, cancel=self.cancel)  # fmt: skip
        self.text = StopText(self.host.tokenizer, body.stops)
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def deltas(self) -> Iterator[str]:
        last = None
        try:
            for token in self.stream:
                self.completion_tokens += 1
                last = token
                delta = self.text.push(token)
                if delta:
                    yield delta
                if self.text.stopped:
                    break
            tail = self.text.finish()
            if tail:
                yield tail
        finally:
            self.cancel.set()
        ended = self.text.stopped or last in _eos_ids(self.host) or self.completion_tokens < self.max_tokens
        self.finish_reason = "stop" if ended else "length"

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}  # fmt: skip


async def _sse(events: Iterator[dict[str, Any]], cancel: threading.Event) -> AsyncIterator[str]:
    """Server-sent events: each chunk as `data: <json>`, then `data: [DONE]`."""
    done = object()
    try:
        while (event := await run_in_threadpool(next, events, done)) is not done:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # the client went away, or the stream ended: stop generating


def _error_event(exc: Exception) -> dict[str, Any]:
    status = 503 if isinstance(exc, NotServingError) else 500
    message = str(exc) if status == 503 else f"generation failed: {type(exc).__name__}"
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": None, "code": None}}


def _stream_response(events: Iterator[dict[str, Any]], cancel: threading.Event) -> StreamingResponse:
    return StreamingResponse(_sse(events, cancel), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip


# ----- the router ----------------------------------------------------------------------------


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


__all__ = ["OpenAIError", "StopText", "edit_state", "openai_router", "served_model_id", "token_stream"]
