"""Named step boundaries where a test can kill the process (`KMD_CRASH_AT=<point>`).

Inert unless the variable is set: `crash_point(name)` is then one dictionary lookup. When
`KMD_CRASH_AT` names the point, the process ends at once with `os._exit` (no `finally`
blocks, no atexit handlers, no flush: as close to SIGKILL as Python gets), so the crash
tests can stop a real daemon exactly between two steps of an edit, a commit, a revert,
a supersession or a batch. The points and what recovery makes of each: docs/crash-safety.md.
"""

from __future__ import annotations

import os

__all__ = ["CRASH_EXIT", "POINTS", "crash_point"]

CRASH_EXIT = 86  # the exit status of a deliberate crash

# Every point, in the order an operation passes them.
POINTS = (
    # a new fact's edit
    "apply.recorded",  # ledger: edit `applied` (nothing changed in the model yet)
    "apply.applied",  # the backend applied it (in memory)
    "apply.probed",  # its probes passed (state not saved yet)
    "state.named",  # ledger: the state about to be saved is named (its files not written yet)
    "commit.saved",  # editor state saved with the edit (ledger still says `applied`)
    "commit.recorded",  # ledger: edit `committed`
    # a newer fact replacing a committed edit
    "supersede.old_reverted",  # the old edit reverted in memory only
    "supersede.recorded",  # ledger: the new edit `applied`, naming the old one
    "supersede.applied",
    "supersede.probed",
    "supersede.saved",  # state saved: new edit in, old edit out (ledger: old still committed)
    "supersede.committed",  # ledger: new edit committed, old one reverted, in one transaction
    # a batch of new facts' edits (kmd.daemon.batch)
    "batch.recorded",  # ledger: every edit of the batch `applied` (nothing changed in the model yet)
    "batch.applied",  # the backend applied them all (in memory)
    "batch.probed",  # probed together, culprits bisected out and reverted in memory
    "batch.reverted",  # ledger: the culprits' revert logs (the others still `applied`, state not saved)
    "batch.saved",  # editor state saved with the others (ledger still says `applied`)
    "batch.committed",  # ledger: the others `committed`, in one transaction
    # an operator's (or the regression check's) revert
    "revert.requested",  # ledger: edit `reverting` (the request is durable)
    "revert.applied",  # the backend reverted it (in memory)
    "revert.saved",  # state saved without it (ledger still says `reverting`)
    "revert.recorded",  # ledger: edit `reverted`, revert log written
)


def crash_point(name: str) -> None:
    """Exit the process here if `KMD_CRASH_AT` names this point (tests only)."""
    target = os.environ.get("KMD_CRASH_AT")
    if target is None:
        return
    if name not in POINTS:  # a typo in the code must not silently make a point untestable
        raise ValueError(f"unknown crash point {name!r}")
    if target == name:
        os._exit(CRASH_EXIT)
