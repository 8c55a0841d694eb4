"""The source interfaces: what every kind of source provides, and where its claims go.

A source (feed, curated JSONL, memory) is polled with its saved cursor (ETag,
Last-Modified, last accepted sequence number...) and returns a `PollResult`: the claims it
read, the problems it met and the new cursor. The intake hands each result to a
`ClaimSink`, which stores the claims and the cursor together, so a crash between the two
re-reads the data instead of losing it (duplicates are dropped by hash). The daemon's sink
writes to the ledger (`kmd.daemon.intake.LedgerSink`); `MemorySink` keeps them in memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from kmd.sources.claims import Claim

__all__ = ["ClaimSink", "MemorySink", "MemorySource", "PollResult", "Source", "Stored"]


@dataclass(frozen=True)
class PollResult:
    source_id: str
    claims: tuple[Claim, ...] = ()
    problems: tuple[str, ...] = ()  # human-readable, e.g. "line 7: object: field required"
    cursor: Mapping[str, Any] = field(default_factory=dict)  # to save for the next poll
    not_modified: bool = False  # nothing new (HTTP 304, same file)
    refused: bool = False  # the whole fetch or file was refused (problems say why)
    unmatched: int = 0  # entries read that stated no fact (prose no extraction rule matched)


class Source(Protocol):
    """A place facts come from."""

    @property
    def id(self) -> str: ...

    def poll(self, cursor: Mapping[str, Any], now: datetime) -> PollResult: ...


@dataclass(frozen=True)
class Stored:
    """What a sink did with one poll's claims."""

    new_ids: tuple[int, ...]  # ids of the claims stored (new content hashes)
    duplicates: int  # claims dropped because their content hash was already stored


class ClaimSink(Protocol):
    """Where the intake puts what sources read: claims and cursors, durably and together."""

    def load_cursor(self, source_id: str) -> dict[str, Any]: ...

    def store(self, source_id: str, claims: Sequence[Claim], cursor: Mapping[str, Any], *, channel: str) -> Stored:
        """Store new claims (dropping known content hashes) and the source's cursor atomically.
        `channel` is the door they came through (the source's kind: `feed`, `jsonl`)."""
        ...


class MemorySink:
    """A `ClaimSink` in memory (tests, tools that only read sources)."""

    def __init__(self) -> None:
        self.cursors: dict[str, dict[str, Any]] = {}
        self.claims: dict[str, tuple[Claim, str]] = {}  # content hash -> (claim, channel)
        self._ids = itertools.count(1)

    def load_cursor(self, source_id: str) -> dict[str, Any]:
        return dict(self.cursors.get(source_id, {}))

    def store(self, source_id: str, claims: Sequence[Claim], cursor: Mapping[str, Any], *, channel: str) -> Stored:
        new, duplicates = [], 0
        batch: dict[str, Claim] = {}
        for claim in claims:  # restatements within one batch count once, as in the ledger
            batch.setdefault(claim.content_hash, claim)
        for claim in batch.values():
            if claim.content_hash in self.claims:
                duplicates += 1
                continue
            self.claims[claim.content_hash] = (claim, channel)
            new.append(next(self._ids))
        self.cursors[source_id] = dict(cursor)
        return Stored(tuple(new), duplicates)


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
