"""What the HTTP surfaces (the API, the OpenAI-compatible endpoints, the review console)
need from the running service: the `Service` interface, and the errors it raises to them.

`kmd.daemon.service.Daemon` implements it; the surfaces depend on this module only, never
on the service itself, so the dependency goes one way (service -> api -> surface).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kmd.daemon.ledger import ChainReport, ClaimRecord, EditRecord, EventRecord, FactRecord, RevertRecord
    from kmd.daemon.policy import Policy
    from kmd.daemon.serving import ServedState, ServingEngine
    from kmd.daemon.settings import DaemonSettings

__all__ = ["Figures", "NotServingError", "Records", "ReplicaError", "Reverter", "Service"]


class NotServingError(RuntimeError):
    """No model and state are loaded yet (or this process is a standby)."""


class ReplicaError(RuntimeError):
    """This process is a serving replica: edits and reverts belong to the writer."""


class Reverter(Protocol):
    """What reverts an edit now (the writer's maintainer): the one model change the surfaces make."""

    def revert(self, edit_id: int, *, reason: str, actor: str) -> dict[str, Any]:
        """Revert a committed edit (KeyError when there is no such edit to revert)."""
        ...


class Records(Protocol):
    """The ledger as the surfaces use it: its reads, and people's decisions on facts
    (`kmd.daemon.ledger.Ledger` is one; LedgerError for an id it does not have)."""

    def edit(self, edit_id: int) -> EditRecord: ...

    def edits(self, *, status: str | Sequence[str] | None = None, fact_id: int | None = None,
              limit: int | None = None, newest_first: bool = False) -> list[EditRecord]: ...  # fmt: skip

    def fact(self, fact_id: int) -> FactRecord: ...

    def facts(self, *, status: str | Sequence[str] | None = None, limit: int | None = None,
              newest_first: bool = True) -> list[FactRecord]: ...  # fmt: skip

    def claim(self, claim_id: int) -> ClaimRecord: ...

    def claims(self, *, status: str | Sequence[str] | None = None, limit: int | None = None,
               newest_first: bool = False) -> list[ClaimRecord]: ...  # fmt: skip

    def reverts(self, *, edit_id: int | None = None, limit: int | None = None) -> list[RevertRecord]: ...

    def events(self, *, entity: str | None = None, entity_id: int | None = None,
               limit: int | None = None) -> list[EventRecord]: ...  # fmt: skip

    def counts(self) -> dict[str, dict[str, int]]: ...

    def verify_chain(self) -> ChainReport: ...

    def approve(self, fact_id: int, *, actor: str, reason: str = "approved") -> FactRecord: ...

    def reject(self, fact_id: int, *, actor: str, reason: str = "rejected") -> FactRecord: ...


@dataclass(frozen=True)
class Figures:
    """The service's counters and gauges as /metrics reports them, read at scrape time
    (zeros where this process has no maintainer, intake or replica)."""

    edits_committed: float
    edits_reverted: float
    edits_retried: float
    facts_skipped: float
    regression_reverts: float
    cycles: float
    errors: float
    feed_entries_unmatched: float
    state_loads: float
    ready: float
    writer: float
    edit_in_flight: float
    edits_active: float
    locality: float  # NaN before the first measure
    probe_seconds: float
    cycle_seconds: float
    ledger_head_seq: float


class Service(Protocol):
    """The running daemon as the HTTP surfaces see it. Whether the writer's maintainer or a
    replica serves is the service's business: the surfaces ask what they need."""

    settings: DaemonSettings
    policy: Policy
    ledger: Records  # edits, facts, claims, reverts, the event chain
    api_token: str | None

    @property
    def ready(self) -> bool: ...

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): what /readyz answers."""
        ...

    def served_state(self) -> ServedState:
        """What answers requests now: the committed edits' snapshot and its state id
        (NotServingError before the model and state are loaded)."""
        ...

    def served_model_name(self) -> str | None:
        """The served model's own name (None before the model is loaded)."""
        ...

    def active_edit_ids(self) -> list[str]:
        """The edits applied to the served model now (none before start-up)."""
        ...

    def reverter(self) -> Reverter:
        """What reverts edits: ReplicaError on a replica, NotServingError before start-up."""
        ...

    def figures(self) -> Figures:
        """The counters and gauges /metrics reports."""
        ...

    def engine(self) -> ServingEngine:
        """The one serving engine every generated token comes from (NotServingError before
        the model and state are loaded)."""
        ...

    def submit_fact(self, subject: str, relation: str, obj: str, source_id: str | None, url: str) -> dict[str, Any]:
        """Record a submitted fact as a claim of an api source (PermissionError, ValueError when refused)."""
        ...
