"""The edit ledger, fact submission and revert (`ledger_router`).

    GET  /v1/edits[/{id}]         the edit ledger;  GET /v1/reverts  the revert log
    POST /v1/facts                submit a fact (a claim of the policy's `api` source)
    POST /v1/edits/{id}/revert    revert one edit now (the writer only: 409 on a replica)
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import Field

from kmd.daemon.auth import Read, Write
from kmd.daemon.ledger import LedgerError
from kmd.daemon.surface import NotServingError, ReplicaError
from kmd.daemon.web import StrictBody

if TYPE_CHECKING:
    from kmd.daemon.surface import Service

__all__ = ["FactBody", "RevertBody", "ledger_router"]

# Ledger ids are 64-bit signed integers: larger ones cannot exist (and would overflow the query).
EditId = Annotated[int, Path(ge=1, le=2**63 - 1)]


class FactBody(StrictBody):
    subject: str = Field(min_length=1, max_length=500)
    relation: str = Field(min_length=1, max_length=64)
    object: str = Field(min_length=1, max_length=500)
    # An `api` source of the policy (default: its only one); never a feed's or a file's id.
    source_id: str | None = Field(default=None, min_length=1, max_length=64)
    url: str = Field(default="", max_length=2000)


class RevertBody(StrictBody):
    reason: str = Field(default="reverted through the API", min_length=1, max_length=500)


def plain(value: Any) -> Any:
    """Ledger records as JSON values (dataclasses as objects, datetimes as ISO 8601)."""
    if is_dataclass(value):
        return {k: plain(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def ledger_router(daemon: Service) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/edits")
    def edits(_: Read, status: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[Any]:
        return plain(daemon.ledger.edits(status=status, limit=limit))

    @router.get("/v1/edits/{edit_id}")
    def edit(edit_id: EditId, _: Read) -> Any:
        try:
            return plain(daemon.ledger.edit(edit_id))
        except LedgerError as exc:
            raise HTTPException(404, str(exc)) from exc

    @router.get("/v1/reverts")
    def reverts(_: Read, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[Any]:
        return plain(daemon.ledger.reverts(limit=limit))

    @router.post("/v1/facts", status_code=202)
    def submit_fact(body: FactBody, _: Write) -> dict[str, Any]:
        try:
            return daemon.submit_fact(body.subject, body.relation, body.object, body.source_id, body.url)
        except PermissionError as exc:  # another kind of source's id, or no api source
            raise HTTPException(403, str(exc)) from exc
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc

    @router.post("/v1/edits/{edit_id}/revert")
    def revert(edit_id: EditId, body: RevertBody, _: Write) -> dict[str, Any]:
        try:
            reverter = daemon.reverter()
        except ReplicaError as exc:
            raise HTTPException(409, str(exc)) from exc
        except NotServingError as exc:
            raise HTTPException(503, str(exc)) from exc
        try:
            return reverter.revert(edit_id, reason=body.reason, actor="api")
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from exc

    return router
