"""The sources hand claims to a sink; they never write to the ledger themselves."""

from __future__ import annotations

from datetime import UTC, datetime

from intake.helpers import make_policy

from kmd.daemon.intake import LedgerSink
from kmd.daemon.ledger import Ledger
from kmd.sources.base import MemorySink, MemorySource
from kmd.sources.claims import Claim
from kmd.sources.intake import Intake

NOW = datetime(2025, 1, 1, tzinfo=UTC)
POLICY = make_policy("""\
  - id: mem
    kind: feed
    location: https://feeds.example.org/mem
    trust: high
    relations: [capital]
""")


def _claim(obj: str) -> Claim:
    return Claim("France", "capital", obj, "mem", "https://feeds.example.org/mem", observed_at=NOW, ref=obj)


def test_intake_hands_claims_and_cursor_to_a_memory_sink():
    sink, source = MemorySink(), MemorySource("mem", [_claim("Paris"), _claim("Paris"), _claim("Lyon")])
    with Intake(POLICY, sink, sources={"mem": source}, clock=lambda: NOW) as intake:
        (report,) = intake.poll_many(["mem"])
        assert (report.new_claims, report.duplicates) == (2, 0)  # one restatement dropped by hash in the batch
        assert {c.object for c, channel in sink.claims.values()} == {"Paris", "Lyon"}
        assert {channel for _, channel in sink.claims.values()} == {"feed"}
        assert sink.load_cursor("mem")["last_poll"].startswith("2025-01-01")
        source.add(_claim("Paris"))
        (again,) = intake.poll_many(["mem"])
        assert (again.new_claims, again.duplicates) == (0, 1)


def test_the_ledger_sink_stores_claims_and_cursor_together():
    ledger = Ledger.in_memory()
    sink = LedgerSink(ledger, POLICY.version_tag)
    stored = sink.store("mem", [_claim("Paris")], {"etag": '"1"'}, channel="feed")
    assert len(stored.new_ids) == 1 and stored.duplicates == 0
    (claim,) = ledger.claims()
    assert claim.policy_version == POLICY.version_tag and "via:feed" in claim.flags
    assert ledger.load_cursor("mem") == {"etag": '"1"'}
    assert sink.store("mem", [_claim("Paris")], {"etag": '"2"'}, channel="feed").duplicates == 1
    assert ledger.verify_chain().ok
