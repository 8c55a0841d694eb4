"""Writes that commit together, with their events appended to the hash chain in order.

A `LedgerTransaction` comes from `Ledger.transaction(actor)`: its methods are the only way
rows are written (each status change checked against `lifecycle` and recorded as an event),
plus reads consistent with its writes. Nothing outside it touches its session.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, insert, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from kmd.common.values import canonical_json, iso, parse_time
from kmd.daemon.admission import via_flag
from kmd.daemon.ledger import chain, cluster, queries
from kmd.daemon.ledger.head import Head
from kmd.daemon.ledger.lifecycle import CLAIM_TRANSITIONS, EDIT_TRANSITIONS, FACT_TRANSITIONS, LedgerError
from kmd.daemon.ledger.records import (
    ClaimRecord,
    ClaimUpdate,
    EditRecord,
    FactRecord,
    RecordResult,
    RevertRecord,
    StateRecord,
)
from kmd.daemon.ledger.tables import ClaimRow, EditRow, FactRow, RevertRow, StateRow

if TYPE_CHECKING:
    from kmd.sources.claims import Claim

__all__ = ["LedgerTransaction"]


class LedgerTransaction:
    """Writes that commit together, with their events appended to the chain in order.

    Obtained from `Ledger.transaction(actor)`; not usable after the block ends.
    """

    def __init__(self, session: Session, actor: str, clock: Callable[[], datetime]):
        self._s = session
        self.actor = actor
        self._clock = clock
        self._events: list[tuple[str, str, int, str, str, dict[str, Any]]] = []
        self.now = iso(clock())
        self.head: Head | None = None  # the chain head after this transaction's events

    def _event(self, kind: str, entity: str, entity_id: int, reason: str, data: dict[str, Any], actor: str | None = None) -> None:
        self._events.append((kind, entity, entity_id, actor or self.actor, reason, data))

    def append_events(self) -> None:
        """Append this transaction's events to the chain (`Ledger.transaction` calls it once,
        when the block ends, inside the same database transaction)."""
        self.head = chain.append_events(self._s, self._events, self.now) or self.head
        self._events.clear()

    # -- reads inside the transaction (consistent with its writes) -----------------------
    def claims(self, *, status: str | Sequence[str] = "new", ingested_before: datetime | None = None) -> list[ClaimRecord]:
        statuses = [status] if isinstance(status, str) else list(status)
        table = ClaimRow.__table__
        q = sa_select(table).where(table.c.status.in_(statuses)).order_by(table.c.id)
        if ingested_before is not None:
            q = q.where(table.c.ingested_at < iso(ingested_before))
        return [ClaimRecord.of(r) for r in self._s.connection().execute(q)]

    def claims_for_keys(self, keys: Iterable[tuple[str, str]], *, status: Sequence[str] | None = None) -> list[ClaimRecord]:
        return [ClaimRecord.of(r) for r in queries.claims_for_keys(self._s, keys, status)]

    def active_facts(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[FactRecord]]:
        """Facts still speaking for each key (see ACTIVE_FACT_STATUSES), oldest first."""
        return {k: [FactRecord.of(r) for r in rows] for k, rows in queries.active_facts(self._s, keys).items()}

    def count_claims(self, source_id: str, *, status: Sequence[str], since: datetime) -> int:
        """Claims from one source in these statuses ingested since a time (rate limits)."""
        return queries.count_claims(self._s, source_id, status, since)

    # -- source cursors (not chained: operational state) ----------------------------------
    def save_cursor(self, source_id: str, cursor: Mapping[str, Any]) -> None:
        """Save a source's cursor in the same transaction as the claims read with it."""
        cluster.save_cursor(self._s, source_id, cursor, self.now)

    # -- the published state (not chained) ------------------------------------------------
    def publish_state(self, version: str, edit_ids: Sequence[str], *, term: int, holder: str) -> None:
        """Record the committed editor state serving replicas should load."""
        cluster.publish(self._s, version, edit_ids, term=term, holder=holder, now=self.now)

    # -- single rows, as records (consistent with this transaction's writes) ----------------
    def fact(self, fact_id: int) -> FactRecord:
        row = queries.row_by_id(self._s, FactRow, fact_id)
        if row is None:
            raise LedgerError(f"no fact {fact_id}")
        return FactRecord.of(row)

    def edit(self, edit_id: int) -> EditRecord:
        row = queries.row_by_id(self._s, EditRow, edit_id)
        if row is None:
            raise LedgerError(f"no edit {edit_id}")
        return EditRecord.of(row)

    def edit_reverted_for(self, fact_id: int) -> int | None:
        """The committed edit that was reverted because `fact_id` supersedes it, if any."""
        return self._s.exec(select(RevertRow.edit_id).where(RevertRow.superseded_by_fact_id == fact_id)).first()

    # -- claims --------------------------------------------------------------------------
    def record_claims(self, claims: Iterable[Claim], *, policy_version: str, channel: str) -> RecordResult:
        """Store new claims (status `new`); claims whose content hash is known are dropped.

        `channel` is the door they came through (`feed`, `jsonl`, `api`: see
        `kmd.daemon.admission`); it is stamped on each claim as the flag `via:<channel>`,
        and the verifier admits a claim only from a source of that kind."""
        via = via_flag(channel)
        batch: dict[str, Claim] = {}
        for claim in claims:
            batch.setdefault(claim.content_hash, claim)
        given = len(batch)
        hashes = list(batch)
        for i in range(0, len(hashes), 500):
            chunk = hashes[i : i + 500]
            for known in self._s.exec(select(ClaimRow.content_hash).where(col(ClaimRow.content_hash).in_(chunk))):
                batch.pop(known, None)
        rows = [
            {
                "content_hash": c.content_hash, "source_id": c.source_id, "subject": c.subject,
                "relation": c.relation, "object": c.object, "subject_key": c.subject_key, "url": c.url,
                "ref": c.ref, "observed_at": iso(c.observed_at), "ingested_at": self.now,
                "flags": canonical_json([f for f in c.flags if not f.startswith("via:")] + [via]),
                "policy_version": policy_version, "status": "new",
                "status_reason": "", "fact_id": None,
            }
            for c in batch.values()
        ]  # fmt: skip
        if rows:
            # Core insert with RETURNING in parameter order: ids without building ORM objects.
            ids = self._s.execute(
                insert(ClaimRow).returning(ClaimRow.id, sort_by_parameter_order=True), rows
            ).scalars().all()
            for row, rid in zip(rows, ids, strict=True):
                row["id"] = rid
                self._event("claim.recorded", "claim", rid, f"from {row['source_id']}",
                            {"record": chain.record_hash("claim", row), "status": "new", "status_reason": "", "fact_id": None})  # fmt: skip
        return RecordResult(tuple(r["id"] for r in rows), given - len(rows))

    def update_claims(self, updates: Sequence[ClaimUpdate]) -> None:
        """Move claims along their lifecycle (admitted, accepted into a fact, rejected)."""
        by_id = {u.claim_id: u for u in updates}
        ids = sorted(by_id)
        current: dict[int, str] = {}
        for i in range(0, len(ids), 500):
            q = select(ClaimRow.id, ClaimRow.status).where(col(ClaimRow.id).in_(ids[i : i + 500]))
            current.update({rid: st for rid, st in self._s.exec(q)})
        unknown = [i for i in ids if i not in current]
        if unknown:
            raise LedgerError(f"unknown claim ids: {unknown[:10]}")
        params = []
        for rid in ids:
            u = by_id[rid]
            if u.status not in CLAIM_TRANSITIONS[current[rid]]:
                raise LedgerError(f"claim {rid}: cannot go from {current[rid]} to {u.status}")
            params.append({"b_id": rid, "status": u.status, "status_reason": u.reason, "fact_id": u.fact_id})
            self._event(f"claim.{u.status}", "claim", rid, u.reason,
                        {"status": u.status, "status_reason": u.reason, "fact_id": u.fact_id})  # fmt: skip
        if params:
            # One executemany instead of an ORM object per claim (verification touches thousands).
            stmt = (
                update(ClaimRow.__table__)
                .where(ClaimRow.__table__.c.id == bindparam("b_id"))
                .values(status=bindparam("status"), status_reason=bindparam("status_reason"),
                        fact_id=bindparam("fact_id"))
            )  # fmt: skip
            self._s.connection().execute(stmt, params)
            self._s.expire_all()  # claim objects loaded earlier in this session are now stale

    # -- facts ---------------------------------------------------------------------------
    def add_fact(
        self,
        *,
        subject: str,
        relation: str,
        object: str,
        subject_key: str,
        observed_at: datetime,
        claim_ids: Sequence[int],
        sensitive: bool,
        policy_version: str,
        supersedes_fact_id: int | None = None,
        reason: str = "",
    ) -> FactRecord:
        """A newly verified fact: `quarantined` when sensitive, else `ready` to edit."""
        status = "quarantined" if sensitive else "ready"
        row = {
            "subject": subject, "relation": relation, "object": object, "subject_key": subject_key,
            "observed_at": iso(observed_at), "verified_at": self.now, "sensitive": sensitive,
            "policy_version": policy_version, "claim_ids": canonical_json(sorted(claim_ids)),
            "supersedes_fact_id": supersedes_fact_id, "status": status, "status_reason": reason,
        }  # fmt: skip
        # A core insert: verification may create thousands of facts in one transaction.
        row["id"] = self._s.connection().execute(insert(FactRow.__table__).returning(FactRow.__table__.c.id), row).scalar_one()
        self._event("fact.verified", "fact", row["id"], reason,
                    {"record": chain.record_hash("fact", row), "status": status, "status_reason": reason})  # fmt: skip
        return FactRecord(
            row["id"], subject, relation, object, subject_key, parse_time(row["observed_at"]), parse_time(self.now),
            sensitive, policy_version, tuple(sorted(claim_ids)), supersedes_fact_id, status, reason,
        )  # fmt: skip

    def set_fact_status(self, fact_id: int, status: str, *, reason: str, kind: str | None = None,
                        actor: str | None = None) -> FactRecord:  # fmt: skip
        row = queries.row_by_id(self._s, FactRow, fact_id)
        if row is None:
            raise LedgerError(f"no fact {fact_id}")
        if status not in FACT_TRANSITIONS[row.status]:
            raise LedgerError(f"fact {fact_id} is {row.status}; it cannot become {status}")
        previous = row.status
        row.status, row.status_reason = status, reason
        self._s.add(row)
        self._event(kind or f"fact.{status}", "fact", fact_id, reason,
                    {"status": status, "status_reason": reason, "from": previous}, actor)  # fmt: skip
        return FactRecord.of(row)

    # -- edits ---------------------------------------------------------------------------
    def add_edit(
        self,
        fact_id: int,
        *,
        request: Mapping[str, Any],
        backend: str,
        backend_config: Mapping[str, Any],
        policy_version: str,
        supersedes_edit_id: int | None,
        reason: str,
    ) -> EditRecord:
        fact = queries.row_by_id(self._s, FactRow, fact_id)
        if fact is None:
            raise LedgerError(f"no fact {fact_id}")
        supporting = set(json.loads(fact.claim_ids))
        claims = self._s.exec(
            select(ClaimRow).where((col(ClaimRow.id).in_(supporting)) | (ClaimRow.fact_id == fact_id))
        ).all()
        row = EditRow(
            fact_id=fact_id, created_at=self.now, backend=backend, backend_config=canonical_json(dict(backend_config)),
            request=canonical_json(dict(request)), policy_version=policy_version,
            sources=canonical_json(sorted({c.source_id for c in claims})),
            content_hashes=canonical_json(sorted(c.content_hash for c in claims)),
            supersedes_edit_id=supersedes_edit_id, status="applied", status_reason=reason,
        )  # fmt: skip
        self._s.add(row)
        self._s.flush()
        self._event("edit.applied", "edit", row.id, reason,
                    {"record": chain.record_hash("edit", row), "status": "applied", "status_reason": reason,
                     "probes": None, "fact_id": fact_id})  # fmt: skip
        return EditRecord.of(row)

    def set_edit_status(self, edit_id: int, status: str, *, reason: str,
                        probes: Mapping[str, Any] | None = None) -> EditRecord:  # fmt: skip
        row = queries.row_by_id(self._s, EditRow, edit_id)
        if row is None:
            raise LedgerError(f"no edit {edit_id}")
        if status not in EDIT_TRANSITIONS[row.status]:
            raise LedgerError(f"edit {edit_id} is {row.status}; it cannot become {status}")
        probes_json = canonical_json(dict(probes)) if probes is not None else row.probes
        row.status, row.status_reason, row.probes = status, reason, probes_json
        self._s.add(row)
        self._event(f"edit.{status}", "edit", edit_id, reason,
                    {"status": status, "status_reason": reason, "probes": json.loads(probes_json)})  # fmt: skip
        return EditRecord.of(row)

    def add_revert(self, edit_id: int, *, reason: str, probes_before: Mapping[str, Any] | None,
                   probes_after: Mapping[str, Any] | None, superseded_by_fact_id: int | None = None) -> RevertRecord:  # fmt: skip
        row = RevertRow(
            edit_id=edit_id, reverted_at=self.now, actor=self.actor, reason=reason,
            probes_before=canonical_json(dict(probes_before) if probes_before is not None else None),
            probes_after=canonical_json(dict(probes_after) if probes_after is not None else None),
            superseded_by_fact_id=superseded_by_fact_id,
        )  # fmt: skip
        self._s.add(row)
        self._s.flush()
        self._event("revert.recorded", "revert", row.id, reason, {"record": chain.record_hash("revert", row), "edit_id": edit_id})
        return RevertRecord.of(row)

    # -- saved editor states ---------------------------------------------------------------
    def add_state(self, digest: str, edit_ids: Sequence[str], *, reason: str) -> StateRecord:
        """Name an editor state (by its digest) that is about to be written."""
        row = StateRow(digest=digest, edit_ids=canonical_json([str(i) for i in edit_ids]), saved_at=self.now)
        self._s.add(row)
        self._s.flush()
        self._event("state.saved", "state", row.id, reason, {"record": chain.record_hash("state", row), "digest": digest})
        return StateRecord.of(row)
