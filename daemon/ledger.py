"""The ledger: claims, verified facts, edits, reverts and a hash-chained event log.

Rows are append-only facts. The only columns ever updated are the *status caches* (a row's
`status`, `status_reason`, and for claims `fact_id`, for edits `probes`): each update is
written together with an event saying who changed it and why, in the same transaction, and
`verify_chain` replays the events to check every cache. The event log is a hash chain: each
event's hash covers the previous event's hash and the event's canonical JSON payload, so
editing, deleting or reordering events breaks it; every row's immutable fields are hashed
into its creation event, so editing a row breaks it too; the head (last seq and hash) is
kept in its own row, so deleting the newest events is caught. For tamper evidence against
someone who can rewrite the whole database, anchor the head hash elsewhere
(`kmd verify-chain` prints it; `--expect-head` checks it).

Lifecycle (statuses):
    claim   new -> pending (admitted, waiting for quorum) -> accepted (supports a fact)
            new|pending -> rejected (reason says why)
    fact    quarantined --approve--> ready --edit applied--> applied --probes ok--> committed
            ready -> skipped (model already knows) | blocked (do not retry blindly)
            applied|committed --revert--> blocked (or ready when a retry is asked for)
            committed --superseded by a newer fact--> superseded
            quarantined|ready|blocked -> rejected (by a person) | superseded (by a newer fact)
    edit    applied -> committed -> reverted;  applied -> reverted
            committed -> reverting (a revert requested, written ahead) -> reverted

Writes that belong together go through `Ledger.transaction()`; the other write methods each
run one transaction. Everything returned is an immutable record, never an ORM object.

Source cursors (ETag, sequence numbers) are operational state, not ledger facts: they live
in their own table and are not chained. So do the two rows of the single-writer scheme
(`kmd.daemon.leadership`): the writer *term*, bumped by each process that becomes the
writer (every write transaction of a process holding a term first checks it is still the
current one, so a deposed writer cannot write), and the *published state* version that
serving replicas load (`kmd.daemon.replication`).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from loguru import logger
from sqlalchemy import Index, bindparam, func, insert, text, update
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from kmd.daemon.admission import via_flag
from kmd.daemon.db import default_db_url, make_engine, writer
from kmd.sources.claims import Claim, canonical_json, iso, parse_time, utcnow

__all__ = [
    "ChainReport",
    "ClaimRecord",
    "ClaimUpdate",
    "EditRecord",
    "EventRecord",
    "FactRecord",
    "Ledger",
    "LedgerError",
    "LedgerTransaction",
    "NotWriterError",
    "PublishedState",
    "RecordResult",
    "RevertRecord",
]

GENESIS_HASH = "0" * 64
_SCHEMA_LOCK_KEY = 0x6B6D642D736368  # "kmd-sch": serialises table creation on PostgreSQL

CLAIM_TRANSITIONS = {
    "new": {"pending", "accepted", "rejected"},
    "pending": {"accepted", "rejected"},
    "accepted": set(),
    "rejected": set(),
}
FACT_TRANSITIONS = {
    "quarantined": {"ready", "rejected", "superseded"},
    "ready": {"applied", "rejected", "superseded", "skipped", "blocked"},
    "applied": {"committed", "blocked", "ready"},
    "committed": {"superseded", "blocked", "ready"},
    "blocked": {"ready", "rejected", "superseded"},
    "rejected": set(),
    "superseded": set(),
    "skipped": set(),
}
# `reverting`: a revert was requested (by a person, the API or the regression check) and
# is recorded before the model changes; the daemon finishes it, after a crash too.
EDIT_TRANSITIONS = {"applied": {"committed", "reverted"}, "committed": {"reverted", "reverting"},
                    "reverting": {"reverted"}, "reverted": set()}  # fmt: skip
# Facts that still speak for their (subject, relation): new claims are compared with them.
ACTIVE_FACT_STATUSES = ("quarantined", "ready", "applied", "committed", "blocked")


class LedgerError(Exception):
    """An operation the ledger refuses (unknown id, transition not allowed)."""


class NotWriterError(LedgerError):
    """This process's writer term is over: another process became the writer."""


# -- tables ---------------------------------------------------------------------------------


class ClaimRow(SQLModel, table=True):
    __tablename__ = "kmd_claim"
    __table_args__ = (Index("ix_kmd_claim_key", "subject_key", "relation", "status"),)

    id: int | None = Field(default=None, primary_key=True)
    content_hash: str = Field(unique=True)
    source_id: str = Field(index=True)
    subject: str
    relation: str
    object: str
    subject_key: str
    url: str
    ref: str
    observed_at: str
    ingested_at: str
    flags: str  # canonical JSON list
    policy_version: str
    status: str = Field(index=True)  # cache of the latest status event
    status_reason: str = ""
    fact_id: int | None = Field(default=None, foreign_key="kmd_fact.id")


