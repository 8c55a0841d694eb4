"""RSS and Atom feeds: fetch under limits, parse the bytes, turn entries into claims.

The fact convention (documented in docs/intake.md). An entry states one fact with three
elements in the namespace `urn:kmd:fact:1` (any prefix), plus an optional observation time:

    <entry xmlns:kf="urn:kmd:fact:1">
      <kf:subject>France</kf:subject>
      <kf:relation>capital</kf:relation>
      <kf:object>Paris</kf:object>
      <kf:observed>2024-05-01T12:00:00Z</kf:observed>   <!-- optional -->
    </entry>

Feeds written as prose are read with the source's extraction patterns from the policy:
regular expressions (RE2, `kmd.sources.extraction`) over the title, summary or content
(HTML stripped) whose named groups `subject` and `object` give the fact, for the pattern's
relation. Entries that state no fact either way are counted (`ParsedFeed.unmatched`), not
reported as problems: most of an ordinary news feed is not about the watched relations.

Everything taken from an entry is data: cleaned, length-capped (fields over the cap are
refused, not truncated, so a fact is never silently changed) and never interpreted.
"""

from __future__ import annotations

import calendar
import html
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from dataclasses import dataclass

import feedparser
from loguru import logger

from kmd.sources.base import PollResult
from kmd.sources.claims import Claim, clean_text, content_flag, parse_time
from kmd.sources.config import FetchLimits, SourcePolicy
from kmd.sources.extraction import match_rules
from kmd.sources.net import FetchError, Fetcher

__all__ = ["FACT_NAMESPACE", "EntryOutcome", "FeedSource", "ParsedFeed", "parse_feed"]

FACT_NAMESPACE = "urn:kmd:fact:1"
_TAG_RE = re.compile(r"<[^>]*>")
# Every bozo feed is malformed, CharacterEncodingOverride included: bytes that are not in
# the declared encoding were decoded as another one, so the text is not what was sent.
_CHARREF_RE = re.compile(rb"&#(?:[xX]([0-9A-Fa-f]+)|([0-9]+));")
_REFUSED_CHAR = "\ufffd"  # what an invalid character reference becomes; refused in a fact


def _xml_char(code: int) -> bool:
    return code in (0x9, 0xA, 0xD) or 0x20 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD or 0x10000 <= code <= 0x10FFFF


def _neutralise_charrefs(body: bytes) -> bytes:
    """Character references to code points no XML text may hold (`&#xD800;`, `&#1;`, past
    U+10FFFF) become U+FFFD: left in, the strict parser refuses the whole document and
    feedparser's fallback parser raises, losing every entry. A fact field holding U+FFFD
    is refused, so such a reference costs only its entry."""

    def fix(match: re.Match[bytes]) -> bytes:
        hex_digits, digits = match.groups()
        text = (hex_digits or digits).lstrip(b"0") or b"0"
        code = int(text, 16 if hex_digits else 10) if len(text) <= 8 else -1
        return match.group(0) if _xml_char(code) else b"&#xFFFD;"

    return _CHARREF_RE.sub(fix, body)


@dataclass(frozen=True)
class EntryOutcome:
    """What one entry gave: claims from `kf:` elements, and from each extraction rule that
    matched (the rule's index in the source's `extract` list)."""

    ref: str
    title: str
    element_claims: tuple[Claim, ...] = ()
    rule_claims: tuple[tuple[int, Claim], ...] = ()

    @property
    def matched(self) -> bool:
        return bool(self.element_claims or self.rule_claims)


class ParsedFeed:
    """What one feed body yielded."""

    def __init__(self, claims: list[Claim], problems: list[str], malformed: bool, entries: int,
                 outcomes: list[EntryOutcome] | None = None):  # fmt: skip
        self.claims = claims
        self.problems = problems
        self.malformed = malformed
        self.entries = entries  # entries looked at (after the cap)
        self.outcomes = outcomes or []  # per entry looked at, in feed order

    @property
    def unmatched(self) -> int:
        """Entries that stated no fact (no `kf:` elements, no extraction rule matched)."""
        return sum(not o.matched for o in self.outcomes)


