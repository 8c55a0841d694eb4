"""The served model, its edit state, and generation for the OpenAI-compatible endpoints:
tokens from the edited model (the seam with serving), then text with stop strings."""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from kmd.daemon.api import MAX_NEW_TOKENS
from kmd.daemon.openai_api.bodies import Message, _Body
from kmd.daemon.openai_api.errors import _ERROR_TYPES, MAX_PROMPT_TOKENS, OpenAIError
from kmd.daemon.surface import NotServingError

if TYPE_CHECKING:
    from kmd.daemon.surface import Service
    from kmd.editors.model import ModelHost

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