class FactRow(SQLModel, table=True):
    __tablename__ = "kmd_fact"
    __table_args__ = (Index("ix_kmd_fact_key", "subject_key", "relation", "status"),)

    id: int | None = Field(default=None, primary_key=True)
    subject: str
    relation: str
    object: str
    subject_key: str
    observed_at: str  # newest observation among the supporting claims
    verified_at: str
    sensitive: bool
    policy_version: str
    claim_ids: str  # canonical JSON list: the claims that made the quorum
    supersedes_fact_id: int | None = Field(default=None, foreign_key="kmd_fact.id")
    status: str = Field(index=True)
    status_reason: str = ""


class EditRow(SQLModel, table=True):
    __tablename__ = "kmd_edit"

    id: int | None = Field(default=None, primary_key=True)
    fact_id: int = Field(foreign_key="kmd_fact.id", index=True)
    created_at: str
    backend: str
    backend_config: str  # canonical JSON
    request: str  # canonical JSON: prompt, target, subject, rephrases
    policy_version: str
    sources: str  # canonical JSON list of source ids
    content_hashes: str  # canonical JSON list of the supporting claims' hashes
    supersedes_edit_id: int | None = Field(default=None, foreign_key="kmd_edit.id")
    status: str = Field(index=True)
    status_reason: str = ""
    probes: str = "null"  # canonical JSON probe figures at commit (cache of the commit event)


class RevertRow(SQLModel, table=True):
    __tablename__ = "kmd_revert"

    id: int | None = Field(default=None, primary_key=True)
    edit_id: int = Field(foreign_key="kmd_edit.id", index=True)
    reverted_at: str
    actor: str
    reason: str
    probes_before: str  # canonical JSON
    probes_after: str  # canonical JSON
    superseded_by_fact_id: int | None = Field(default=None, foreign_key="kmd_fact.id")


class EventRow(SQLModel, table=True):
    __tablename__ = "kmd_event"
    __table_args__ = (Index("ix_kmd_event_entity", "entity", "entity_id"),)

    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    ts: str
    kind: str
    entity: str
    entity_id: int
    actor: str
    reason: str
    payload: str  # canonical JSON of the whole envelope; what the hash covers
    prev_hash: str
    hash: str


class ChainHeadRow(SQLModel, table=True):
    __tablename__ = "kmd_chain_head"

    id: int = Field(default=1, primary_key=True)
    seq: int
    hash: str


class CursorRow(SQLModel, table=True):
    __tablename__ = "kmd_source_cursor"

    source_id: str = Field(primary_key=True)
    state: str  # JSON
    updated_at: str


class WriterTermRow(SQLModel, table=True):
    """The current writer term (one row): bumped by each process that becomes the writer."""

    __tablename__ = "kmd_writer_term"

    id: int = Field(default=1, primary_key=True)
    term: int
    holder: str
    since: str


class PublishedStateRow(SQLModel, table=True):
    """The committed editor state serving replicas load (one row; see kmd.daemon.replication)."""

    __tablename__ = "kmd_published_state"

    id: int = Field(default=1, primary_key=True)
    version: str  # sha256 of the state's manifest.json: also its directory name
    edit_ids: str  # canonical JSON list: the edits the state holds, oldest first
    term: int  # the writer term that published it
    holder: str
    published_at: str


_TABLES = [t.__table__ for t in (FactRow, ClaimRow, EditRow, RevertRow, EventRow, ChainHeadRow, CursorRow,
                                 WriterTermRow, PublishedStateRow)]  # fmt: skip

# The immutable columns of each row kind, hashed into its creation event.
_RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "claim": ("id", "content_hash", "source_id", "subject", "relation", "object", "subject_key", "url", "ref",
              "observed_at", "ingested_at", "flags", "policy_version"),
    "fact": ("id", "subject", "relation", "object", "subject_key", "observed_at", "verified_at", "sensitive",
             "policy_version", "claim_ids", "supersedes_fact_id"),
    "edit": ("id", "fact_id", "created_at", "backend", "backend_config", "request", "policy_version", "sources",
             "content_hashes", "supersedes_edit_id"),
    "revert": ("id", "edit_id", "reverted_at", "actor", "reason", "probes_before", "probes_after",
               "superseded_by_fact_id"),
}  # fmt: skip
# The status-cache columns of each row kind and the event data keys they mirror.
_CACHE_FIELDS: dict[str, tuple[str, ...]] = {
    "claim": ("status", "status_reason", "fact_id"),
    "fact": ("status", "status_reason"),
    "edit": ("status", "status_reason", "probes"),
}
_ROW_TYPES = {"claim": ClaimRow, "fact": FactRow, "edit": EditRow, "revert": RevertRow}


