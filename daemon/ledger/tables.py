"""The ledger's tables: append-only rows, each created with a hash-chained event.

Only the *status caches* are ever updated (a row's `status`, `status_reason`, and for
claims `fact_id`, for edits `probes`), each together with an event saying who changed it
and why (`kmd.daemon.ledger.chain` checks every cache against the events). Everything else
in a row is immutable and hashed into its creation event (`RECORD_FIELDS`). The chain head
(last seq and hash) has its own row so that deleting the newest events is caught.
The operational tables (cursors, writer term, published state) are in `cluster.py`.
"""

from __future__ import annotations

from sqlalchemy import Index
from sqlmodel import Field, SQLModel

__all__ = ["CACHE_FIELDS", "ChainHeadRow", "ClaimRow", "EditRow", "EventRow", "FactRow", "LEDGER_TABLES", "RECORD_FIELDS",
           "ROW_TYPES", "RevertRow", "StateRow"]


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


class StateRow(SQLModel, table=True):
    """An editor state the writer saved, named by its digest *before* it was written (so
    the state on disk is always one the ledger names; see kmd.daemon.bound_state)."""

    __tablename__ = "kmd_state"

    id: int | None = Field(default=None, primary_key=True)
    digest: str = Field(index=True)  # sha256 of the state's manifest.json (which holds the tensors' sha256)
    edit_ids: str  # canonical JSON list: the edits the state holds, oldest first
    saved_at: str


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


LEDGER_TABLES = [t.__table__ for t in (FactRow, ClaimRow, EditRow, RevertRow, StateRow, EventRow, ChainHeadRow)]

# The immutable columns of each row kind, hashed into its creation event.
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "claim": ("id", "content_hash", "source_id", "subject", "relation", "object", "subject_key", "url", "ref",
              "observed_at", "ingested_at", "flags", "policy_version"),
    "fact": ("id", "subject", "relation", "object", "subject_key", "observed_at", "verified_at", "sensitive",
             "policy_version", "claim_ids", "supersedes_fact_id"),
    "edit": ("id", "fact_id", "created_at", "backend", "backend_config", "request", "policy_version", "sources",
             "content_hashes", "supersedes_edit_id"),
    "revert": ("id", "edit_id", "reverted_at", "actor", "reason", "probes_before", "probes_after",
               "superseded_by_fact_id"),
    "state": ("id", "digest", "edit_ids", "saved_at"),
}  # fmt: skip
# The status-cache columns of each row kind and the event data keys they mirror.
CACHE_FIELDS: dict[str, tuple[str, ...]] = {
    "claim": ("status", "status_reason", "fact_id"),
    "fact": ("status", "status_reason"),
    "edit": ("status", "status_reason", "probes"),
}
ROW_TYPES = {"claim": ClaimRow, "fact": FactRow, "edit": EditRow, "revert": RevertRow, "state": StateRow}
