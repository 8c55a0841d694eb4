"""What the HTTP surfaces (the API, the OpenAI-compatible endpoints, the review console)
need from the running service: the `Service` interface, and the errors it raises to them.

`kmd.daemon.service.Daemon` implements it; the surfaces depend on this module only, never
on the service itself, so the dependency goes one way (service -> api -> surface).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kmd.daemon.ledger import Ledger
    from kmd.daemon.maintainer import Maintainer
    from kmd.daemon.policy import Policy
    from kmd.daemon.replication import Replica
    from kmd.daemon.serving import ServedState, ServingEngine
    from kmd.daemon.settings import DaemonSettings
    from kmd.sources.intake import Intake

__all__ = ["NotServingError", "Service"]


class NotServingError(RuntimeError):
    """No model and state are loaded yet (or this process is a standby)."""


class Service(Protocol):
    """The running daemon as the HTTP surfaces see it."""

    settings: DaemonSettings
    policy: Policy
    ledger: Ledger
    api_token: str | None
    maintainer: Maintainer | None  # the writer's (None on a replica or before start-up)
    intake: Intake | None  # the writer's source polling (None on a replica or before start-up)
    replica: Replica | None  # a serving replica's (None on the writer)

    @property
    def ready(self) -> bool: ...

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): what /readyz answers."""
        ...

    def served_state(self) -> ServedState:
        """What answers requests now: the committed edits' snapshot and its state id
        (NotServingError before the model and state are loaded)."""
        ...

    def engine(self) -> ServingEngine:
        """The one serving engine every generated token comes from (NotServingError before
        the model and state are loaded)."""
        ...

    def submit_fact(self, subject: str, relation: str, obj: str, source_id: str | None, url: str) -> dict[str, Any]:
        """Record a submitted fact as a claim of an api source (PermissionError, ValueError when refused)."""
        ...
