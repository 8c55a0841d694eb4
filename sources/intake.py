"""The intake: poll the configured sources and hand what they claim to a sink.

`Intake.poll_due()` is what the scheduler calls: every source whose poll interval has passed
is fetched and parsed (concurrently, in threads: the work is mostly waiting on the network),
then its claims and its cursor (ETag, Last-Modified, sequence number, last poll time) go to
the `ClaimSink` together, from this one thread, so a cursor never advances past claims that
were not stored. The daemon's sink writes them to the ledger in one transaction
(`kmd.daemon.intake`); verification is a separate step there (`kmd.daemon.verify`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from loguru import logger

from kmd.sources.base import ClaimSink, PollResult, Source
from kmd.sources.claims import Claim, iso, parse_time, utcnow
from kmd.sources.config import FetchLimits, SourcePolicy
from kmd.sources.feeds import FeedSource
from kmd.sources.jsonl import JsonlSource
from kmd.sources.net import Fetcher, SafeFetcher
from kmd.sources.wikidata import WikidataSource

__all__ = ["Intake", "IntakeReport", "SourceCatalog", "build_sources"]


class SourceCatalog(Protocol):
    """The sources part of a configuration (the daemon's policy is one)."""

    @property
    def sources(self) -> Sequence[SourcePolicy]: ...

    def source(self, source_id: str) -> SourcePolicy: ...  # KeyError when unknown

    def limits_for(self, source: SourcePolicy) -> FetchLimits: ...


@dataclass(frozen=True)
class IntakeReport:
    source_id: str
    new_claims: int
    duplicates: int
    problems: tuple[str, ...]
    not_modified: bool
    refused: bool
    seconds: float
    unmatched: int = 0  # entries that stated no fact: counted, not problems


# The polled kinds; `api` sources are fed through POST /v1/facts and never polled.
_KINDS: dict[str, Callable[[SourcePolicy, FetchLimits, Fetcher], Source]] = {
    "feed": FeedSource,
    "jsonl": JsonlSource,
    "wikidata": WikidataSource,
}


def build_sources(policy: SourceCatalog, fetcher: Fetcher) -> dict[str, Source]:
    """One `Source` per polled policy entry, by kind."""
    return {sp.id: _KINDS[sp.kind](sp, policy.limits_for(sp), fetcher) for sp in policy.sources if sp.kind in _KINDS}


class Intake:
    def __init__(
        self,
        policy: SourceCatalog,
        sink: ClaimSink,
        *,
        fetcher: Fetcher | None = None,
        sources: Mapping[str, Source] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ):
        self.policy = policy
        self.sink = sink
        self._own_fetcher = fetcher is None
        self.fetcher = fetcher or SafeFetcher()
        self.sources: dict[str, Source] = dict(sources) if sources is not None else build_sources(policy, self.fetcher)
        self._clock = clock
        self.entries_unmatched = 0  # entries read that stated no fact, since start (a metric)

    def close(self) -> None:
        if self._own_fetcher and isinstance(self.fetcher, SafeFetcher):
            self.fetcher.close()

    def __enter__(self) -> Intake:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def due(self, now: datetime | None = None) -> list[str]:
        """Sources whose poll interval has passed since their last poll."""
        now = now or self._clock()
        due = []
        for source_id in self.sources:
            last = self.sink.load_cursor(source_id).get("last_poll")
            try:
                interval = self.policy.source(source_id).poll_interval
            except KeyError:
                interval = 0.0  # a source given in code, not in the policy: always due
            if last is None or parse_time(last) + timedelta(seconds=interval) <= now:
                due.append(source_id)
        return due

    def poll_due(self, *, max_workers: int = 4) -> list[IntakeReport]:
        return self.poll_many(self.due(), max_workers=max_workers)

    def poll(self, source_id: str) -> IntakeReport:
        return self.poll_many([source_id], max_workers=1)[0]

    def poll_many(self, source_ids: Iterable[str], *, max_workers: int = 4) -> list[IntakeReport]:
        """Fetch and parse in threads; record claims and save cursors in this thread."""
        ids = list(source_ids)
        unknown = [s for s in ids if s not in self.sources]
        if unknown:
            raise KeyError(f"unknown sources: {unknown}")
        now = self._clock()
        cursors = {sid: self.sink.load_cursor(sid) for sid in ids}

        def fetch(sid: str) -> tuple[PollResult, float]:
            start = time.perf_counter()
            try:
                result = self.sources[sid].poll(cursors[sid], now)
            except Exception as exc:  # a source bug must not stop the others
                logger.exception("source {}: poll failed", sid)
                result = PollResult(sid, problems=(f"poll failed: {type(exc).__name__}: {exc}",),
                                    cursor=cursors[sid], refused=True)  # fmt: skip
            return result, time.perf_counter() - start

        reports = []
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(ids) or 1))) as pool:
            for result, seconds in pool.map(fetch, ids):
                cursor = {**result.cursor, "last_poll": iso(now), "last_problems": len(result.problems)}
                self.entries_unmatched += result.unmatched
                claims, refused = self._admissible(result)
                # Stored together: the cursor (ETag, sequence) advances only with the claims.
                recorded = self.sink.store(result.source_id, claims, cursor, channel=self._channel(result.source_id))
                reports.append(
                    IntakeReport(result.source_id, len(recorded.new_ids), recorded.duplicates, result.problems + refused,
                                 result.not_modified, result.refused, seconds, result.unmatched)  # fmt: skip
                )
                if recorded.new_ids:
                    logger.info("source {}: {} new claims ({} duplicates)", result.source_id, len(recorded.new_ids),
                                recorded.duplicates)  # fmt: skip
        return reports

    def _channel(self, source_id: str) -> str:
        try:
            return self.policy.source(source_id).kind
        except KeyError:  # a source given in code, not in the policy: the verifier rejects its claims
            return "feed"

    def _admissible(self, result: PollResult) -> tuple[list[Claim], tuple[str, ...]]:
        """A source records claims under its own id only, and an `api` source is never polled."""
        channel = self._channel(result.source_id)
        if channel == "api":
            return [], (f"source {result.source_id} is an api source: it is never polled",)
        kept, problems = [], []
        for claim in result.claims:
            if claim.source_id != result.source_id:
                problems.append(f"claim for source {claim.source_id!r} from source {result.source_id!r} dropped")
            else:
                kept.append(claim)
        for problem in problems[:5]:
            logger.warning("source {}: {}", result.source_id, problem)
        return kept, tuple(problems)
