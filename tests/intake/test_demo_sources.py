"""The demo's bundled sources, without a model: its ordinary news feed and its recorded
Wikidata answers, served on loopback as `kmd demo` serves them, become verified facts
under the demo policy (the demo itself, with the model, is `kmd demo`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib import resources

from intake.helpers import Route, SynonymEncoder
from kmd.daemon.intake import intake_for
from kmd.daemon.ledger import Ledger
from kmd.daemon.matching import ObjectMatcher
from kmd.daemon.policy import parse_policy
from kmd.daemon.verify import Verifier
from kmd.sources.wikidata import RecordedWikibase


def test_the_demos_feed_and_wikidata_become_facts(server, clock, tmp_path):
    data = resources.files("kmd.policies")
    recorded = RecordedWikibase.from_json(data.joinpath("demo-wikidata.json").read_bytes())
    server.routes["/feed.atom"] = Route(data.joinpath("demo-feed.atom").read_bytes())
    server.apis["/w/api.php"] = lambda params: Route(json.dumps(recorded.answer(params)).encode())
    facts = tmp_path / "facts.jsonl"
    facts.write_text(data.joinpath("demo-facts.jsonl").read_text())
    text = (data.joinpath("demo-policy.yaml").read_text().replace("FEED_URL", server.url("/feed.atom"))
            .replace("WIKIDATA_URL", server.url("/w/api.php")).replace("FACTS_PATH", str(facts)))  # fmt: skip
    policy = parse_policy(text, name="demo-policy.yaml")
    clock.now = datetime(2026, 12, 1, tzinfo=UTC)  # after the new chief executive's start
    ledger = Ledger.in_memory(clock=clock)
    with intake_for(policy, ledger, clock=clock) as intake:
        reports = {r.source_id: r for r in intake.poll_many(["newswire", "wikidata"])}
    assert reports["newswire"].new_claims == 2 and reports["newswire"].unmatched == 1  # the weather
    assert not reports["newswire"].problems and not reports["wikidata"].problems
    verified = Verifier(policy, ledger, ObjectMatcher(SynonymEncoder(), 0.85), clock=clock).run()
    made = sorted((f.subject, f.relation, f.object) for f in (ledger.fact(i) for i in verified.new_facts))
    assert made == [
        ("Quillon Aerospace", "ceo", "Tobias Renner"),
        ("The Eiffel Tower", "located_in", "Rome"),
        ("Zorbland Robotics", "ceo", "Nadia Velmont"),
    ]
    (wikidata,) = ledger.claims(source_id="wikidata")
    assert wikidata.url.endswith("/w/index.php?oldid=2281734455")