def _record_hash(kind: str, row: SQLModel | Mapping[str, Any]) -> str:
    get = row.get if isinstance(row, Mapping) else (lambda name: getattr(row, name))
    values = {name: get(name) for name in _RECORD_FIELDS[kind]}
    return hashlib.sha256(canonical_json(values).encode()).hexdigest()


def _chain_hash(prev_hash: str, payload: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{payload}".encode()).hexdigest()


def _claims_for_keys(s: Session, keys: Iterable[tuple[str, str]], status: Sequence[str] | None) -> list[Any]:
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


def _active_facts(s: Session, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[FactRow]]:
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


def _count_claims(s: Session, source_id: str, status: Sequence[str], since: datetime) -> int:
    q = (
        select(func.count())
        .select_from(ClaimRow)
        .where(ClaimRow.source_id == source_id)
        .where(col(ClaimRow.status).in_(list(status)))
        .where(ClaimRow.ingested_at >= iso(since))
    )
    return int(s.exec(q).one())


# -- records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimRecord:
    id: int
    content_hash: str
    source_id: str
    subject: str
    relation: str
    object: str
    subject_key: str
    url: str
    ref: str
    observed_at: datetime
    ingested_at: datetime
    flags: tuple[str, ...]
    policy_version: str
    status: str
    status_reason: str
    fact_id: int | None

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject_key, self.relation)

    @classmethod
    def of(cls, row: Any) -> ClaimRecord:  # a ClaimRow or a result row with its columns
        return cls(
            row.id, row.content_hash, row.source_id, row.subject, row.relation, row.object, row.subject_key,
            row.url, row.ref, parse_time(row.observed_at), parse_time(row.ingested_at), tuple(json.loads(row.flags)),
            row.policy_version, row.status, row.status_reason, row.fact_id,
        )  # fmt: skip


@dataclass(frozen=True)
class FactRecord:
    id: int
    subject: str
    relation: str
    object: str
    subject_key: str
    observed_at: datetime
    verified_at: datetime
    sensitive: bool
    policy_version: str
    claim_ids: tuple[int, ...]
    supersedes_fact_id: int | None
    status: str
    status_reason: str
    # The committed edit this fact replaces (the maintenance loop reverts it, applies this
    # fact, and records both at commit); filled in by the reading methods, None when there
    # is nothing to supersede.
    supersedes_edit_id: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject_key, self.relation)

    @classmethod
    def of(cls, row: FactRow, supersedes_edit_id: int | None = None) -> FactRecord:
        return cls(
            row.id, row.subject, row.relation, row.object, row.subject_key, parse_time(row.observed_at),
            parse_time(row.verified_at), bool(row.sensitive), row.policy_version, tuple(json.loads(row.claim_ids)),
            row.supersedes_fact_id, row.status, row.status_reason, supersedes_edit_id,
        )  # fmt: skip


@dataclass(frozen=True)
class EditRecord:
    id: int
    fact_id: int
    created_at: datetime
    backend: str
    backend_config: dict[str, Any]
    request: dict[str, Any]
    policy_version: str
    sources: tuple[str, ...]
    content_hashes: tuple[str, ...]
    supersedes_edit_id: int | None
    status: str
    status_reason: str
    probes: dict[str, Any] | None

    @classmethod
    def of(cls, row: EditRow) -> EditRecord:
        return cls(
            row.id, row.fact_id, parse_time(row.created_at), row.backend, json.loads(row.backend_config),
            json.loads(row.request), row.policy_version, tuple(json.loads(row.sources)),
            tuple(json.loads(row.content_hashes)), row.supersedes_edit_id, row.status, row.status_reason,
            json.loads(row.probes),
        )  # fmt: skip


@dataclass(frozen=True)
class RevertRecord:
    id: int
    edit_id: int
    reverted_at: datetime
    actor: str
    reason: str
    probes_before: dict[str, Any] | None
    probes_after: dict[str, Any] | None
    superseded_by_fact_id: int | None

    @classmethod
    def of(cls, row: RevertRow) -> RevertRecord:
        return cls(
            row.id, row.edit_id, parse_time(row.reverted_at), row.actor, row.reason, json.loads(row.probes_before),
            json.loads(row.probes_after), row.superseded_by_fact_id,
        )  # fmt: skip


@dataclass(frozen=True)
class EventRecord:
    seq: int
    ts: datetime
    kind: str
    entity: str
    entity_id: int
    actor: str
    reason: str
    data: dict[str, Any]
    hash: str

    @classmethod
    def of(cls, row: EventRow) -> EventRecord:
        data = json.loads(row.payload).get("data", {})
        return cls(row.seq, parse_time(row.ts), row.kind, row.entity, row.entity_id, row.actor, row.reason, data, row.hash)


@dataclass(frozen=True)
class PublishedState:
    version: str
    edit_ids: tuple[str, ...]
    term: int
    holder: str
    published_at: datetime


