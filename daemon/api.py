"""The HTTP API: health, readiness, metrics, generation, the ledger, and two writes.

    GET  /healthz                 cheap liveness (the process answers)
    GET  /readyz                  200 once model and state are loaded (edits in flight do
                                  not change that); 503 before start-up finished
    GET  /metrics                 Prometheus text, `kmd_` prefix, no per-edit labels
    POST /v1/generate             greedy generation through the committed edits, batched
                                  with concurrent requests; 429 + Retry-After when saturated
    GET  /v1/edits[/{id}]         the edit ledger;  GET /v1/reverts  the revert log
    POST /v1/facts                submit a curated fact (a claim from a policy source)
    POST /v1/edits/{id}/revert    revert one edit now (the writer only: 409 on a replica)

Writes need `Authorization: Bearer <token>` (the token from the daemon config; with no
token configured, writes are refused). Reads are open unless `protect_reads` is set.
"""

from __future__ import annotations

import hmac
from dataclasses import asdict, is_dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from kmd.daemon.ledger import LedgerError
from kmd.daemon.serving import QueueFull
from kmd.daemon.service import NotServingError

if TYPE_CHECKING:
    from kmd.daemon.service import Daemon

MAX_NEW_TOKENS = 256


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class GenerateBody(_Body):
    prompt: str = Field(min_length=1, max_length=4000)
    max_new_tokens: int = Field(default=32, ge=1, le=MAX_NEW_TOKENS)


class FactBody(_Body):
    subject: str = Field(min_length=1, max_length=500)
    relation: str = Field(min_length=1, max_length=64)
    object: str = Field(min_length=1, max_length=500)
    source_id: str = Field(default="api", min_length=1, max_length=64)
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

    def __init__(self, daemon: Daemon) -> None:
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
        }  # fmt: skip
        for name, (value, doc) in gauges.items():
            family = GaugeMetricFamily(f"kmd_{name}", doc)
            family.add_metric([], value)
            yield family


def _token_ok(request: Request) -> bool:
    token = request.app.state.daemon.api_token
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)


def _writer(request: Request) -> None:
    if not request.app.state.daemon.api_token:
        raise HTTPException(403, "writes are disabled: no API token is configured")
    if not _token_ok(request):
        raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})


def _reader(request: Request) -> None:
    if request.app.state.daemon.settings.api.protect_reads and not _token_ok(request):
        raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})


# Module level: with postponed annotations FastAPI resolves these names in module globals.
Read = Annotated[None, Depends(_reader)]
Write = Annotated[None, Depends(_writer)]


def create_app(daemon: Daemon) -> FastAPI:
    app = FastAPI(title="kmd", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.daemon = daemon
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

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready, why = daemon.readiness()
        return JSONResponse(status_code=200 if ready else 503, content={"ready": ready, "reason": why})

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/generate")
    def generate(body: GenerateBody, _: Read) -> dict[str, Any]:
        try:
            text, got = daemon.generate_result(body.prompt, body.max_new_tokens)
        except NotServingError as exc:
            raise HTTPException(503, str(exc)) from exc
        except QueueFull as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after)}) from exc
        # `edits`: committed edits in the state that answered (lets clients see which state they read)
        return {"prompt": body.prompt, "text": text, "edits": got.edits}

    @app.get("/v1/edits")
    def edits(_: Read, status: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[Any]:
        return _plain(daemon.ledger.edits(status=status, limit=limit))

    @app.get("/v1/edits/{edit_id}")
    def edit(edit_id: int, _: Read) -> Any:
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
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc

    @app.post("/v1/edits/{edit_id}/revert")
    def revert(edit_id: int, body: RevertBody, _: Write) -> dict[str, Any]:
        m = maintainer()
        try:
            return m.revert(edit_id, reason=body.reason, actor="api")
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from exc

    return app


