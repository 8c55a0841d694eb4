"""A `wikidata` source: the current values of watched items' properties, as claims.

One poll:

1. asks for the revision of every watched item (`props=info`, 50 ids a request: one
   request for 50 items) and skips those whose `lastrevid` is the one the cursor holds;
2. reads the statements and labels of the items that changed;
3. asks for the labels of the items their current values name, in one batched request
   (in the source's language, else `mul`, else English, saying so; without any label the
   value waits, and the item is read again at the next poll);
4. makes a claim for each property whose current value (`kmd.sources.wikidata.values`)
   differs from the one the cursor holds.

A claim's subject is the item's label, its object the value's text, its URL the revision
it was read from (`index.php?oldid=REV`), and it was observed at the statement's start time
(P580) when that is later than the value it replaces, else at the revision's time. The
claim that replaces a value supersedes the fact kmd holds for it through verification
(`kmd.daemon.verify`, "Conflict"): the ledger marks that fact `superseded`.

The cursor (saved with the claims in one transaction by the intake's sink) holds, per item,
the revision read, the properties read at it, their values and observation times, and
when a statement's start or end time comes due (the item is read again then, although
its revision has not changed).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urljoin

import httpx
from loguru import logger

from kmd.sources.base import PollResult
from kmd.sources.claims import Claim, clean_text, content_flag, iso, parse_time
from kmd.sources.config import FetchLimits, SourcePolicy
from kmd.sources.net import Fetcher
from kmd.sources.wikidata.api import Entity, Statement, WikibaseClient
from kmd.sources.wikidata.values import (END, START, current_statement, parse_time_value, render_value, start_time,
                                         value_ids)  # fmt: skip

__all__ = ["WikidataSource"]


class WikidataSource:
    """A `Source` reading watched Wikidata items through the Wikibase API."""

    def __init__(self, policy: SourcePolicy, limits: FetchLimits, fetcher: Fetcher, *,
                 sleep: Callable[[float], None] = time.sleep):  # fmt: skip
        if policy.kind != "wikidata" or policy.wikidata is None:
            raise ValueError(f"source {policy.id!r} is not a wikidata source")
        self.policy = policy
        self.watch = policy.wikidata
        self.limits = limits
        # Wikimedia's User-Agent policy: name the client and how to reach its operator.
        agent = f"{limits.user_agent} ({self.watch.contact}) httpx/{httpx.__version__}"
        self.client = WikibaseClient(policy.location, fetcher, limits.model_copy(update={"user_agent": agent}),
                                     policy.network, maxlag=self.watch.maxlag, max_retries=self.watch.max_retries,
                                     sleep=sleep)  # fmt: skip
        self.languages = tuple(dict.fromkeys((self.watch.language, "mul", "en")))

    @property
    def id(self) -> str:
        return self.policy.id

    def poll(self, cursor: Mapping[str, Any], now: datetime) -> PollResult:
        same = cursor.get("location") == self.policy.location and cursor.get("language") == self.watch.language
        stored = cursor.get("entities") if same and isinstance(cursor.get("entities"), Mapping) else {}
        seen = {q: dict(stored[q]) for q in self.watch.entities if isinstance(stored.get(q), Mapping)}
        problems: list[str] = []
        revisions, failed = self.client.entities(self.watch.entities, ["info"])
        if failed and not revisions:  # nothing read (API down, throttling that did not end): the next poll tries
            reasons = tuple(dict.fromkeys(failed.values()))
            for reason in reasons:
                logger.warning("source {}: {}", self.id, reason)
            return PollResult(self.id, problems=reasons, cursor=dict(cursor), refused=True)
        problems += [f"{qid}: {why}" for qid, why in failed.items()]
        changed = [q for q in self.watch.entities
                   if q in revisions and self._changed(revisions[q], seen.get(q), now, problems)]  # fmt: skip
        claims: list[Claim] = []
        if changed:
            claims = self._read(changed, seen, now, problems)
        for problem in problems:
            logger.warning("source {}: {}", self.id, problem)
        new_cursor = {"location": self.policy.location, "language": self.watch.language, "entities": seen}
        return PollResult(self.id, tuple(claims), tuple(problems), new_cursor, not_modified=not changed)

    # -- which items to read ----------------------------------------------------------------------
    def _changed(self, entity: Entity, before: Mapping[str, Any] | None, now: datetime, problems: list[str]) -> bool:
        qid = entity.requested_id
        if entity.missing is not None:
            problems.append(f"{qid}: no such item (deleted?)")
            return False
        if entity.redirects:
            problems.append(f"{qid} was merged into {entity.id}: reading {entity.id} (list {entity.id} in the policy)")
        if not before or before.get("rev") != entity.lastrevid:
            return True
        if not set(self.watch.properties) <= set(before.get("props") or ()):
            return True  # the policy watches a property not read at this revision
        due = before.get("due")  # a start or end time has come since it was read
        return isinstance(due, str) and parse_time(due) <= now

    # -- reading them -----------------------------------------------------------------------------
    def _read(self, changed: list[str], seen: dict[str, dict[str, Any]], now: datetime,
              problems: list[str]) -> list[Claim]:  # fmt: skip
        props = sorted(self.watch.properties)
        items, failed = self.client.entities(changed, ["info", "labels", "claims"], languages=self.languages,
                                             keep_claims=props)  # fmt: skip
        problems += [f"{qid}: {why}" for qid, why in failed.items()]  # read again at the next poll
        currents = {qid: {p: current_statement(e.claims.get(p, []), now) for p in props} for qid, e in items.items()}
        wanted = sorted({i for cs in currents.values() for c in cs.values() if c.statement
                         for i in value_ids(c.statement.mainsnak.datavalue)})  # fmt: skip
        labels: dict[str, Entity] = {}
        if wanted:
            labels, failed = self.client.entities(wanted, ["labels"], languages=self.languages)
            problems += [f"{qid}: labels not read: {why}" for qid, why in failed.items()]

        @functools.cache  # one note per item and poll, however many values name it
        def label(qid: str) -> str | None:
            return self._label(labels.get(qid), qid, problems)

        claims: list[Claim] = []
        for qid in changed:
            entity = items.get(qid)
            if entity is None:
                continue
            before = seen.get(qid) or {}
            values = dict(before.get("values") or {})
            subject = self._label(entity, qid, problems)  # a label added to the item changes its revision
            if subject is None:
                problems.append(f"{qid}: no usable label in {', '.join(self.languages)}; no claims")
            settled = True  # False: a value's item has no label yet (labelling it does not touch this item)
            for prop in props:
                current = currents[qid][prop]
                relation = self.watch.properties[prop]
                if current.statement is None:
                    logger.debug("source {}: {} {}: {}", self.id, qid, prop, current.why_none)
                    if current.why_none.startswith("ambiguous"):
                        problems.append(f"{qid} {prop} ({relation}): {current.why_none}; no claim")
                    values.pop(prop, None)
                    continue
                text, why = render_value(current.statement.mainsnak.datavalue, label)
                if text is None:
                    problems.append(f"{qid} {prop} ({relation}): {why}; no claim yet (read again at the next poll)")
                    settled = False
                    continue
                obj = self._text(text)
                if obj is None:
                    problems.append(f"{qid} {prop} ({relation}): value empty or longer than "
                                    f"{self.limits.max_field_chars} characters: refused")  # fmt: skip
                    continue
                if subject is None or (values.get(prop) or {}).get("object") == obj:
                    continue
                previous = values.get(prop)
                observed = _observed(current.statement, entity, previous, now)
                claims.append(self._claim(entity, current.statement, subject, relation, obj, observed))
                values[prop] = {"object": obj, "observed": iso(observed)}
                logger.info("source {}: {} {} ({}): {} -> {!r} (revision {})", self.id, qid, prop, relation,
                            repr(previous["object"]) if previous else "unknown", obj, entity.lastrevid)  # fmt: skip
            # Unsettled (a label missing): keep the old revision, so the next poll reads it again.
            entry: dict[str, Any] = {"rev": entity.lastrevid if settled else before.get("rev"), "props": props,
                                     "values": values}  # fmt: skip
            due = _next_boundary(entity, props, now)
            if due is not None:
                entry["due"] = iso(due)
            seen[qid] = entry
        return claims

    def _claim(self, entity: Entity, statement: Statement, subject: str, relation: str, obj: str,
               observed: datetime) -> Claim:  # fmt: skip
        return Claim(
            subject=subject,
            relation=relation,
            object=obj,
            source_id=self.id,
            url=urljoin(self.policy.location, f"index.php?oldid={entity.lastrevid}"),  # the revision read
            observed_at=observed,
            # A new revision makes a new claim even for a value seen before (a reverted
            # vandal edit must reach verification again); a re-read of one revision does not.
            ref=f"{statement.id}@{entity.lastrevid}",
            # What it says, not its bytes (docs/intake.md, independence): a mirror of the same
            # item's statement counts once for quorum, whatever statement id or revision it has.
            flags=(content_flag(subject, relation, obj, link=urljoin(self.policy.location, f"wiki/{entity.id}")),),
        )

    def _label(self, entity: Entity | None, qid: str, problems: list[str]) -> str | None:
        """The item's label in the source's language, else the next one (saying so), else None
        (the caller says so)."""
        if entity is None:
            return None
        for language in self.languages:
            found = entity.labels.get(language)
            if found is None:
                continue
            text = self._text(found.value)
            if text is None:
                problems.append(f"{qid}: its {language!r} label is empty or longer than {self.limits.max_field_chars} "
                                "characters: refused")  # fmt: skip
                return None
            if language != self.watch.language:
                problems.append(f"{qid}: no {self.watch.language!r} label; used its {language!r} label {text!r}")
            return text
        return None

    def _text(self, value: str) -> str | None:
        """Source text as claim text; over-long text is refused, never cut."""
        text = clean_text(value)
        return text if text and len(text) <= self.limits.max_field_chars else None


def _observed(statement: Statement, entity: Entity, previous: Mapping[str, Any] | None, now: datetime) -> datetime:
    """When the value was said to be true: its start time, when later than the value it
    replaces (a year-precision start can be earlier than what kmd saw last), else the
    revision's time; never later than now."""
    revised = min(entity.modified or now, now)
    start = start_time(statement)
    before = parse_time(previous["observed"]) if previous and isinstance(previous.get("observed"), str) else None
    if start is not None and start <= now and (before is None or start > before):
        return start
    return revised


def _next_boundary(entity: Entity, props: list[str], now: datetime) -> datetime | None:
    """The earliest start or end time still to come among the watched statements."""
    times = [
        t
        for prop in props
        for statement in entity.claims.get(prop, [])
        if statement.rank != "deprecated"
        for qualifier in (START, END)
        for snak in statement.qualifiers.get(qualifier, [])
        if snak.datavalue is not None and (t := parse_time_value(snak.datavalue.value)) is not None and t > now
    ]
    return min(times, default=None)
