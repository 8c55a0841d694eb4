"""The chain head kept outside the database, so that a rollback of the chain's tail shows.

The hash chain catches an altered, inserted or deleted event, but not the removal of the
newest events together with a head row reset to match (a consistent rollback: an older
copy of the database put back, or rows deleted by someone who recomputed the head). So
the ledger writes its head (seq and hash), after every transaction that appended events,
to a small JSON file outside the database, and `verify_chain` checks that the chain still
holds it: the event at that seq must exist with that hash. The file is written after the
commit (atomically, fsynced), so it may lag the database but never lead it: a file ahead
of the chain means the chain lost events.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Head", "HeadFile", "HeadFileError"]


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str


class HeadFileError(ValueError):
    """The head file exists but cannot be read as a head."""


class HeadFile:
    """One head file: read it, or move it forward (never back)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._written = -1  # the newest seq this object wrote

    def read(self) -> Head | None:
        """The recorded head, or None when there is no file yet."""
        try:
            data = json.loads(self.path.read_bytes())
            head = Head(int(data["seq"]), str(data["hash"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HeadFileError(f"{self.path}: not a chain head ({type(exc).__name__}: {exc})") from None
        if head.seq < 0 or len(head.hash) != 64:
            raise HeadFileError(f"{self.path}: not a chain head (seq {head.seq}, hash {head.hash[:20]!r})")
        return head

    def advance(self, head: Head) -> None:
        """Record `head` unless this object already recorded a newer one. Another process
        writing the same file may leave it one step behind: behind is safe, ahead never.
        Nothing is written while the file's directory does not exist (the daemon makes its
        state directory; a CLI run elsewhere does not scatter head files)."""
        with self._lock:
            if head.seq <= self._written or not self.path.parent.is_dir():
                return
            data = json.dumps({"seq": head.seq, "hash": head.hash}).encode()
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())  # never a torn or empty file after a power loss
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self._written = head.seq
