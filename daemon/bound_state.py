"""Editor states bound to the ledger: the daemon loads a saved state only if the ledger names it.

The writer names every state in the hash chain (`Ledger.record_state`, with its digest:
the sha256 of its manifest, which holds the tensors' sha256) *before* it writes it
(`Maintainer.save`). So the state on disk is always one the ledger names, at every crash
point: a crash after the naming and before the write leaves the state saved before, which
was named too. A state changed after it was saved (a tensor row swapped, a paraphrase
edited, the manifest's checksums recomputed to match) has another digest, which the
ledger does not name: it is refused at a writer's start, at a replica's load, when a
writer takes over a published state and when the writer reloads its own state.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kmd.editors.state import StateError, load_editor, read_manifest, state_digest

if TYPE_CHECKING:
    from kmd.daemon.ledger import Ledger
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import Editor

__all__ = ["UnnamedStateError", "check_named", "load_named", "named_digest"]


class UnnamedStateError(StateError):
    """A saved state whose digest the ledger does not name: changed after kmd saved it."""


def named_digest(ledger: Ledger, path: Path) -> str | None:
    """The digest of the state saved at `path` if the ledger names it, else None."""
    try:
        digest = state_digest(path)
    except StateError:
        return None
    return digest if ledger.named_state(digest) is not None else None


def check_named(ledger: Ledger, path: Path, *, remedy: str = "") -> str:
    """The digest of the state saved at `path`; UnnamedStateError unless the ledger names it."""
    digest = state_digest(path)
    if ledger.named_state(digest) is None:
        read_manifest(path)  # a careless change (a checksum that no longer matches) says exactly what differs
        raise UnnamedStateError(
            f"{path}: the saved state {digest[:12]} is not one the ledger recorded (its manifest or tensors were "
            f"changed after kmd saved them, or an older kmd saved it); refusing to load it" + (f". {remedy}" if remedy else "")
        )
    return digest


def load_named(ledger: Ledger, path: Path, host: ModelHost, *, remedy: str = "") -> tuple[Editor, str]:
    """Load the state saved at `path` if the ledger names it (the bytes checked are the bytes
    loaded); returns the editor and the state's digest."""
    digest = check_named(ledger, path, remedy=remedy)
    return load_editor(path, host, digest=digest), digest
