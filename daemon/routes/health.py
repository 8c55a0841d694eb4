"""Liveness, readiness and metrics (`health_router`).

Liveness and readiness are coroutines: they run on the event loop, so they answer even
while every worker thread is busy generating (neither touches the model, the lock or the
database).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from kmd.daemon.surface import Service

__all__ = ["health_router"]

# Every family is `kmd_<name>`; no per-edit labels.
COUNTERS = {
    "edits_committed": "edits that passed their probes and were persisted",
    "edits_reverted": "edits reverted (failed probes, people, regression, supersession)",
    "edits_retried": "edits retried once with a stronger configuration",
    "facts_skipped": "verified facts the model already answered",
    "regression_reverts": "edits reverted by the periodic regression check",
    "cycles": "maintenance cycles run",
    "errors": "jobs that failed with an error",
    "feed_entries_unmatched": "feed entries that stated no fact (no kf: elements, no extraction rule matched)",
    "state_loads": "published states a replica loaded and put in service",
}
GAUGES = {
    "ready": "1 when serving with model and state loaded",
    "writer": "1 in the process that holds the writer role",
    "edit_in_flight": "1 while an edit or revert runs",
    "edits_active": "edits currently applied to the model",
    "locality": "last measured locality agreement with the unedited model",
    "probe_seconds": "duration of the last post-edit probe",
    "cycle_seconds": "duration of the last maintenance cycle",
    # Only ever grows: a drop is a rollback of the chain's tail (alert on it).
    "ledger_head_seq": "seq of the ledger's hash-chain head",
}


class FiguresCollector:
    """Reads the service's figures at scrape time."""

    def __init__(self, daemon: Service) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        figures = asdict(self.daemon.figures())
        for names, kind in ((COUNTERS, CounterMetricFamily), (GAUGES, GaugeMetricFamily)):
            for name, doc in names.items():
                family = kind(f"kmd_{name}", doc)
                family.add_metric([], figures[name])
                yield family


def health_router(daemon: Service) -> APIRouter:
    router = APIRouter()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FiguresCollector(daemon))  # type: ignore[arg-type]

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        ready, why = daemon.readiness()
        return JSONResponse(status_code=200 if ready else 503, content={"ready": ready, "reason": why})

    @router.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    return router
