"""What may happen to a claim, a fact and an edit: the ledger's state machines.

    claim   new -> pending (admitted, waiting for quorum) -> accepted (supports a fact)
            new|pending -> rejected (reason says why)
    fact    quarantined --approve--> ready --edit applied--> applied --probes ok--> committed
            ready -> skipped (model already knows) | blocked (do not retry blindly)
            applied|committed --revert--> blocked (or ready when a retry is asked for)
            committed --superseded by a newer fact--> superseded
            quarantined|ready|blocked -> rejected (by a person) | superseded (by a newer fact)
    edit    applied -> committed -> reverted;  applied -> reverted
            committed -> reverting (a revert requested, written ahead) -> reverted

Every status change is checked against these tables (`LedgerTransaction.set_*_status`,
`update_claims`) and refused with `LedgerError` when not allowed.
"""

from __future__ import annotations

__all__ = [
    "ACTIVE_FACT_STATUSES",
    "CLAIM_TRANSITIONS",
    "EDIT_TRANSITIONS",
    "FACT_TRANSITIONS",
    "FactNotReadyError",
    "LedgerError",
    "NotWriterError",
]

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



class FactNotReadyError(LedgerError):
    """The fact is no longer `ready` (a person rejected it, or verification superseded it,
    after the maintenance cycle listed it): an expected race, not a failure."""
