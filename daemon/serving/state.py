"""What answers requests: the committed edits' snapshot and the id of its saved state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kmd.editors.protocol import Editor


@dataclass(frozen=True)
class ServedState:
    """Read once per request, so a request reports the state that answered it.

    `editor` is a snapshot (`Editor.fork`) holding exactly the committed edits: a candidate
    edit is never in it, and later applies and reverts do not change it. `version` is the
    sha256 of the saved state's manifest.json, the id the ledger records for published
    states (None before any state was saved)."""

    editor: Editor | None
    version: str | None

    @property
    def edits(self) -> int:
        return len(self.editor.edit_ids) if self.editor is not None else 0
