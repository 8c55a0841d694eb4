"""Reading the ledger: records by id, filtered lists, counts. Every read is its own session."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from kmd.common.values import iso
from kmd.daemon.ledger import chain, cluster, queries
from kmd.daemon.ledger.head import Head, HeadFile, HeadFileError
from kmd.daemon.ledger.lifecycle import LedgerError
from kmd.daemon.ledger.records import (
    ChainReport,
    ClaimRecord,
    EditRecord,
    EventRecord,
    FactRecord,
    PublishedState,
    RevertRecord,
    StateRecord,
)
from kmd.daemon.ledger.tables import ClaimRow, EditRow, EventRow, FactRow, RevertRow, StateRow

__all__ = ["LedgerReads"]


class LedgerReads:
    """The reading half of `Ledger` (kmd.daemon.ledger.store): needs `self._engine`."""

    _engine: Any
    head_file: HeadFile | None

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self._engine, expire_on_commit=False) as session:
            yield session

    # -- rows -------------------------------------------------------------------------
    def claim(self, claim_id: int) -> ClaimRecord:
        with self._read() as s:
            row = queries.row_by_id(s, ClaimRow, claim_id)
            if row is None:
                raise LedgerError(f"no claim {claim_id}")
            return ClaimRecord.of(row)

    def claims(
        self,
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
                q = q.where(col(ClaimRow.status).in_([status] if isinstance(status, str) else list(status)))
            if source_id is not None:
                q = q.where(ClaimRow.source_id == source_id)
            if fact_id is not None:
                q = q.where(ClaimRow.fact_id == fact_id)
            if since is not None:
                q = q.where(ClaimRow.ingested_at >= iso(since))
            return q.order_by(col(ClaimRow.id).desc() if newest_first else col(ClaimRow.id))

        with self._read() as s:
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

    def count_claims(self, source_id: str, *, status: Sequence[str], since: datetime) -> int:
        with self._read() as s:
            return queries.count_claims(s, source_id, status, since)

    def fact(self, fact_id: int) -> FactRecord:
        with self._read() as s:
            row = queries.row_by_id(s, FactRow, fact_id)
            if row is None:
                raise LedgerError(f"no fact {fact_id}")
            return FactRecord.of(row, self._edit_to_supersede(s, row))

    def facts(self, *, status: str | Sequence[str] | None = None, limit: int | None = None,
              newest_first: bool = True) -> list[FactRecord]:  # fmt: skip
        with self._read() as s:
            q = select(FactRow)
            if status is not None:
                q = q.where(col(FactRow.status).in_([status] if isinstance(status, str) else list(status)))
            q = q.order_by(col(FactRow.id).desc() if newest_first else col(FactRow.id))
            if limit is not None:
                q = q.limit(limit)
            return [FactRecord.of(r, self._edit_to_supersede(s, r)) for r in s.exec(q)]

    def active_facts(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[FactRecord]]:
        """Facts still speaking for each key (see ACTIVE_FACT_STATUSES), oldest first."""
        with self._read() as s:
            return {k: [FactRecord.of(r) for r in rows] for k, rows in queries.active_facts(s, keys).items()}

    def edit(self, edit_id: int) -> EditRecord:
        with self._read() as s:
            row = queries.row_by_id(s, EditRow, edit_id)
            if row is None:
                raise LedgerError(f"no edit {edit_id}")
            return EditRecord.of(row)

    def edits(self, *, status: str | Sequence[str] | None = None, fact_id: int | None = None,
              limit: int | None = None, newest_first: bool = False) -> list[EditRecord]:  # fmt: skip
        with self._read() as s:
            q = select(EditRow)
            if status is not None:
                q = q.where(col(EditRow.status).in_([status] if isinstance(status, str) else list(status)))
            if fact_id is not None:
                q = q.where(EditRow.fact_id == fact_id)
            q = q.order_by(col(EditRow.id).desc() if newest_first else col(EditRow.id))
            if limit is not None:
                q = q.limit(limit)
            return [EditRecord.of(r) for r in s.exec(q)]

    def reverts(self, *, edit_id: int | None = None, limit: int | None = None) -> list[RevertRecord]:
        with self._read() as s:
            q = select(RevertRow)
            if edit_id is not None:
                q = q.where(RevertRow.edit_id == edit_id)
            q = q.order_by(col(RevertRow.id).desc())
            if limit is not None:
                q = q.limit(limit)
            return [RevertRecord.of(r) for r in s.exec(q)]

    def events(self, *, entity: str | None = None, entity_id: int | None = None,
               limit: int | None = None) -> list[EventRecord]:  # fmt: skip
        with self._read() as s:
            q = select(EventRow)
            if entity is not None:
                q = q.where(EventRow.entity == entity)
            if entity_id is not None:
                q = q.where(EventRow.entity_id == entity_id)
            q = q.order_by(col(EventRow.seq))
            if limit is not None:
                q = q.limit(limit)
            return [EventRecord.of(r) for r in s.exec(q)]

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per status for claims, facts and edits (for summaries and metrics)."""
        out: dict[str, dict[str, int]] = {}
        with self._read() as s:
            for name, table in (("claims", ClaimRow), ("facts", FactRow), ("edits", EditRow)):
                rows = s.exec(select(table.status, func.count()).group_by(table.status)).all()
                out[name] = {status: n for status, n in rows}
        return out

    @staticmethod
    def _edit_to_supersede(s: Session, fact: FactRow) -> int | None:
        """The committed edit of the fact this one supersedes, if it is still in place."""
        if fact.supersedes_fact_id is None or fact.status not in ("ready", "quarantined", "blocked"):
            return None
        old = s.exec(
            select(EditRow.id).where(EditRow.fact_id == fact.supersedes_fact_id).where(EditRow.status == "committed")
        ).first()
        return old

    def named_state(self, digest: str) -> StateRecord | None:
        """The newest record of the editor state with this digest, if the writer saved it."""
        with self._read() as s:
            row = s.exec(select(StateRow).where(StateRow.digest == digest).order_by(col(StateRow.id).desc())).first()
            return StateRecord.of(row) if row is not None else None

    def load_cursor(self, source_id: str) -> dict[str, Any]:
        with self._read() as s:
            return cluster.load_cursor(s, source_id)

    def published_state(self) -> PublishedState | None:
        with self._read() as s:
            return cluster.published(s)

    # -- integrity -----------------------------------------------------------------------
    def verify_chain(self, *, expect_head: str | None = None, max_problems: int = 50) -> ChainReport:
        """Check the event chain and every row against it (see `chain.verify_chain`), and
        that it still holds the head recorded in the ledger's head file (`head.py`)."""
        recorded, unreadable = None, None
        if self.head_file is not None:  # read before the chain: the file may lag it, never lead it
            try:
                recorded = self.head_file.read()
            except HeadFileError as exc:
                unreadable = str(exc)
        with self._read() as s:
            report = chain.verify_chain(s, expect_head=expect_head, max_problems=max_problems,
                                        recorded=(recorded, f"the head file {self.head_file.path}") if recorded else None)  # fmt: skip
        if unreadable is not None:
            report = replace(report, ok=False, problems=(*report.problems, unreadable))
        if self.head_file is None:
            return report
        return replace(report, head_file=str(self.head_file.path), head_file_seq=recorded.seq if recorded else None)

    def chain_head(self) -> Head:
        """The chain's head as the database has it now (seq and hash)."""
        with self._read() as s:
            return chain.current_head(s)

    def check_head(self, recorded: Head, where: str) -> str | None:
        """None if the chain still holds a head recorded earlier (by `where`), else the problem."""
        with self._read() as s:
            return chain.head_problem(s, recorded, where)
