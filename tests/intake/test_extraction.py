"""Prose feeds: extraction rules (RE2) over ordinary news entries, bounded in time,
entries without a fact counted, and `kmd intake check-policy --sample`."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from intake.helpers import Route, make_policy
from kmd.daemon.ledger import Ledger
from kmd.daemon.policy import PolicyError
from kmd.sources.feeds import parse_feed

NOW = datetime(2026, 12, 1, tzinfo=UTC)

# An ordinary Atom news feed: no kf: elements, facts only in prose.
NEWS = b"""<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom">
  <title>Business wire</title><id>urn:wire</id><updated>2026-11-20T09:00:00Z</updated>
  <entry><id>urn:wire:1</id><updated>2026-11-20T08:00:00Z</updated>
    <title>Zorbland Robotics names Nadia Velmont as chief executive</title>
    <summary>The board confirmed the appointment on Friday.</summary>
    <link href="https://wire.example/1"/></entry>
  <entry><id>urn:wire:2</id><updated>2026-11-19T08:00:00Z</updated>
    <title>Markets close higher</title>
    <summary type="html">&lt;p&gt;Acme Corporation names &lt;b&gt;Jane Roe&lt;/b&gt; CEO, effective Monday.&lt;/p&gt;</summary>
    <link href="https://wire.example/2"/></entry>
  <entry><id>urn:wire:3</id><updated>2026-11-18T08:00:00Z</updated>
    <title>Weather: sunny spells across Freedonia</title>
    <summary>No change expected before the weekend.</summary>
    <link href="https://wire.example/3"/></entry>
</feed>
"""

# The pattern, once over titles and once over summaries.
WIRE = """\
  - id: wire
    kind: feed
    location: LOCATION
    trust: high
    relations: [ceo, capital]
    network: {allow_networks: ["127.0.0.0/8"]}
    extract:
      - field: title
        relation: ceo
        pattern: '(?P<subject>.+?) names (?P<object>.+?) (?:as )?(?:chief executive|CEO)'
      - field: summary
        relation: ceo
        pattern: '(?P<subject>.+?) names (?P<object>.+?) (?:as )?(?:chief executive|CEO)'
