"""Reading the ledger: records by id, filtered lists, counts.

Plain functions over a session: `Ledger` opens one read session per call and hands it
here, so these know nothing of engines, writers or the head file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import func
from sqlmodel import Session, col, select

from kmd.common.values import iso
from kmd.daemon.ledger import queries
from kmd.daemon.ledger.lifecycle import LedgerError
from kmd.daemon.ledger.records import ClaimRecord, EditRecord, EventRecord, FactRecord, RevertRecord, StateRecord
from kmd.daemon.ledger.tables import ClaimRow, EditRow, EventRow, FactRow, RevertRow, StateRow

__all__ = ["active_facts", "claim", "claims", "counts", "edit", "edits", "events", "fact", "facts", "named_state",
           "revert_requests", "reverts"]


def _statuses(status: str | Sequence[str]) -> list[str]:
    return [status] if isinstance(status, str) else list(status)


def claim(s: Session, claim_id: int) -> ClaimRecord:
    row = queries.row_by_id(s, ClaimRow, claim_id)
    if row is None:
        raise LedgerError(f"no claim {claim_id}")
    return ClaimRecord.of(row)


def claims(
    s: Session,
    *,
    status: str | Sequence[str] | None = None,
    source_id: str | None = None,
    fact_id: int | None = None,
    keys: Iterable[tuple[str, str]] | None = None,
    since: datetime | None = None,
    limit: int | None = None,
    newest_first: bool = False,
) -> list[ClaimRecord]:
    """Claims filtered by status, source, fact, (subject_key, relation) keys, ingest time."""
    def base():  # noqa: ANN202
        q = select(ClaimRow)
        if status is not None:
            q = q.where(col(ClaimRow.status).in_(_statuses(status)))
        if source_id is not None:
            q = q.where(ClaimRow.source_id == source_id)
        if fact_id is not None:
            q = q.where(ClaimRow.fact_id == fact_id)
        if since is not None:
            q = q.where(ClaimRow.ingested_at >= iso(since))
        return q.order_by(col(ClaimRow.id).desc() if newest_first else col(ClaimRow.id))

    if keys is None:
        q = base()
        if limit is not None:
            q = q.limit(limit)
        return [ClaimRecord.of(r) for r in s.exec(q)]
    wanted = set(keys)
    subjects = sorted({k[0] for k in wanted})
    out: list[ClaimRecord] = []
    for i in range(0, len(subjects), 500):
        q = base().where(col(ClaimRow.subject_key).in_(subjects[i : i + 500]))
        out += [ClaimRecord.of(r) for r in s.exec(q) if (r.subject_key, r.relation) in wanted]
    out.sort(key=lambda c: c.id, reverse=newest_first)
    return out[:limit] if limit is not None else out


def fact(s: Session, fact_id: int) -> FactRecord:
    row = queries.row_by_id(s, FactRow, fact_id)
    if row is None:
        raise LedgerError(f"no fact {fact_id}")
    return FactRecord.of(row, _edit_to_supersede(s, row))


def facts(s: Session, *, status: str | Sequence[str] | None = None, limit: int | None = None,
          newest_first: bool = True) -> list[FactRecord]:  # fmt: skip
    q = select(FactRow)
    if status is not None:
        q = q.where(col(FactRow.status).in_(_statuses(status)))
    q = q.order_by(col(FactRow.id).desc() if newest_first else col(FactRow.id))
    if limit is not None:
        q = q.limit(limit)
    return [FactRecord.of(r, _edit_to_supersede(s, r)) for r in s.exec(q)]


def active_facts(s: Session, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[FactRecord]]:
    """Facts still speaking for each key (see ACTIVE_FACT_STATUSES), oldest first."""
    return {k: [FactRecord.of(r) for r in rows] for k, rows in queries.active_facts(s, keys).items()}


def edit(s: Session, edit_id: int) -> EditRecord:
    row = queries.row_by_id(s, EditRow, edit_id)
    if row is None:
        raise LedgerError(f"no edit {edit_id}")
    return EditRecord.of(row)


def edits(s: Session, *, status: str | Sequence[str] | None = None, fact_id: int | None = None,
          limit: int | None = None, newest_first: bool = False) -> list[EditRecord]:  # fmt: skip
    q = select(EditRow)
    if status is not None:
        q = q.where(col(EditRow.status).in_(_statuses(status)))
    if fact_id is not None:
        q = q.where(EditRow.fact_id == fact_id)
    q = q.order_by(col(EditRow.id).desc() if newest_first else col(EditRow.id))
    if limit is not None:
        q = q.limit(limit)
    return [EditRecord.of(r) for r in s.exec(q)]


def revert_requests(s: Session) -> list[tuple[EditRecord, str]]:
    """Reverts requested and not yet finished, oldest first, with who asked."""
    out = []
    for row in s.exec(select(EditRow).where(EditRow.status == "reverting").order_by(col(EditRow.id))):
        actor = s.exec(
            select(EventRow.actor).where(EventRow.entity == "edit").where(EventRow.entity_id == row.id)
            .where(EventRow.kind == "edit.reverting").order_by(col(EventRow.seq).desc())
        ).first()  # fmt: skip
        out.append((EditRecord.of(row), actor or "daemon"))
    return out


def reverts(s: Session, *, edit_id: int | None = None, limit: int | None = None) -> list[RevertRecord]:
    q = select(RevertRow)
    if edit_id is not None:
        q = q.where(RevertRow.edit_id == edit_id)
    q = q.order_by(col(RevertRow.id).desc())
    if limit is not None:
        q = q.limit(limit)
    return [RevertRecord.of(r) for r in s.exec(q)]


def events(s: Session, *, entity: str | None = None, entity_id: int | None = None,
           limit: int | None = None) -> list[EventRecord]:  # fmt: skip
    q = select(EventRow)
    if entity is not None:
        q = q.where(EventRow.entity == entity)
    if entity_id is not None:
        q = q.where(EventRow.entity_id == entity_id)
    q = q.order_by(col(EventRow.seq))
    if limit is not None:
        q = q.limit(limit)
    return [EventRecord.of(r) for r in s.exec(q)]


def counts(s: Session) -> dict[str, dict[str, int]]:
    """Rows per status for claims, facts and edits (for summaries and metrics)."""
    out: dict[str, dict[str, int]] = {}
    for name, table in (("claims", ClaimRow), ("facts", FactRow), ("edits", EditRow)):
        rows = s.exec(select(table.status, func.count()).group_by(table.status)).all()
        out[name] = {status: n for status, n in rows}
    return out


def named_state(s: Session, digest: str) -> StateRecord | None:
    """The newest record of the editor state with this digest, if the writer saved it."""
    row = s.exec(select(StateRow).where(StateRow.digest == digest).order_by(col(StateRow.id).desc())).first()
    return StateRecord.of(row) if row is not None else None


def _edit_to_supersede(s: Session, fact: FactRow) -> int | None:
    """The committed edit of the fact this one supersedes, if it is still in place."""
    if fact.supersedes_fact_id is None or fact.status not in ("ready", "quarantined", "blocked"):
        return None
    old = s.exec(
        select(EditRow.id).where(EditRow.fact_id == fact.supersedes_fact_id).where(EditRow.status == "committed")
    ).first()
    return old
