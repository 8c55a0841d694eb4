"""Rows that are operational state, not ledger facts: source cursors, the writer term and
the published state. They live in the ledger's database but are not hash-chained.

- *Source cursors* (ETag, Last-Modified, sequence numbers): saved in the same transaction
  as the claims read with them (`kmd.daemon.intake.LedgerSink`).
- The *writer term* (`kmd.daemon.leadership`): bumped by each process that becomes the
  writer; every write transaction of a process holding a term first checks it is still
  the current one, so a deposed writer cannot write.
- The *published state* version that serving replicas load (`kmd.daemon.replication`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlmodel import Field, Session, SQLModel, select

from kmd.common.values import canonical_json, parse_time
from kmd.daemon.ledger.lifecycle import NotWriterError
from kmd.daemon.ledger.records import PublishedState

__all__ = ["CLUSTER_TABLES", "CursorRow", "PublishedStateRow", "WriterTermRow", "bump_term", "check_term", "load_cursor",
           "published", "publish", "save_cursor"]


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



CLUSTER_TABLES = [t.__table__ for t in (CursorRow, WriterTermRow, PublishedStateRow)]


# -- source cursors ---------------------------------------------------------------------------


def load_cursor(s: Session, source_id: str) -> dict[str, Any]:
    row = s.get(CursorRow, source_id)
    return json.loads(row.state) if row else {}


def save_cursor(s: Session, source_id: str, cursor: Mapping[str, Any], now: str) -> None:
    row = s.get(CursorRow, source_id) or CursorRow(source_id=source_id, state="{}", updated_at="")
    row.state, row.updated_at = json.dumps(dict(cursor), sort_keys=True, default=str), now
    s.add(row)


# -- the writer term --------------------------------------------------------------------------


def check_term(s: Session, term: int) -> None:
    """Refuse to write (NotWriterError) unless `term` is still the current writer term."""
    # FOR SHARE: a new writer's term bump waits for this transaction, and every later
    # transaction of ours sees the bump. (SQLite has one writer at a time anyway.)
    current = s.exec(select(WriterTermRow.term).where(WriterTermRow.id == 1).with_for_update(read=True)).one()
    if current != term:
        raise NotWriterError(f"writer term {term} is over (term {current} is current): another process is the writer")


def bump_term(s: Session, holder: str, now: str) -> int:
    """Begin a new writer term for `holder`; returns it."""
    row = s.exec(select(WriterTermRow).where(WriterTermRow.id == 1).with_for_update()).one()
    row.term, row.holder, row.since = row.term + 1, holder, now
    s.add(row)
    return row.term


# -- the published state ----------------------------------------------------------------------


def publish(s: Session, version: str, edit_ids: Sequence[str], *, term: int, holder: str, now: str) -> None:
    row = s.get(PublishedStateRow, 1) or PublishedStateRow(id=1, version="", edit_ids="[]", term=0, holder="",
                                                           published_at="")  # fmt: skip
    row.version, row.edit_ids, row.term = version, canonical_json(list(edit_ids)), term
    row.holder, row.published_at = holder, now
    s.add(row)


def published(s: Session) -> PublishedState | None:
    row = s.get(PublishedStateRow, 1)
    if row is None:
        return None
    return PublishedState(row.version, tuple(json.loads(row.edit_ids)), row.term, row.holder, parse_time(row.published_at))