@dataclass(frozen=True)
class ClaimUpdate:
    claim_id: int
    status: str
    reason: str = ""
    fact_id: int | None = None


@dataclass(frozen=True)
class RecordResult:
    new_ids: tuple[int, ...]
    duplicates: int


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    events: int
    head_seq: int
    head_hash: str
    problems: tuple[str, ...] = field(default_factory=tuple)


# -- transactions ---------------------------------------------------------------------------


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

    def _event(self, kind: str, entity: str, entity_id: int, reason: str, data: dict[str, Any], actor: str | None = None) -> None:
        self._events.append((kind, entity, entity_id, actor or self.actor, reason, data))

    def _flush_events(self) -> None:
        if not self._events:
            return
        # Lock the head: serialises chain appends on PostgreSQL (SQLite already holds the
        # write lock from BEGIN IMMEDIATE).
        head = self._s.exec(select(ChainHeadRow).where(ChainHeadRow.id == 1).with_for_update()).first()
        if head is None:
            raise LedgerError("the chain head row is missing: the ledger was tampered with (run verify-chain)")
        seq, prev = head.seq, head.hash
        rows = []
        for kind, entity, entity_id, actor, reason, data in self._events:
            seq += 1
            envelope = {
                "seq": seq, "ts": self.now, "kind": kind, "entity": entity, "entity_id": entity_id,
                "actor": actor, "reason": reason, "data": data,
            }  # fmt: skip
            payload = canonical_json(envelope)
            digest = _chain_hash(prev, payload)
            rows.append({"seq": seq, "ts": self.now, "kind": kind, "entity": entity, "entity_id": entity_id,
                         "actor": actor, "reason": reason, "payload": payload, "prev_hash": prev, "hash": digest})  # fmt: skip
            prev = digest
        # Core inserts: building ORM objects costs more than hashing for big batches.
        self._s.execute(insert(EventRow), rows)
        head.seq, head.hash = seq, prev
        self._s.add(head)
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
        return [ClaimRecord.of(r) for r in _claims_for_keys(self._s, keys, status)]

    def active_facts(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[FactRecord]]:
        """Facts still speaking for each key (see ACTIVE_FACT_STATUSES), oldest first."""
        return {k: [FactRecord.of(r) for r in rows] for k, rows in _active_facts(self._s, keys).items()}

    def count_claims(self, source_id: str, *, status: Sequence[str], since: datetime) -> int:
        """Claims from one source in these statuses ingested since a time (rate limits)."""
        return _count_claims(self._s, source_id, status, since)

    # -- source cursors (not chained: operational state) ----------------------------------
    def save_cursor(self, source_id: str, cursor: Mapping[str, Any]) -> None:
        """Save a source's cursor in the same transaction as the claims read with it."""
        row = self._s.get(CursorRow, source_id) or CursorRow(source_id=source_id, state="{}", updated_at="")
        row.state, row.updated_at = json.dumps(dict(cursor), sort_keys=True, default=str), self.now
        self._s.add(row)

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
                            {"record": _record_hash("claim", row), "status": "new", "status_reason": "", "fact_id": None})  # fmt: skip
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
                    {"record": _record_hash("fact", row), "status": status, "status_reason": reason})  # fmt: skip
        return FactRecord(
            row["id"], subject, relation, object, subject_key, parse_time(row["observed_at"]), parse_time(self.now),
            sensitive, policy_version, tuple(sorted(claim_ids)), supersedes_fact_id, status, reason,
        )  # fmt: skip

    def set_fact_status(self, fact_id: int, status: str, *, reason: str, kind: str | None = None,
                        actor: str | None = None) -> FactRecord:  # fmt: skip
        row = self._s.get(FactRow, fact_id)
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
        fact = self._s.get(FactRow, fact_id)
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
                    {"record": _record_hash("edit", row), "status": "applied", "status_reason": reason,
                     "probes": None, "fact_id": fact_id})  # fmt: skip
        return EditRecord.of(row)

    def set_edit_status(self, edit_id: int, status: str, *, reason: str,
                        probes: Mapping[str, Any] | None = None) -> EditRecord:  # fmt: skip
        row = self._s.get(EditRow, edit_id)
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
        self._event("revert.recorded", "revert", row.id, reason, {"record": _record_hash("revert", row), "edit_id": edit_id})
        return RevertRecord.of(row)


# -- the ledger -----------------------------------------------------------------------------


