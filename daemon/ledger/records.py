"""What the ledger hands out: immutable records, never ORM objects."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

from kmd.common.values import parse_time
from kmd.editors.protocol import EditRequest

if TYPE_CHECKING:
    from kmd.daemon.ledger.tables import EditRow, EventRow, FactRow, RevertRow, StateRow

__all__ = ["ChainReport", "ClaimRecord", "ClaimUpdate", "EditRecord", "EventRecord", "FactRecord", "PublishedState",
           "RecordResult", "RevertRecord", "StateRecord"]


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
    request: dict[str, Any]  # as stored (`EditRequest.to_dict()`): the API and the console show it as is
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

    @cached_property
    def edit_request(self) -> EditRequest:
        """The stored request as the typed `EditRequest` (parsed once per record): what
        the daemon reads, instead of the dict's keys. No edit id: the ledger's id is `id`."""
        return EditRequest.from_dict(self.request)


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
class StateRecord:
    """An editor state the writer saved (named in the ledger before it was written)."""

    id: int
    digest: str
    edit_ids: tuple[str, ...]
    saved_at: datetime

    @classmethod
    def of(cls, row: StateRow) -> StateRecord:
        return cls(row.id, row.digest, tuple(json.loads(row.edit_ids)), parse_time(row.saved_at))


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
    head_file: str | None = None  # the head file compared (None: the ledger keeps none)
    head_file_seq: int | None = None  # the head it recorded (None: no file there yet)