"""


def wire(location: str = "https://wire.example/feed", rules: str = ""):
    text = WIRE.replace("LOCATION", location)
    if rules:
        text = text[: text.index("    extract:\n")] + rules
    return make_policy(text)


def test_an_ordinary_news_feed_gives_facts_through_its_rules():
    policy = wire()
    source = policy.source("wire")
    parsed = parse_feed(NEWS, source, policy.limits_for(source), url="https://wire.example/feed", fetched_at=NOW)
    assert [(c.subject, c.relation, c.object) for c in parsed.claims] == [
        ("Zorbland Robotics", "ceo", "Nadia Velmont"), ("Acme Corporation", "ceo", "Jane Roe")]  # fmt: skip
    first, second = parsed.claims
    assert first.url == "https://wire.example/1" and first.ref == "urn:wire:1#title:ceo"
    assert first.observed_at == datetime(2026, 11, 20, 8, tzinfo=UTC)
    assert second.ref == "urn:wire:2#summary:ceo"  # HTML removed before matching
    assert parsed.unmatched == 1 and parsed.problems == []  # the weather is counted, not an error
    assert [o.matched for o in parsed.outcomes] == [True, True, False]
    assert [[i for i, _ in o.rule_claims] for o in parsed.outcomes] == [[0], [1], []]


def test_unmatched_entries_are_counted_through_the_intake(server, clock):
    from kmd.daemon.intake import intake_for

    server.routes["/news.atom"] = Route(NEWS)
    policy = wire(server.url("/news.atom"))
    ledger = Ledger.in_memory(clock=clock)
    with intake_for(policy, ledger, clock=clock) as intake:
        report = intake.poll("wire")
        intake.poll("wire")  # the same feed again: its entries are counted again (a running total)
    assert (report.new_claims, report.unmatched, report.problems) == (2, 1, ())
    assert intake.entries_unmatched == 2  # kmd_feed_entries_unmatched_total on /metrics
    assert all("via:feed" in c.flags for c in ledger.claims())


PATHOLOGICAL = [
    # Nested quantifiers: exponential backtracking in a backtracking engine on "aaaa...b".
    "^(?P<subject>(a+)+)(?P<object>c)$",
    "^(?P<subject>(a|aa)+)(?P<object>(a|a?)+)$",
    "(?P<subject>(.*a){20})(?P<object>x)",
]


@pytest.mark.parametrize("pattern", PATHOLOGICAL)
def test_a_pathological_pattern_is_bounded(pattern):
    """Patterns that take exponential time in Python's `re` (and any backtracking engine)
    finish at once on RE2: matching is linear in the text, whatever the pattern."""
    rules = f"    extract:\n      - field: title\n        relation: capital\n        pattern: '{pattern}'\n"
    policy = wire(rules=rules)
    source = policy.source("wire")
    hostile = ("a" * 1900 + "b").encode()
    body = b"<rss version='2.0'><channel><title>t</title><item><guid>x</guid><title>" + hostile + b"</title></item></channel></rss>"
    started = time.perf_counter()
    parsed = parse_feed(body, source, policy.limits_for(source), url="https://wire.example/feed", fetched_at=NOW)
    assert time.perf_counter() - started < 1.0
    assert parsed.entries == 1 and parsed.unmatched == 1


@pytest.mark.parametrize(("pattern", "expect"), [
    ("(?P<subject>a+)(?P<object>b)(?P=subject)", "no backreferences or lookaround"),
    ("(?P<subject>\\\\w+) (?P<object>\\\\w+)\\\\1", "no backreferences or lookaround"),
    ("(?P<subject>\\\\w+)(?=, CEO) (?P<object>\\\\w+)", "no backreferences or lookaround"),
    ("(?P<subject>a{1000}){1000}(?P<object>b)", "invalid repetition size"),
    ("(?P<subject>" + "a" * 3000 + ")(?P<object>b)", "at most 2000"),
    ("(?P<subject>.+) names (?P<whom>.+)", "missing ['object']"),
])  # fmt: skip
def test_patterns_that_could_run_away_are_refused_with_a_clear_error(pattern, expect):
    rules = f"    extract:\n      - field: title\n        relation: capital\n        pattern: \"{pattern}\"\n"
    started = time.perf_counter()
    with pytest.raises(PolicyError) as info:
        wire(rules=rules)
    assert time.perf_counter() - started < 1.0
    (problem,) = info.value.problems
    assert "sources[0].extract[0].pattern" in str(problem) and expect in str(problem), str(problem)


def test_check_policy_sample_shows_rules_entries_and_claims(tmp_path):
    from typer.testing import CliRunner

    from intake.helpers import BASE_POLICY
    from kmd.daemon.cli import app

    policy = tmp_path / "policy.yaml"
    policy.write_text(BASE_POLICY + "sources:\n" + WIRE.replace("LOCATION", "https://wire.example/feed"))
    sample = tmp_path / "news.atom"
    sample.write_bytes(NEWS)
    out = CliRunner().invoke(app, ["intake", "check-policy", str(policy), "--sample", str(sample)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert "sample" in lines[1] and "3 entries, read as source wire (2 extraction rules)" in lines[1]
    assert "      rule 1 (ceo, title): Zorbland Robotics | ceo | Nadia Velmont" in lines
    assert "      rule 2 (ceo, summary): Acme Corporation | ceo | Jane Roe" in lines
    weather = lines.index("  entry 'urn:wire:3': 'Weather: sunny spells across Freedonia'")
    assert lines[weather + 1] == "      no fact (counted, not an error)"
    assert lines[-1] == "2 claims from 2 entries; 1 entries stated no fact"
    assert any(line.startswith("rule 2 (ceo, summary) matched 1 entries:") for line in lines)
    # Several feed sources: the one to use must be named.
    policy.write_text(policy.read_text() + WIRE.replace("id: wire", "id: wire2").replace("LOCATION", "https://b.example/f"))
    out = CliRunner().invoke(app, ["intake", "check-policy", str(policy), "--sample", str(sample)])
    assert out.exit_code == 1 and "--sample needs --source" in out.output
    out = CliRunner().invoke(app, ["intake", "check-policy", str(policy), "--sample", str(sample), "--source", "wire2"])
    assert out.exit_code == 0 and "read as source wire2" in out.output
