"""Feed parsing and the fact convention (bytes in, claims out, never a crash)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from intake.helpers import Route, atom, make_policy
from kmd.daemon.edit_request import build_edit_request
from kmd.editors.protocol import EditRequest
from kmd.sources.config import FetchLimits
from kmd.sources.feeds import FeedSource, parse_feed
from kmd.sources.net import SafeFetcher

NOW = datetime(2025, 1, 1, tzinfo=UTC)
FEED = """\
  - id: wire
    kind: feed
    location: https://wire.example/feed
    trust: medium
    relations: [capital, ceo]
    on_malformed: {mode}
    extract:
      - field: title
        relation: capital
        pattern: '^(?P<subject>[A-Z][a-z]+) moves its capital to (?P<object>[A-Z][a-z]+)$'
      - field: summary
        relation: ceo
        pattern: '(?P<subject>[A-Z]\\w+) names (?P<object>[A-Z][\\w ]+?) as chief executive'
"""


def source(mode: str = "reject"):
    return make_policy(FEED.format(mode=mode)).source("wire")


def parse(body: bytes, mode: str = "reject", **limits):
    return parse_feed(body, source(mode), FetchLimits(**limits), url="https://wire.example/feed", fetched_at=NOW)


def test_structured_facts_in_atom():
    body = atom([
        {"subject": "France", "relation": "capital", "object": "Paris", "observed": "2024-06-01T00:00:00Z"},
        {"subject": "Acme &amp; Co", "relation": "ceo", "object": "Jane <b>Doe</b>"},
    ], prefix="anything")  # fmt: skip
    parsed = parse(body)
    assert not parsed.malformed and not parsed.problems
    first, second = parsed.claims
    assert (first.subject, first.relation, first.object) == ("France", "capital", "Paris")
    assert first.observed_at == datetime(2024, 6, 1, tzinfo=UTC)
    assert first.url == "https://example.org/e0" and first.ref == "urn:e0" and first.source_id == "wire"
    assert second.subject == "Acme & Co" and second.object == "Jane <b>Doe</b>"  # data, kept as text
    assert second.observed_at == datetime(2024, 12, 1, tzinfo=UTC)  # from <updated>


def test_structured_facts_in_rss():
    body = b"""<?xml version="1.0"?><rss version="2.0" xmlns:k="urn:kmd:fact:1"><channel><title>r</title>
      <item><title>x</title><guid>g1</guid><k:subject>Spain</k:subject><k:relation>capital</k:relation>
      <k:object>Madrid</k:object></item></channel></rss>"""
    (claim,) = parse(body).claims
    assert (claim.subject, claim.object, claim.ref) == ("Spain", "Madrid", "g1")
    assert claim.observed_at == NOW  # no date in the entry: the fetch time


def test_extraction_patterns_on_prose():
    body = b"""<?xml version="1.0"?><rss version="2.0"><channel><title>r</title>
      <item><title>Freedonia moves its capital to Newtown</title><guid>a</guid></item>
      <item><title>Weather today</title><guid>b</guid>
        <description>&lt;p&gt;Acme names &lt;b&gt;Jane Roe&lt;/b&gt; as chief executive.&lt;/p&gt;</description></item>
      </channel></rss>"""
    claims = parse(body).claims
    assert [(c.subject, c.relation, c.object) for c in claims] == [
        ("Freedonia", "capital", "Newtown"), ("Acme", "ceo", "Jane Roe")]  # fmt: skip


def test_malformed_feed_rejected_or_downweighted_by_policy():
    body = atom([{"subject": "France", "relation": "capital", "object": "Paris"}])[:-7]  # no </feed>
    rejected = parse(body, "reject")
    assert rejected.malformed and rejected.claims == [] and "rejected by policy" in rejected.problems[0]
    kept = parse(body, "downweight")
    assert kept.malformed and [c.flags[0] for c in kept.claims] == ["malformed"]
    assert "down-weighted" in kept.problems[0]


@pytest.mark.parametrize("body", [b"", b"\x00\xff\xfe garbage", b"<html><body>not a feed", b"<?xml version='1.0'?><rss>",
                                  b"<!DOCTYPE x [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;&a;&a;'>]><rss>&b;</rss>"])  # fmt: skip
def test_garbage_never_crashes(body):
    for mode in ("reject", "downweight"):
        parsed = parse(body, mode)
        assert parsed.claims == []


def test_only_bytes_are_parsed():
    with pytest.raises(TypeError):
        parse_feed("/etc/passwd", source(), FetchLimits(), url="x", fetched_at=NOW)  # type: ignore[arg-type]


def test_caps_on_entries_and_fields():
    many = atom([{"subject": f"S{i}", "relation": "capital", "object": f"O{i}"} for i in range(30)])
    parsed = parse(many, max_entries=10)
    assert len(parsed.claims) == 10 and "only the first 10" in parsed.problems[0]
    long = atom([{"subject": "S", "relation": "capital", "object": "x" * 500},
                 {"subject": "T", "relation": "capital", "object": "ok"}])  # fmt: skip
    parsed = parse(long, max_field_chars=100)
    assert [c.subject for c in parsed.claims] == ["T"]  # refused, not truncated
    assert "longer than 100" in parsed.problems[0]


def test_incomplete_facts_are_reported():
    parsed = parse(atom([{"subject": "France", "relation": "capital"}]))
    assert parsed.claims == [] and "missing ['object']" in parsed.problems[0]


def test_future_dates_are_clamped_to_fetch_time():
    body = atom([{"subject": "A", "relation": "capital", "object": "B", "observed": "2999-01-01T00:00:00Z"}])
    (claim,) = parse(body).claims
    assert claim.observed_at == NOW


def test_control_characters_are_removed_and_text_is_data():
    body = atom([{"subject": "{subject}\u202e {0.__class__}", "relation": "capital", "object": "Par\u200bis\u2028"}])
    (claim,) = parse(body).claims
    assert claim.object == "Paris" and claim.subject == "{subject} {0.__class__}"
    policy = make_policy(FEED.format(mode="reject"))
    request = build_edit_request(claim, policy.relation(claim.relation))
    assert request == EditRequest(
        prompt="The capital of {subject} {0.__class__} is",
        target="Paris",
        subject="{subject} {0.__class__}",
        rephrases=("{subject} {0.__class__}'s capital city is",),
    )


def test_feed_source_conditional_get(server):
    server.routes["/feed"] = Route(atom([{"subject": "France", "relation": "capital", "object": "Paris"}]), etag='"1"')
    policy = make_policy(
        f"""\
  - id: local
    kind: feed
    location: {server.url('/feed')}
    trust: high
    relations: [capital]
    network: {{allow_networks: ["127.0.0.0/8"]}}