def _text(value: Any, limit: int) -> str:
    """An entry field as plain text, HTML tags removed, cut to `limit` characters.

    Used only for text that patterns search; fact fields use `_fact_field`, which refuses
    over-long values instead of cutting them.
    """
    if not isinstance(value, str):
        return ""
    return clean_text(html.unescape(_TAG_RE.sub(" ", value[: limit * 4])))[:limit]


def _rule_fields(entry: Mapping[str, Any], source: SourcePolicy, limits: FetchLimits) -> dict[str, str]:
    """The plain text of each entry field the source's extraction rules read."""
    fields: dict[str, str] = {}
    for name in {rule.field for rule in source.extract}:
        if name == "content":
            contents = entry.get("content") or []
            raw = contents[0].get("value") if contents and isinstance(contents[0], Mapping) else None
        else:
            raw = entry.get(name)
        fields[name] = _text(raw, limits.max_field_chars)
    return fields


def _fact_field(value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise ValueError("not text")
    # feedparser leaves entities escaped in some (loose-parser) paths; unescape once.
    text = clean_text(html.unescape(value))
    if not text:
        raise ValueError("empty")
    if _REFUSED_CHAR in text:
        raise ValueError("invalid character (an undecodable byte or a bad character reference)")
    if len(text) > limit:
        raise ValueError(f"longer than {limit} characters")
    return text


def _entry_time(entry: Mapping[str, Any], observed: str | None, fetched_at: datetime) -> datetime:
    """When the entry says the fact was true; never later than when we fetched it.

    Clamping to the fetch time stops a feed from post-dating a claim to win supersession.
    """
    when: datetime | None = None
    if observed:
        try:
            when = parse_time(observed.strip())
        except ValueError:
            when = None
    if when is None:
        for key in ("updated_parsed", "published_parsed"):
            st = entry.get(key)
            if st:
                when = datetime.fromtimestamp(calendar.timegm(st), UTC)
                break
    if when is None or when > fetched_at:
        return fetched_at
    return when


def _summary(entry: Mapping[str, Any]) -> str:
    """The entry's summary (else its content) as plain text: part of what it says, for
    `content_flag` (whole, not cut to the field cap, which differs between sources)."""
    raw = entry.get("summary")
    if not isinstance(raw, str):
        contents = entry.get("content") or []
        raw = contents[0].get("value") if contents and isinstance(contents[0], Mapping) else None
    return clean_text(html.unescape(_TAG_RE.sub(" ", raw))) if isinstance(raw, str) else ""


def parse_feed(
    body: bytes,
    source: SourcePolicy,
    limits: FetchLimits,
    *,
    url: str,
    fetched_at: datetime,
) -> ParsedFeed:
    """Parse feed bytes and extract claims. Never raises on bad input; problems are listed."""
    if not isinstance(body, bytes):  # a str would be taken as a path or URL by feedparser
        raise TypeError("parse_feed takes the fetched bytes, never text")
    try:
        parsed = feedparser.parse(_neutralise_charrefs(body))
    except Exception as exc:  # feedparser is meant not to raise; if it does, the feed is bad
        return ParsedFeed([], [f"unparseable feed: {type(exc).__name__}: {exc}"], True, 0)

    problems: list[str] = []
    malformed = bool(parsed.get("bozo"))
    if malformed:
        reason = f"malformed feed ({type(parsed.get('bozo_exception')).__name__}: {parsed.get('bozo_exception')})"
        if source.on_malformed == "reject":
            return ParsedFeed([], [reason + "; rejected by policy"], True, 0)
        problems.append(reason + "; claims down-weighted by policy")

    entries = parsed.get("entries") or []
    if len(entries) > limits.max_entries:
        problems.append(f"{len(entries)} entries; only the first {limits.max_entries} are read")
        entries = entries[: limits.max_entries]
    prefixes = [p for p, uri in (parsed.get("namespaces") or {}).items() if uri == FACT_NAMESPACE and p]
    flags = ("malformed",) if malformed else ()

    claims: list[Claim] = []
    outcomes: list[EntryOutcome] = []
    for index, entry in enumerate(entries):
        ref = entry.get("id") or entry.get("link") or f"#{index}"
        ref = ref if isinstance(ref, str) else f"#{index}"
        link = entry.get("link") if isinstance(entry.get("link"), str) else url
        where = f"entry {ref[:80]!r}"
        # What the entry says (not its bytes): two sources delivering it are one for quorum
        # (kmd.daemon.independence), whatever id, title or dates a copy was given.
        summary, target = _summary(entry), link if isinstance(entry.get("link"), str) else ""
        element_claims: list[Claim] = []
        for prefix in prefixes:
            fields = {name: entry.get(f"{prefix}_{name}") for name in ("subject", "relation", "object")}
            present = [k for k, v in fields.items() if v is not None]
            if not present:
                continue
            if len(present) < 3:
                problems.append(f"{where}: incomplete fact, missing {sorted(set(fields) - set(present))}")
                continue
            try:
                values = {k: _fact_field(v, limits.max_field_chars) for k, v in fields.items()}
            except ValueError as exc:
                problems.append(f"{where}: fact field refused: {exc}")
                continue
            observed = entry.get(f"{prefix}_observed")
            element_claims.append(
                Claim(
                    subject=values["subject"],
                    relation=values["relation"],
                    object=values["object"],
                    source_id=source.id,
                    url=link[: limits.max_field_chars],
                    observed_at=_entry_time(entry, observed if isinstance(observed, str) else None, fetched_at),
                    ref=ref[: limits.max_field_chars],
                    flags=flags + (content_flag(values["subject"], values["relation"], values["object"], text=summary,
                                                link=target),),  # fmt: skip
                )
            )
        rule_claims = []
        for m in match_rules(source.extract, _rule_fields(entry, source, limits)):
            if _REFUSED_CHAR in m.subject + m.object:
                problems.append(f"{where}: {m.field}: invalid character (an undecodable byte or a bad character reference)")
                continue
            claim = Claim(subject=m.subject, relation=m.relation, object=m.object, source_id=source.id,
                          url=link[: limits.max_field_chars], observed_at=_entry_time(entry, None, fetched_at),
                          ref=f"{ref[: limits.max_field_chars]}#{m.field}:{m.relation}",
                          flags=flags + (content_flag(m.subject, m.relation, m.object, text=summary, link=target),))  # fmt: skip
            rule_claims.append((m.rule, claim))
        claims += element_claims + [c for _, c in rule_claims]
        title = _text(entry.get("title"), 200)
        outcomes.append(EntryOutcome(ref[:200], title, tuple(element_claims), tuple(rule_claims)))
    return ParsedFeed(claims, problems, malformed, len(entries), outcomes)


class FeedSource:
    """A `Source` for one RSS/Atom feed, with conditional GET across polls."""

    def __init__(self, policy: SourcePolicy, limits: FetchLimits, fetcher: Fetcher):
        if policy.kind != "feed":
            raise ValueError(f"source {policy.id!r} is not a feed")
        self.policy = policy
        self.limits = limits
        self._fetcher = fetcher

    @property
    def id(self) -> str:
        return self.policy.id

    def poll(self, cursor: Mapping[str, Any], now: datetime) -> PollResult:
        # Validators are only sent for the URL they came from: a changed location starts fresh.
        same = cursor.get("location") == self.policy.location
        etag = cursor.get("etag") if same else None
        last_modified = cursor.get("last_modified") if same else None
        try:
            result = self._fetcher.fetch(
                self.policy.location,
                limits=self.limits,
                network=self.policy.network,
                etag=etag,
                last_modified=last_modified,
            )
        except FetchError as exc:
            logger.warning("source {}: fetch refused or failed: {}", self.id, exc)
            return PollResult(self.id, problems=(str(exc),), cursor=dict(cursor), refused=True)
        if result.not_modified:
            logger.debug("source {}: not modified", self.id)
            return PollResult(self.id, cursor=dict(cursor), not_modified=True)
        parsed = parse_feed(result.body, self.policy, self.limits, url=result.url, fetched_at=now)
        for problem in parsed.problems:
            logger.warning("source {}: {}", self.id, problem)
        if parsed.unmatched:
            logger.info("source {}: {} of {} entries stated no fact (no kf: elements, no extraction rule matched)",
                        self.id, parsed.unmatched, parsed.entries)  # fmt: skip
        new_cursor = {"location": self.policy.location, "etag": result.etag, "last_modified": result.last_modified}
        refused = parsed.malformed and self.policy.on_malformed == "reject"
        return PollResult(self.id, tuple(parsed.claims), tuple(parsed.problems), new_cursor, refused=refused,
                          unmatched=parsed.unmatched)  # fmt: skip
