"""The source interface: what every kind of source (feed, curated JSONL, memory) provides.

A source is polled with its saved cursor (ETag, Last-Modified, last accepted sequence
number...) and returns a `PollResult`: the claims it read, the problems it met and the new
cursor. The caller persists the cursor only after the claims are stored, so a crash between
the two re-reads the data instead of losing it (duplicates are dropped by hash).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from kmd.sources.claims import Claim

__all__ = ["CursorStore", "MemoryCursorStore", "MemorySource", "PollResult", "Source"]


@dataclass(frozen=True)
class PollResult:
    source_id: str
    claims: tuple[Claim, ...] = ()
    problems: tuple[str, ...] = ()  # human-readable, e.g. "line 7: object: field required"
    cursor: Mapping[str, Any] = field(default_factory=dict)  # to save for the next poll
    not_modified: bool = False  # nothing new (HTTP 304, same file)
    refused: bool = False  # the whole fetch or file was refused (problems say why)


class Source(Protocol):
    """A place facts come from."""

    @property
    def id(self) -> str: ...

    def poll(self, cursor: Mapping[str, Any], now: datetime) -> PollResult: ...


class CursorStore(Protocol):
    """Durable per-source cursors; the ledger implements it, `MemoryCursorStore` for tests."""

    def load_cursor(self, source_id: str) -> dict[str, Any]: ...

    def save_cursor(self, source_id: str, cursor: Mapping[str, Any]) -> None: ...


class MemoryCursorStore:
    def __init__(self) -> None:
        self._cursors: dict[str, dict[str, Any]] = {}

    def load_cursor(self, source_id: str) -> dict[str, Any]:
        return dict(self._cursors.get(source_id, {}))

    def save_cursor(self, source_id: str, cursor: Mapping[str, Any]) -> None:
        self._cursors[source_id] = dict(cursor)


class MemorySource:
    """A source whose claims are handed to it in code; each claim is returned once."""

    def __init__(self, source_id: str, claims: Iterable[Claim] = ()):
        self._id = source_id
        self._queue: list[Claim] = list(claims)

    @property
    def id(self) -> str:
        return self._id

    def add(self, *claims: Claim) -> None:
        self._queue.extend(claims)

    def poll(self, cursor: Mapping[str, Any], now: datetime) -> PollResult:
        claims, self._queue = tuple(self._queue), []
        return PollResult(self._id, claims, cursor=dict(cursor), not_modified=not claims)