"""
    )
    with SafeFetcher() as fetcher:
        feed = FeedSource(policy.source("local"), policy.fetch, fetcher)
        first = feed.poll({}, NOW)
        assert len(first.claims) == 1 and first.cursor["etag"] == '"1"'
        second = feed.poll(first.cursor, NOW)
        assert second.not_modified and second.claims == ()
        assert server.requests[-1][1]["if-none-match"] == '"1"'


# -- malformed text (issue 27, case 3) ----------------------------------------------------------


def test_invalid_utf8_in_a_feed_declared_utf8_is_malformed():
    """The bytes were decoded as windows-1252 instead ("Tokÿþyo Ã(" became a fact under
    on_malformed: reject): feedparser's CharacterEncodingOverride is not harmless."""
    body = atom([{"subject": "Japan", "relation": "capital", "object": "TOKYO"}]).replace(b"TOKYO", b"Tok\xff\xfeyo \xc3(")
    rejected = parse(body, "reject")
    assert rejected.malformed and rejected.claims == []
    assert "declared as utf-8" in rejected.problems[0] and "rejected by policy" in rejected.problems[0]
    kept = parse(body, "downweight")
    assert kept.malformed and all("malformed" in c.flags for c in kept.claims)


@pytest.mark.parametrize("ref", ["&#xD800;", "&#55296;", "&#x110000;", "&#1;", "&#xFFFE;", "&#99999999999999999;",
                                 "&#x" + "f" * 5000 + ";"])  # fmt: skip
def test_an_invalid_character_reference_costs_only_its_entry(ref):
    """One `&#xD800;` made the whole feed unparseable (UnicodeEncodeError): every good entry was lost."""
    facts = [{"subject": s, "relation": "capital", "object": o} for s, o in (("France", "Paris"), ("Japan", "TOKYO"),
                                                                             ("Spain", "Madrid"))]  # fmt: skip
    body = atom(facts).replace(b"TOKYO", f"To{ref}kyo".encode())
    for mode in ("reject", "downweight"):
        parsed = parse(body, mode)
        assert [(c.subject, c.object) for c in parsed.claims] == [("France", "Paris"), ("Spain", "Madrid")], parsed.problems
        assert not parsed.malformed
        assert any("urn:e1" in p and "invalid character" in p for p in parsed.problems), parsed.problems
    # elsewhere in an entry (not a fact field) it costs nothing
    titled = parse(atom([{"subject": "Japan", "relation": "capital", "object": "Tokyo", "title": "TITLE"}])
                   .replace(b"TITLE", f"bad {ref}".encode()))  # fmt: skip
    assert [(c.subject, c.object) for c in titled.claims] == [("Japan", "Tokyo")]


def test_an_invalid_character_in_prose_costs_only_its_claim():
    body = b"""<?xml version="1.0"?><rss version="2.0"><channel><title>r</title>
      <item><title>Freedonia moves its capital to New&#xD800;town</title><guid>a</guid></item>
      <item><title>Sylvania moves its capital to Oldtown</title><guid>b</guid></item>
      </channel></rss>"""
    parsed = parse(body)
    assert [(c.subject, c.object) for c in parsed.claims] == [("Sylvania", "Oldtown")]
