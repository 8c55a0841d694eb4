"""The HTTP app: assembled here from the routers of each surface; no route lives here.

    GET  /healthz                 cheap liveness (the process answers)
    GET  /readyz                  200 once model and state are loaded (edits in flight do
                                  not change that); 503 before start-up finished
    GET  /metrics                 Prometheus text, `kmd_` prefix, no per-edit labels
    POST /v1/generate             greedy generation through the committed edits (the serving
                                  engine); 429 + Retry-After when the caller's budget is spent
    GET  /v1/edits[/{id}]         the edit ledger;  GET /v1/reverts  the revert log
    POST /v1/facts                submit a fact (a claim of the policy's `api` source)
    POST /v1/edits/{id}/revert    revert one edit now (the writer only: 409 on a replica)

Those are `kmd.daemon.routes`; the same app serves the OpenAI-compatible endpoints
(`kmd.daemon.openai_api`) and the review console at /ui (`kmd.daemon.console`).

Auth (`kmd.daemon.auth`): writes need the bearer token; reads are open unless
`protect_reads` is set. Limits that hold before anything else runs: a request body over
`api.max_body_bytes` is refused with 413 by `kmd.daemon.web.BodyLimit` (before routing and
auth). Generation (here, the OpenAI-compatible endpoints and the console's answers) goes
through one serving engine (`kmd.daemon.serving`) with per-caller budgets, and its routes
are coroutines that hold no worker thread while they wait for tokens: health checks, the
ledger and operator actions (revert, approve, reject, release) never wait behind it.

Dependencies go one way: this module imports the surfaces, and they import only what they
share (`kmd.daemon.auth`, `kmd.daemon.web`, `kmd.daemon.surface`), never this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from kmd.daemon.console import console_router
from kmd.daemon.openai_api import openai_router
from kmd.daemon.routes import generate_router, health_router, ledger_router
from kmd.daemon.web import BodyLimit

if TYPE_CHECKING:
    from kmd.daemon.surface import Service

__all__ = ["create_app"]


def create_app(daemon: Service) -> FastAPI:
    app = FastAPI(title="kmd", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.daemon = daemon  # what `kmd.daemon.auth` checks a request against
    app.add_middleware(BodyLimit, limit=daemon.settings.api.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse(status_code=422, content={"error": "invalid request", "problems": problems})

    # In this order: a path two routers could match goes to the first (as it always has).
    for router in (health_router, generate_router, ledger_router, openai_router, console_router):
        app.include_router(router(daemon))
    return app
