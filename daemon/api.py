"""The HTTP API: health, readiness, metrics, generation, the ledger, and two writes.

    GET  /healthz                 cheap liveness (the process answers)
    GET  /readyz                  200 once model and state are loaded (edits in flight do
                                  not change that); 503 before start-up finished
    GET  /metrics                 Prometheus text, `kmd_` prefix, no per-edit labels
    POST /v1/generate             greedy generation through the committed edits (the serving
                                  engine); 429 + Retry-After when the caller's budget is spent
    GET  /v1/edits[/{id}]         the edit ledger;  GET /v1/reverts  the revert log
    POST /v1/facts                submit a fact (a claim of the policy's `api` source)
    POST /v1/edits/{id}/revert    revert one edit now (the writer only: 409 on a replica)

Auth (`kmd.daemon.auth`): writes need the bearer token; reads are open unless
`protect_reads` is set. Limits that hold before anything else runs: a request body over
`api.max_body_bytes` is refused with 413 by `BodyLimit` (before routing and auth).
Generation (here, the OpenAI-compatible endpoints and the console's answers) goes through
one serving engine (`kmd.daemon.serving`) with per-caller budgets, and its routes are
coroutines that hold no worker thread while they wait for tokens: health checks, the
ledger and operator actions (revert, approve, reject, release) never wait behind it.
The same app serves the OpenAI-compatible endpoints (`kmd.daemon.openai_api`) and the
review console at /ui (`kmd.daemon.console`), each from its own module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from kmd.daemon.auth import Read, Write, caller
from kmd.daemon.ledger import LedgerError
from kmd.daemon.serving import GenerationRequest, Refused
from kmd.daemon.surface import NotServingError

if TYPE_CHECKING:
    from kmd.daemon.surface import Service

MAX_NEW_TOKENS = 256
# Ledger ids are 64-bit signed integers: larger ones cannot exist (and would overflow the query).
EditId = Annotated[int, Path(ge=1, le=2**63 - 1)]


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


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class GenerateBody(_Body):
    prompt: str = Field(min_length=1, max_length=4000)
    max_new_tokens: int = Field(default=32, ge=1, le=MAX_NEW_TOKENS)


class FactBody(_Body):
    subject: str = Field(min_length=1, max_length=500)
    relation: str = Field(min_length=1, max_length=64)
    object: str = Field(min_length=1, max_length=500)
    # An `api` source of the policy (default: its only one); never a feed's or a file's id.
    source_id: str | None = Field(default=None, min_length=1, max_length=64)
    url: str = Field(default="", max_length=2000)


class RevertBody(_Body):
    reason: str = Field(default="reverted through the API", min_length=1, max_length=500)


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


class _StatsCollector:
    """Reads the daemon's counters at scrape time."""

    def __init__(self, daemon: Service) -> None:
        self.daemon = daemon

    def collect(self):
        m = self.daemon.maintainer
        stats = m.stats if m is not None else None
        counters = {
            "edits_committed": "edits that passed their probes and were persisted",
            "edits_reverted": "edits reverted (failed probes, people, regression, supersession)",
            "edits_retried": "edits retried once with a stronger configuration",
            "facts_skipped": "verified facts the model already answered",
            "regression_reverts": "edits reverted by the periodic regression check",
            "cycles": "maintenance cycles run",
            "errors": "jobs that failed with an error",
        }
        for name, doc in counters.items():
            family = CounterMetricFamily(f"kmd_{name}", doc)
            family.add_metric([], float(getattr(stats, name, 0) if stats else 0))
            yield family
        intake = self.daemon.intake
        unmatched = CounterMetricFamily("kmd_feed_entries_unmatched",
                                        "feed entries that stated no fact (no kf: elements, no extraction rule matched)")
        unmatched.add_metric([], float(intake.entries_unmatched if intake else 0))
        yield unmatched
        replica = self.daemon.replica
        loads = CounterMetricFamily("kmd_state_loads", "published states a replica loaded and put in service")
        loads.add_metric([], float(replica.loads if replica else 0))
        yield loads
        editor = replica.editor if replica else (m.editor if m else None)
        gauges = {
            "ready": (1.0 if self.daemon.ready else 0.0, "1 when serving with model and state loaded"),
            "writer": (1.0 if m is not None and self.daemon.ledger.writer_term is not None else 0.0,
                       "1 in the process that holds the writer role"),
            "edit_in_flight": (1.0 if stats and stats.busy else 0.0, "1 while an edit or revert runs"),
            "edits_active": (float(len(editor.edit_ids)) if editor else 0.0, "edits currently applied to the model"),
            "locality": (stats.last_locality if stats and stats.last_locality is not None else float("nan"),
                         "last measured locality agreement with the unedited model"),
            "probe_seconds": (stats.last_probe_seconds if stats else 0.0, "duration of the last post-edit probe"),
            "cycle_seconds": (stats.last_cycle_seconds if stats else 0.0, "duration of the last maintenance cycle"),
            # Only ever grows: a drop is a rollback of the chain's tail (alert on it).
            "ledger_head_seq": (float(self.daemon.ledger.chain_head().seq), "seq of the ledger's hash-chain head"),
        }  # fmt: skip
        for name, (value, doc) in gauges.items():
            family = GaugeMetricFamily(f"kmd_{name}", doc)
            family.add_metric([], value)
            yield family


def create_app(daemon: Service) -> FastAPI:
    app = FastAPI(title="kmd", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.daemon = daemon
    limits = daemon.settings.api
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(daemon))  # type: ignore[arg-type]

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse(status_code=422, content={"error": "invalid request", "problems": problems})

    def maintainer():
        if daemon.settings.cluster.role == "replica":
            raise HTTPException(409, "this is a serving replica; send edits and reverts to the writer")
        if daemon.maintainer is None:
            raise HTTPException(503, "starting: model and state are not loaded yet")
        return daemon.maintainer

    # async: these run on the event loop, so they answer even while every worker thread
    # is busy generating (neither touches the model, the lock or the database).
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready, why = daemon.readiness()
        return JSONResponse(status_code=200 if ready else 503, content={"ready": ready, "reason": why})

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/generate")
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

    @app.get("/v1/edits")
    def edits(_: Read, status: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[Any]:
        return _plain(daemon.ledger.edits(status=status, limit=limit))

    @app.get("/v1/edits/{edit_id}")
    def edit(edit_id: EditId, _: Read) -> Any:
        try:
            return _plain(daemon.ledger.edit(edit_id))
        except LedgerError as exc:
            raise HTTPException(404, str(exc)) from exc

    @app.get("/v1/reverts")
    def reverts(_: Read, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[Any]:
        return _plain(daemon.ledger.reverts(limit=limit))

    @app.post("/v1/facts", status_code=202)
    def submit_fact(body: FactBody, _: Write) -> dict[str, Any]:
        try:
            return daemon.submit_fact(body.subject, body.relation, body.object, body.source_id, body.url)
        except PermissionError as exc:  # another kind of source's id, or no api source
            raise HTTPException(403, str(exc)) from exc
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc

    @app.post("/v1/edits/{edit_id}/revert")
    def revert(edit_id: EditId, body: RevertBody, _: Write) -> dict[str, Any]:
        m = maintainer()
        try:
            return m.revert(edit_id, reason=body.reason, actor="api")
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from exc

    # The OpenAI-compatible endpoints and the review console (their own modules).
    from kmd.daemon.console import console_router
    from kmd.daemon.openai_api import openai_router

    app.include_router(openai_router(daemon))
    app.include_router(console_router(daemon))
    return app


