"""The daemon's side of the intake: what the sources read goes into the ledger here.

`kmd.sources.intake.Intake` polls and parses the sources and hands each poll's claims and
cursor to a `ClaimSink`; `LedgerSink` is the one the daemon gives it. It records the claims
(stamped with the channel they came through and the policy version) and saves the cursor
in one ledger transaction, so a cursor never advances past claims that were not stored.
`intake_for(policy, ledger)` builds the intake the daemon and the CLI run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kmd.common.values import utcnow
from kmd.sources.base import Stored
from kmd.sources.intake import Intake

if TYPE_CHECKING:
    from kmd.daemon.ledger import Ledger
    from kmd.daemon.policy import Policy
    from kmd.sources.claims import Claim

__all__ = ["LedgerSink", "intake_for"]


class LedgerSink:
    """A `ClaimSink` writing to the ledger under one policy version."""

    def __init__(self, ledger: Ledger, policy_version: str, *, actor: str = "intake") -> None:
        self.ledger, self.policy_version, self.actor = ledger, policy_version, actor

    def load_cursor(self, source_id: str) -> dict[str, Any]:
        return self.ledger.load_cursor(source_id)

    def store(self, source_id: str, claims: Sequence[Claim], cursor: Mapping[str, Any], *, channel: str) -> Stored:
        # One transaction: the cursor (ETag, sequence) advances only with the claims stored.
        with self.ledger.transaction(self.actor) as tx:
            recorded = tx.record_claims(claims, policy_version=self.policy_version, channel=channel)
            tx.save_cursor(source_id, cursor)
        return Stored(recorded.new_ids, recorded.duplicates)


def intake_for(policy: Policy, ledger: Ledger, *, clock: Callable[[], datetime] = utcnow, **kwargs: Any) -> Intake:
    """The intake of `policy`'s sources, recording into `ledger` (kwargs: `Intake`'s)."""
    return Intake(policy, LedgerSink(ledger, policy.version_tag), clock=clock, **kwargs)
