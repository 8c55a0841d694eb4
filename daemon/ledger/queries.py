"""Queries the transaction and the reading side share (plain result rows where bulk matters)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from kmd.common.values import iso
from kmd.daemon.ledger.lifecycle import ACTIVE_FACT_STATUSES
from kmd.daemon.ledger.tables import ClaimRow, FactRow

__all__ = ["MAX_ROW_ID", "active_facts", "claims_for_keys", "count_claims", "row_by_id"]

MAX_ROW_ID = 2**63 - 1  # row ids are 64-bit signed integers (SQLite INTEGER, PostgreSQL bigint)


def row_by_id(s: Session, table: type[Any], row_id: int) -> Any:
    """The row with this id, or None; an id no row can have (beyond 64 bits, or not
    positive) is simply not found instead of overflowing the database driver."""
    if isinstance(row_id, int) and not 1 <= row_id <= MAX_ROW_ID:
        return None
    return s.get(table, row_id)


def claims_for_keys(s: Session, keys: Iterable[tuple[str, str]], status: Sequence[str] | None) -> list[Any]:
    """Claim rows (plain result rows, not ORM objects: faster in bulk) for (subject_key, relation) keys."""
    wanted = set(keys)
    subjects = sorted({k[0] for k in wanted})
    table = ClaimRow.__table__
    out: list[Any] = []
    for i in range(0, len(subjects), 500):
        q = sa_select(table).where(table.c.subject_key.in_(subjects[i : i + 500]))
        if status is not None:
            q = q.where(table.c.status.in_(list(status)))
        out += [r for r in s.connection().execute(q) if (r.subject_key, r.relation) in wanted]
    out.sort(key=lambda r: r.id)
    return out


def active_facts(s: Session, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[FactRow]]:
    wanted = set(keys)
    subjects = sorted({k[0] for k in wanted})
    out: dict[tuple[str, str], list[FactRow]] = defaultdict(list)
    for i in range(0, len(subjects), 500):
        q = (
            select(FactRow)
            .where(col(FactRow.subject_key).in_(subjects[i : i + 500]))
            .where(col(FactRow.status).in_(ACTIVE_FACT_STATUSES))
            .order_by(col(FactRow.id))
        )
        for r in s.exec(q):
            if (r.subject_key, r.relation) in wanted:
                out[(r.subject_key, r.relation)].append(r)
    return dict(out)


def count_claims(s: Session, source_id: str, status: Sequence[str], since: datetime) -> int:
    q = (
        select(func.count())
        .select_from(ClaimRow)
        .where(ClaimRow.source_id == source_id)
        .where(col(ClaimRow.status).in_(list(status)))
        .where(ClaimRow.ingested_at >= iso(since))
    )
    return int(s.exec(q).one())