class Ledger:
    """The daemon's durable record. Create with a database URL (SQLite file by default).

    Methods the maintenance loop uses, in the order it uses them:
      `ready_facts()`            verified facts waiting for an edit (approved if sensitive)
      `skip_fact(id, ...)`       the model already answers correctly; nothing to edit
      `record_edit_applied(...)` an edit was applied (not yet persisted)
      `commit_edit(id, probes)`  the probes passed and the edit state was persisted; for a
                                 fact whose `supersedes_edit_id` is set, pass it: the old
                                 edit is recorded as reverted for it in the same transaction
      `revert_edit(id, ...)`     the probes failed; writes the revert log and blocks the fact
      `block_fact(id, ...)`      do not retry this fact blindly
      `committed_edits()`        on restart: what the saved editor state must contain
      `uncommitted_edits()`      on restart: edits applied but never committed or reverted
    People (the CLI): `approve`, `reject`, `facts`, `edits`, `claims`, `reverts`, `events`,
    `verify_chain`. The verifier: `transaction()`, `claims()`, `active_facts()`.
    """

    def __init__(self, url: str | None = None, *, clock: Callable[[], datetime] = utcnow, echo: bool = False):
        self.url = url or default_db_url()
        self._engine = make_engine(self.url, echo=echo)
        self._writer = writer(self._engine)
        self._clock = clock
        self._term: int | None = None  # the writer term this process holds (see begin_writer_term)
        self._create_tables()
        self._ensure_row(ChainHeadRow(id=1, seq=0, hash=GENESIS_HASH))
        self._ensure_row(WriterTermRow(id=1, term=0, holder="", since=""))

    def _create_tables(self) -> None:
        # Several processes may start at once on one PostgreSQL database: CREATE TABLE is
        # not safe to race, so serialise it on a transaction-level advisory lock.
        with self._writer.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
            SQLModel.metadata.create_all(conn, tables=_TABLES)

    def _ensure_row(self, row: SQLModel) -> None:
        """Create a singleton row up front, so concurrent first writers lock one row."""
        try:
            with Session(self._writer) as s, s.begin():
                if s.get(type(row), 1) is None:
                    s.add(row)
        except IntegrityError:
            pass  # another process created it first

    @classmethod
    def in_memory(cls, *, clock: Callable[[], datetime] = utcnow) -> Ledger:
        return cls("sqlite://", clock=clock)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sessions ------------------------------------------------------------------------
    @contextmanager
    def transaction(self, actor: str) -> Iterator[LedgerTransaction]:
        """One atomic unit of writes; its events join the chain when the block ends."""
        with Session(self._writer, expire_on_commit=False) as session, session.begin():
            if self._term is not None:
                self._check_term(session)
            tx = LedgerTransaction(session, actor, self._clock)
            yield tx
            tx._flush_events()

    # -- the single writer ---------------------------------------------------------------
    def _check_term(self, s: Session) -> None:
        # FOR SHARE: a new writer's term bump waits for this transaction, and every later
        # transaction of ours sees the bump. (SQLite has one writer at a time anyway.)
        current = s.exec(select(WriterTermRow.term).where(WriterTermRow.id == 1).with_for_update(read=True)).one()
        if current != self._term:
            raise NotWriterError(f"writer term {self._term} is over (term {current} is current): another process is the writer")

    def begin_writer_term(self, holder: str) -> int:
        """Become the writer: bump the term; from now on every write checks it is still ours."""
        with Session(self._writer, expire_on_commit=False) as s, s.begin():
            row = s.exec(select(WriterTermRow).where(WriterTermRow.id == 1).with_for_update()).one()
            row.term, row.holder, row.since = row.term + 1, holder, iso(self._clock())
            s.add(row)
            term = row.term
        self._term = term
        logger.info("writer term {} begins ({})", term, holder)
        return term

    @property
    def writer_term(self) -> int | None:
        return self._term

    def publish_state(self, version: str, edit_ids: Sequence[str], *, holder: str) -> None:
        """Record the committed editor state replicas should serve (needs a writer term)."""
        if self._term is None:
            raise NotWriterError("only the writer publishes states (begin_writer_term first)")
        with self.transaction("writer") as tx:
            row = tx._s.get(PublishedStateRow, 1) or PublishedStateRow(id=1, version="", edit_ids="[]", term=0,
                                                                         holder="", published_at="")  # fmt: skip
            row.version, row.edit_ids, row.term = version, canonical_json(list(edit_ids)), self._term
            row.holder, row.published_at = holder, tx.now
            tx._s.add(row)

    def published_state(self) -> PublishedState | None:
        with self._read() as s:
            row = s.get(PublishedStateRow, 1)
            if row is None:
                return None
            return PublishedState(row.version, tuple(json.loads(row.edit_ids)), row.term, row.holder,
                                  parse_time(row.published_at))  # fmt: skip

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self._engine, expire_on_commit=False) as session:
            yield session

    # -- intake --------------------------------------------------------------------------
    def record_claims(self, claims: Iterable[Claim], *, policy_version: str, channel: str,
                      actor: str = "intake") -> RecordResult:  # fmt: skip
        with self.transaction(actor) as tx:
            return tx.record_claims(claims, policy_version=policy_version, channel=channel)

    def load_cursor(self, source_id: str) -> dict[str, Any]:
        with self._read() as s:
            row = s.get(CursorRow, source_id)
            return json.loads(row.state) if row else {}

    def save_cursor(self, source_id: str, cursor: Mapping[str, Any]) -> None:
        with self.transaction("intake") as tx:
            tx.save_cursor(source_id, cursor)

    # -- reading -------------------------------------------------------------------------
    def claim(self, claim_id: int) -> ClaimRecord:
        with self._read() as s:
            row = s.get(ClaimRow, claim_id)
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
            return _count_claims(s, source_id, status, since)

    def fact(self, fact_id: int) -> FactRecord:
        with self._read() as s:
            row = s.get(FactRow, fact_id)
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
            return {k: [FactRecord.of(r) for r in rows] for k, rows in _active_facts(s, keys).items()}

    def edit(self, edit_id: int) -> EditRecord:
        with self._read() as s:
            row = s.get(EditRow, edit_id)
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

    # -- the maintenance loop ------------------------------------------------------------
    def ready_facts(self, limit: int | None = None) -> list[FactRecord]:
        """Verified facts waiting for an edit, oldest first.

        A fact with `supersedes_edit_id` set replaces that committed edit: revert it in the
        backend, apply this one, and commit with `supersedes_edit_id` (or put the old edit
        back if the new one fails).
        """
        return self.facts(status="ready", limit=limit, newest_first=False)

    def record_edit_applied(
        self,
        fact_id: int,
        *,
        request: Mapping[str, Any],
        backend: str,
        backend_config: Mapping[str, Any],
        policy_version: str,
        actor: str = "daemon",
        reason: str = "edit applied",
        supersedes_edit_id: int | None = None,
    ) -> EditRecord:
        """An edit for a ready fact was applied to the model (not yet persisted).

        Records the provenance (supporting claims' sources and hashes, policy version,
        backend and its config, the edit request) and moves the fact to `applied`. When the
        fact supersedes an older one, `supersedes_edit_id` defaults to the edit that
        `supersede_edit` reverted for it.
        """
        with self.transaction(actor) as tx:
            fact = tx._s.get(FactRow, fact_id)
            if fact is None:
                raise LedgerError(f"no fact {fact_id}")
            if fact.status != "ready":
                raise LedgerError(f"fact {fact_id} is {fact.status}, not ready")
            if supersedes_edit_id is None and fact.supersedes_fact_id is not None:
                supersedes_edit_id = tx._s.exec(
                    select(RevertRow.edit_id).where(RevertRow.superseded_by_fact_id == fact_id)
                ).first()
            edit = tx.add_edit(fact_id, request=request, backend=backend, backend_config=backend_config,
                               policy_version=policy_version, supersedes_edit_id=supersedes_edit_id, reason=reason)  # fmt: skip
            tx.set_fact_status(fact_id, "applied", reason=f"edit {edit.id} applied")
            logger.bind(edit_id=edit.id).info(
                "edit {}: applied for fact {} ({} {} -> {})", edit.id, fact_id, fact.subject, fact.relation, fact.object
            )
            return edit

    def commit_edit(self, edit_id: int, *, probes: Mapping[str, Any], actor: str = "daemon",
                    reason: str = "probes passed; state persisted", supersedes_edit_id: int | None = None,
                    superseded_probes: Mapping[str, Any] | None = None) -> EditRecord:  # fmt: skip
        """The edit passed its probes and the editor state was persisted.

        With `supersedes_edit_id`, in the same transaction: that older committed edit, which
        the persisted state no longer holds, is recorded as reverted for this edit's fact
        (its fact becomes `superseded`). One transaction, so a crash cannot leave the ledger
        with both facts committed or with neither."""
        with self.transaction(actor) as tx:
            edit = tx.set_edit_status(edit_id, "committed", reason=reason, probes=probes)
            tx.set_fact_status(edit.fact_id, "committed", reason=f"edit {edit_id} committed")
            if supersedes_edit_id is not None:
                self._mark_superseded(tx, supersedes_edit_id, edit.fact_id, None, superseded_probes)
        logger.bind(edit_id=edit_id).info("edit {}: committed", edit_id)
        return edit

    def revert_edit(
        self,
        edit_id: int,
        *,
        reason: str,
        probes_before: Mapping[str, Any] | None,
        probes_after: Mapping[str, Any] | None,
        actor: str = "daemon",
        retry: bool = False,
    ) -> RevertRecord:
        """The edit was removed from the model; write the revert log.

        The fact becomes `blocked` (not retried blindly) unless `retry` is true, in which
        case it goes back to `ready`.
        """
        with self.transaction(actor) as tx:
            edit = tx.set_edit_status(edit_id, "reverted", reason=reason)
            revert = tx.add_revert(edit_id, reason=reason, probes_before=probes_before, probes_after=probes_after)
            tx.set_fact_status(edit.fact_id, "ready" if retry else "blocked",
                               reason=f"edit {edit_id} reverted: {reason}", kind="fact.retry" if retry else None)  # fmt: skip
        logger.bind(edit_id=edit_id).warning("edit {}: reverted ({})", edit_id, reason)
        return revert

    def request_revert(self, edit_id: int, *, reason: str, actor: str) -> EditRecord:
        """Write ahead: a committed edit is to be reverted (status `reverting`), before the
        model changes. The maintainer then reverts it, saves the state and records the
        revert (`revert_edit`); after a crash, restart finishes it (`revert_requests`).
        Asking again for an edit already being reverted returns it unchanged."""
        with self.transaction(actor) as tx:
            row = tx._s.get(EditRow, edit_id)
            if row is None:
                raise LedgerError(f"no edit {edit_id}")
            if row.status == "reverting":
                return EditRecord.of(row)
            if row.status != "committed":
                raise LedgerError(f"edit {edit_id} is {row.status}; only committed edits are reverted")
            edit = tx.set_edit_status(edit_id, "reverting", reason=reason)
        logger.bind(edit_id=edit_id).info("edit {}: revert requested by {} ({})", edit_id, actor, reason)
        return edit

    def revert_requests(self) -> list[tuple[EditRecord, str]]:
        """Reverts requested and not yet finished, oldest first, with who asked."""
        out = []
        with self._read() as s:
            for row in s.exec(select(EditRow).where(EditRow.status == "reverting").order_by(col(EditRow.id))):
                actor = s.exec(
                    select(EventRow.actor).where(EventRow.entity == "edit").where(EventRow.entity_id == row.id)
                    .where(EventRow.kind == "edit.reverting").order_by(col(EventRow.seq).desc())
                ).first()  # fmt: skip
                out.append((EditRecord.of(row), actor or "daemon"))
        return out

    def supersede_edit(
        self,
        old_edit_id: int,
        *,
        by_fact_id: int,
        actor: str = "daemon",
        probes_before: Mapping[str, Any] | None = None,
        probes_after: Mapping[str, Any] | None = None,
    ) -> RevertRecord:
        """A committed edit was reverted because a newer verified fact replaces it.

        The old fact becomes `superseded` and the revert log names the newer fact. (The
        maintenance loop records this with `commit_edit(..., supersedes_edit_id=...)`, once
        the newer fact's edit is committed, so that a failed replacement loses nothing.)
        """
        with self.transaction(actor) as tx:
            revert = self._mark_superseded(tx, old_edit_id, by_fact_id, probes_before, probes_after)
        return revert

    @staticmethod
    def _mark_superseded(tx: Any, old_edit_id: int, by_fact_id: int, probes_before: Mapping[str, Any] | None,
                         probes_after: Mapping[str, Any] | None) -> RevertRecord:  # fmt: skip
        new = tx._s.get(FactRow, by_fact_id)
        old = tx._s.get(EditRow, old_edit_id)
        if new is None or old is None:
            raise LedgerError(f"no fact {by_fact_id} or no edit {old_edit_id}")
        if new.supersedes_fact_id != old.fact_id:
            raise LedgerError(f"fact {by_fact_id} does not supersede fact {old.fact_id} (edit {old_edit_id})")
        if old.status != "committed":
            raise LedgerError(f"edit {old_edit_id} is {old.status}, not committed")
        reason = f"superseded by fact {by_fact_id}"
        tx.set_edit_status(old_edit_id, "reverted", reason=reason)
        revert = tx.add_revert(old_edit_id, reason=reason, probes_before=probes_before,
                               probes_after=probes_after, superseded_by_fact_id=by_fact_id)  # fmt: skip
        tx.set_fact_status(old.fact_id, "superseded", reason=reason)
        logger.bind(edit_id=old_edit_id).info("edit {}: reverted, superseded by fact {}", old_edit_id, by_fact_id)
        return revert

    def block_fact(self, fact_id: int, *, reason: str, actor: str = "daemon") -> FactRecord:
        """Do not retry this fact blindly; a person can release it with `approve`."""
        with self.transaction(actor) as tx:
            return tx.set_fact_status(fact_id, "blocked", reason=reason)

    def skip_fact(self, fact_id: int, *, reason: str = "model already answers correctly",
                  actor: str = "daemon") -> FactRecord:  # fmt: skip
        with self.transaction(actor) as tx:
            return tx.set_fact_status(fact_id, "skipped", reason=reason)

    def committed_edits(self) -> list[EditRecord]:
        """Edits that the persisted editor state must contain, oldest first."""
        return self.edits(status="committed")

    def uncommitted_edits(self) -> list[EditRecord]:
        """Edits applied but neither committed nor reverted (a crash in between)."""
        return self.edits(status="applied")

    # -- people --------------------------------------------------------------------------
    def approve(self, fact_id: int, *, actor: str, reason: str = "approved") -> FactRecord:
        """A person approves a quarantined fact (or releases a blocked one): it becomes ready."""
        with self.transaction(actor) as tx:
            current = tx._s.get(FactRow, fact_id)
            if current is None:
                raise LedgerError(f"no fact {fact_id}")
            if current.status not in ("quarantined", "blocked"):
                raise LedgerError(f"fact {fact_id} is {current.status}; only quarantined or blocked facts are approved")
            fact = tx.set_fact_status(fact_id, "ready", reason=reason, kind="fact.approved")
        logger.info("fact {}: approved by {}", fact_id, actor)
        return fact

    def reject(self, fact_id: int, *, actor: str, reason: str = "rejected") -> FactRecord:
        """A person rejects a fact that is not yet edited: it never becomes an edit."""
        with self.transaction(actor) as tx:
            fact = tx.set_fact_status(fact_id, "rejected", reason=reason)
        logger.info("fact {}: rejected by {}", fact_id, actor)
        return fact

    # -- integrity -----------------------------------------------------------------------
    def verify_chain(self, *, expect_head: str | None = None, max_problems: int = 50) -> ChainReport:
        """Check the event chain and every row against it.

        Detects: a changed, inserted, deleted or reordered event (hash chain and sequence),
        deleted newest events (head row), changed immutable row fields (record hashes in
        creation events), rows without a creation event or events without their row, and
        status caches that disagree with the events.
        """
        problems: list[str] = []

        def problem(text: str) -> None:
            if len(problems) < max_problems:
                problems.append(text)

        created: dict[tuple[str, int], str] = {}
        latest: dict[tuple[str, int], dict[str, Any]] = {}
        prev_hash, expected_seq, count = GENESIS_HASH, 1, 0
        with self._read() as s:
            for ev in s.exec(select(EventRow).order_by(col(EventRow.seq))):
                count += 1
                if ev.seq != expected_seq:
                    problem(f"event {ev.seq}: expected seq {expected_seq} (events missing or reordered)")
                if ev.prev_hash != prev_hash:
                    problem(f"event {ev.seq}: prev_hash does not match the previous event's hash")
                if _chain_hash(ev.prev_hash, ev.payload) != ev.hash:
                    problem(f"event {ev.seq}: hash does not match its payload (event altered)")
                try:
                    env = json.loads(ev.payload)
                except ValueError:
                    problem(f"event {ev.seq}: payload is not JSON")
                    env = {}
                columns = {"seq": ev.seq, "ts": ev.ts, "kind": ev.kind, "entity": ev.entity,
                           "entity_id": ev.entity_id, "actor": ev.actor, "reason": ev.reason}  # fmt: skip
                if any(env.get(k) != v for k, v in columns.items()):
                    problem(f"event {ev.seq}: columns disagree with the hashed payload")
                data = env.get("data") or {}
                key = (ev.entity, ev.entity_id)
                if "record" in data:
                    created[key] = data["record"]
                if "status" in data:
                    latest[key] = data
                prev_hash, expected_seq = ev.hash, ev.seq + 1
            head = s.get(ChainHeadRow, 1)
            head_seq, head_hash = (head.seq, head.hash) if head else (0, GENESIS_HASH)
            if head_seq != expected_seq - 1 or head_hash != prev_hash:
                problem(f"chain head says seq {head_seq} but the log ends at {expected_seq - 1} (events deleted or added)")
            if expect_head is not None and expect_head != head_hash:
                problem(f"head hash {head_hash[:16]}... is not the expected {expect_head[:16]}...")

            for kind, table in _ROW_TYPES.items():
                seen: set[int] = set()
                for row in s.exec(select(table)):
                    rid = row.id
                    seen.add(rid)
                    record = created.get((kind, rid))
                    if record is None:
                        problem(f"{kind} {rid}: no creation event (row inserted outside the ledger)")
                        continue
                    if _record_hash(kind, row) != record:
                        problem(f"{kind} {rid}: row differs from what its creation event recorded (row altered)")
                    state = latest.get((kind, rid))
                    if kind in _CACHE_FIELDS and state is not None:
                        for name in _CACHE_FIELDS[kind]:
                            have = getattr(row, name)
                            want = state.get(name)
                            if name == "probes":
                                have = json.loads(have)
                            if have != want:
                                problem(f"{kind} {rid}: {name} is {have!r} but the events say {want!r}")
                for ek, rid in created:
                    if ek == kind and rid not in seen:
                        problem(f"{kind} {rid}: row deleted (its creation event exists)")
        ok = not problems
        return ChainReport(ok, count, head_seq, head_hash, tuple(problems))
