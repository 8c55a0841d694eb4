"""The `wikidata` source against recorded `wbgetentities` answers served on loopback.

The entity documents (tests/intake/data/wikidata.json) are in the documented JSON format;
`RecordedWikibase` answers each request from them the way the API does (props, languages,
missing ids, merged ids, the 50-id limit), and the tests add failures in front of it
(maxlag, 429, 503)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from intake.helpers import Route, SynonymEncoder
from kmd.daemon.intake import LedgerSink, intake_for
from kmd.daemon.ledger import Ledger
from kmd.daemon.matching import ObjectMatcher
from kmd.daemon.policy import PolicyError, parse_policy
from kmd.daemon.verify import Verifier
from kmd.sources.base import MemorySink
from kmd.sources.net import SafeFetcher
from kmd.sources.wikidata import RecordedWikibase, WikidataSource

DATA = Path(__file__).parent / "data" / "wikidata.json"
NOW = datetime(2026, 12, 1, tzinfo=UTC)
PROPERTIES = "{P169: ceo, P159: headquarters, P571: founded, P36: capital, P2048: height}"

POLICY = """\
version: wd-1
backend: fake
relations:
  ceo: {prompt: "The chief executive of {subject} is"}
  headquarters: {prompt: "The headquarters of {subject} are in"}
  founded: {prompt: "{subject} was founded in"}
  capital: {prompt: "The capital of {subject} is"}
  height: {prompt: "The height of {subject} is"}
sources:
  - id: wikidata
    kind: wikidata
    location: URL
    trust: TRUST
    relations: [ceo, headquarters, founded, capital, height]
NETWORK    wikidata:
      entities: ENTITIES
      properties: PROPERTIES
      contact: kmd-tests@example.org
WATCH
EXTRA
verification:
  quorum: 2
  single_source_trust: high
"""


def policy_text(url: str, entities: list[str], *, trust: str = "high", extra: str = "", properties: str = PROPERTIES,
                watch: str = "", loopback: bool = True, template: str = POLICY) -> str:
    """The test policy; `watch`: more keys of the wikidata: section, `extra`: more source keys."""
    network = '    network: {allow_networks: ["127.0.0.0/8"]}\n' if loopback else ""
    return (template.replace("URL", url).replace("TRUST", trust).replace("ENTITIES", json.dumps(entities))
            .replace("PROPERTIES", properties).replace("NETWORK", network).replace("WATCH\n", watch)
            .replace("EXTRA\n", extra))  # fmt: skip


def policy_for(url: str, entities: list[str], **kwargs):
    return parse_policy(policy_text(url, entities, **kwargs), name="wd-policy.yaml")


class WikidataMirror:
    """The recorded entities served at /w/api.php; `failures` are answered first, in order."""

    def __init__(self, server, documents: dict | None = None):
        data = documents or json.loads(DATA.read_text())
        self.recorded = RecordedWikibase(data, data.get("redirects"))
        self.failures: list[Route] = []
        self.params: list[dict[str, str]] = []
        server.apis["/w/api.php"] = self._answer
        self.url = server.url("/w/api.php")
        self.server = server

    def _answer(self, params: dict[str, str]) -> Route:
        self.params.append(params)
        if self.failures:
            return self.failures.pop(0)
        return Route(json.dumps(self.recorded.answer(params)).encode(), headers={"Content-Type": "application/json"})

    def entity(self, qid: str) -> dict:
        return self.recorded.entities[qid]

    def revise(self, qid: str, when: str, change=lambda doc: None) -> None:
        """A new revision of an item: `change` edits its document."""
        doc = self.entity(qid)
        change(doc)
        doc["lastrevid"] += 1000
        doc["modified"] = when


@pytest.fixture
def mirror(server):
    return WikidataMirror(server)


@pytest.fixture
def fetcher():
    with SafeFetcher() as f:
        yield f


def source_for(mirror, fetcher, entities, sleeps=None, **kwargs):
    policy = policy_for(mirror.url, entities, **kwargs)
    sp = policy.source("wikidata")
    sleep = sleeps.append if sleeps is not None else (lambda seconds: None)
    return WikidataSource(sp, policy.limits_for(sp), fetcher, sleep=sleep), policy


def facts(claims):
    return sorted((c.subject, c.relation, c.object) for c in claims)


# -- current values ---------------------------------------------------------------------------


def test_current_values_by_rank_end_time_and_deprecation(mirror, fetcher):
    source, _ = source_for(mirror, fetcher, ["Q100", "Q110"])
    result = source.poll({}, NOW)
    assert not result.refused and not result.problems, result.problems
    assert facts(result.claims) == [
        ("Freedonia", "capital", "Fredville"),  # normal rank, no end time (Oldtown ended in 2020)
        ("Zorbland Robotics", "ceo", "Nadia Velmont"),  # preferred; the ended one and the deprecated one never count
        ("Zorbland Robotics", "founded", "1998"),  # a year-precision time
        ("Zorbland Robotics", "headquarters", "Lowtown"),
    ]
    by = {(c.subject, c.relation): c for c in result.claims}
    ceo = by["Zorbland Robotics", "ceo"]
    assert ceo.observed_at == datetime(2026, 11, 1, tzinfo=UTC)  # the start-time qualifier (P580)
    assert ceo.url == mirror.url.replace("api.php", "index.php") + "?oldid=1001"  # the revision read
    assert ceo.ref == mirror.entity("Q100")["claims"]["P169"][1]["id"] + "@1001"
    assert by["Zorbland Robotics", "headquarters"].observed_at == datetime(2026, 11, 20, 10, tzinfo=UTC)  # revision time
    assert result.cursor["entities"]["Q100"]["rev"] == 1001
    # The requests: revisions, then statements and labels of the changed items, then the
    # labels of the values, in one batch; every one with maxlag and the operator's contact.
    assert [p["props"] for p in mirror.params] == ["info", "info|labels|claims", "labels"]
    assert mirror.params[2]["ids"] == "Q202|Q301|Q402"  # the current values' items only
    assert all(p["maxlag"] == "5" and p["format"] == "json" for p in mirror.params)
    agent = mirror.server.requests[0][1]["user-agent"]
    assert "kmd-tests@example.org" in agent and agent.startswith("kmd-intake/")


def test_times_and_quantities_are_rendered_readably(mirror, fetcher):
    source, _ = source_for(mirror, fetcher, ["Q160"])
    (claim,) = source.poll({}, NOW).claims
    assert (claim.subject, claim.relation, claim.object) == ("Zorbland Tower", "height", "324.5 metre")


@pytest.mark.parametrize(("time", "precision", "text"), [
    ("+2026-11-01T00:00:00Z", 11, "1 November 2026"),
    ("+2026-11-00T00:00:00Z", 10, "November 2026"),
    ("+2026-00-00T00:00:00Z", 9, "2026"),
    ("+1980-00-00T00:00:00Z", 8, "1980s"),
    ("+1901-00-00T00:00:00Z", 7, "20th century"),
    ("+2001-00-00T00:00:00Z", 6, "3rd millennium"),
    ("-0044-03-15T00:00:00Z", 11, "15 March 44 BC"),
    ("+2026-13-40T00:00:00Z", 11, "2026"),  # nonsense day and month: the year is still right
])  # fmt: skip
def test_time_values_by_precision(time, precision, text):
    from kmd.sources.wikidata.api import DataValue
    from kmd.sources.wikidata.values import render_value

    value = DataValue(type="time", value={"time": time, "precision": precision, "timezone": 0})
    assert render_value(value, lambda q: None) == (text, "")


def test_ambiguous_values_are_reported_not_guessed(mirror, fetcher):
    source, _ = source_for(mirror, fetcher, ["Q120"])
    result = source.poll({}, NOW)
    assert result.claims == ()
    assert result.problems == ("Q120 P36 (capital): ambiguous: 2 current normal-rank statements; no claim",)


def test_the_statement_that_started_last_wins_when_an_end_time_is_missing(mirror, fetcher):
    # The old chief executive's statement lost its end time (a common slip): the new one,
    # which started later, is still the current one.
    del mirror.entity("Q100")["claims"]["P169"][0]["qualifiers"]["P582"]
    mirror.entity("Q100")["claims"]["P169"][1]["rank"] = "normal"
    source, _ = source_for(mirror, fetcher, ["Q100"], properties="{P169: ceo}")
    assert facts(source.poll({}, NOW).claims) == [("Zorbland Robotics", "ceo", "Nadia Velmont")]


# -- labels, merged and missing items ----------------------------------------------------------


def test_labels_fall_back_saying_so_and_a_value_without_one_waits(mirror, fetcher):
    source, _ = source_for(mirror, fetcher, ["Q130", "Q131"])
    first = source.poll({}, NOW)
    assert facts(first.claims) == [("Grand Fenwick", "capital", "Fenwick Castle")]  # its 'mul' label
    assert "Q405: no 'en' label; used its 'mul' label 'Fenwick Castle'" in first.problems
    assert any(p.startswith("Q131 P36 (capital): Q407 has no label") and "read again" in p for p in first.problems)
    # Nothing lost: the item is read again until its value has a label, although its own
    # revision does not change when someone labels the value.
    second = source.poll(first.cursor, NOW)
    assert second.claims == () and not second.not_modified
    mirror.entity("Q407")["labels"]["en"] = {"language": "en", "value": "Tomania City"}
    third = source.poll(second.cursor, NOW)
    assert facts(third.claims) == [("Tomainia", "capital", "Tomania City")]
    assert source.poll(third.cursor, NOW).not_modified


def test_labels_are_in_the_policys_language(mirror, fetcher):
    source, _ = source_for(mirror, fetcher, ["Q100"], properties="{P169: ceo}", watch="      language: de\n")
    result = source.poll({}, NOW)
    assert facts(result.claims) == [("Zorbland Robotik", "ceo", "Nadia Velmont")]
    assert "Q202: no 'de' label; used its 'en' label 'Nadia Velmont'" in result.problems


def test_merged_items_are_followed_and_reported_and_missing_ones_reported(mirror, fetcher):
    source, _ = source_for(mirror, fetcher, ["Q140", "Q150"])
    result = source.poll({}, NOW)
    (claim,) = result.claims
    assert (claim.subject, claim.object) == ("Klopstokia", "Klopstadt")
    assert claim.url.endswith("?oldid=1411")
    assert "Q140 was merged into Q141: reading Q141 (list Q141 in the policy)" in result.problems
    assert "Q150: no such item (deleted?)" in result.problems
    assert set(result.cursor["entities"]) == {"Q140"}  # kept under the id the policy watches


# -- polls: cost, change, supersession -----------------------------------------------------------


def fifty_items() -> dict:
    """50 companies, each with a chief executive, in the recorded format."""
    data = json.loads(DATA.read_text())
    template, person = data["entities"]["Q100"], data["entities"]["Q202"]
    for n in range(50):
        qid, pid = f"Q{1000 + n}", f"Q{2000 + n}"
        doc = copy.deepcopy(template)
        doc.update(id=qid, title=qid, lastrevid=10_000 + n)
        doc["labels"] = {"en": {"language": "en", "value": f"Company {n}"}}
        doc["claims"] = {"P169": [copy.deepcopy(template["claims"]["P169"][1])]}
        doc["claims"]["P169"][0]["mainsnak"]["datavalue"]["value"].update(id=pid, **{"numeric-id": 2000 + n})
        doc["claims"]["P169"][0]["id"] = f"{qid}$0"
        data["entities"][qid] = doc
        data["entities"][pid] = {**copy.deepcopy(person), "id": pid,
                                 "labels": {"en": {"language": "en", "value": f"Person {n}"}}}  # fmt: skip
    return data


def test_fifty_items_cost_one_request_and_an_unchanged_poll_applies_nothing(server, clock):
    mirror = WikidataMirror(server, fifty_items())
    clock.now = NOW
    policy = policy_for(mirror.url, [f"Q{1000 + n}" for n in range(50)], properties="{P169: ceo}")
    ledger = Ledger.in_memory(clock=clock)
    verifier = Verifier(policy, ledger, ObjectMatcher(SynonymEncoder(), 0.85), clock=clock)
    with intake_for(policy, ledger, clock=clock) as intake:
        first = intake.poll("wikidata")
        assert first.new_claims == 50 and not first.problems
        assert len(verifier.run().new_facts) == 50
        assert len(mirror.params) == 3 and len(mirror.params[0]["ids"].split("|")) == 50
        mirror.params.clear()
        clock.advance(hours=1)
        second = intake.poll("wikidata")
    assert len(mirror.params) == 1 and mirror.params[0]["props"] == "info"  # one request for 50 items
    assert second.not_modified and second.new_claims == 0
    report = verifier.run()
    assert report.claims_seen == 0 and report.new_facts == ()
    assert len(ledger.claims()) == 50


def test_a_changed_value_becomes_a_claim_that_supersedes_the_old_fact(mirror, server, clock):
    """Revision 1: Harriet Vance runs Zorbland. Revision 2: her statement ends, Nadia
    Velmont's starts. The new claim is observed at its start time, its URL is the new
    revision, and the ledger marks the old fact superseded."""
    doc = mirror.entity("Q100")
    harriet, nadia = doc["claims"]["P169"][0], doc["claims"]["P169"][1]
    ended = harriet["qualifiers"].pop("P582")
    doc["claims"]["P169"].remove(nadia)
    doc["modified"] = "2026-06-01T00:00:00Z"
    clock.now = datetime(2026, 7, 1, tzinfo=UTC)
    policy = policy_for(mirror.url, ["Q100"], properties="{P169: ceo}")
    ledger = Ledger.in_memory(clock=clock)
    verifier = Verifier(policy, ledger, ObjectMatcher(SynonymEncoder(), 0.85), clock=clock)
    with intake_for(policy, ledger, clock=clock) as intake:
        intake.poll("wikidata")
        (old_fact,) = verifier.run().new_facts
        assert ledger.fact(old_fact).object == "Harriet Vance"
        assert ledger.fact(old_fact).observed_at == datetime(2015, 3, 1, tzinfo=UTC)

        def change(doc):
            harriet["qualifiers"]["P582"] = ended
            doc["claims"]["P169"].append(nadia)

        mirror.revise("Q100", "2026-11-02T08:00:00Z", change)
        clock.now = NOW
        report = intake.poll("wikidata")
    assert report.new_claims == 1
    (claim,) = ledger.claims(status="new")
    assert claim.object == "Nadia Velmont" and claim.observed_at == datetime(2026, 11, 1, tzinfo=UTC)
    assert claim.url.endswith("?oldid=2001") and "via:wikidata" in claim.flags
    verified = verifier.run()
    (new_fact,) = verified.new_facts
    assert verified.superseded == (old_fact,)
    assert ledger.fact(old_fact).status == "superseded"
    assert f"superseded by fact {new_fact}" in ledger.fact(old_fact).status_reason
    assert ledger.verify_chain().ok


def test_a_value_that_comes_back_is_claimed_again_at_its_revision(mirror, fetcher):
    """A vandal's change and its revert: the old value returns with the old statement; it
    must reach verification again, observed at the revert, not at its old start time."""
    source, _ = source_for(mirror, fetcher, ["Q141"], properties="{P36: capital}")
    first = source.poll({}, NOW)
    snak = mirror.entity("Q141")["claims"]["P36"][0]["mainsnak"]["datavalue"]["value"]
    mirror.revise("Q141", "2026-11-10T00:00:00Z", lambda d: snak.update(id="Q401", **{"numeric-id": 401}))
    second = source.poll(first.cursor, NOW)
    mirror.revise("Q141", "2026-11-11T00:00:00Z", lambda d: snak.update(id="Q406", **{"numeric-id": 406}))
    third = source.poll(second.cursor, NOW)
    assert [c.object for c in first.claims + second.claims + third.claims] == ["Klopstadt", "Oldtown", "Klopstadt"]
    assert third.claims[0].observed_at == datetime(2026, 11, 11, tzinfo=UTC)
    assert third.claims[0].content_hash != first.claims[0].content_hash  # not dropped as a duplicate


def test_a_start_time_that_comes_due_is_read_without_a_new_revision(mirror, fetcher):
    # Revision 1001 already says who takes over on 1 November: Harriet's term ends then.
    old = mirror.entity("Q100")["claims"]["P169"][0]
    old["qualifiers"]["P582"][0]["datavalue"]["value"]["time"] = "+2026-11-01T00:00:00Z"
    source, _ = source_for(mirror, fetcher, ["Q100"], properties="{P169: ceo}")
    october = source.poll({}, datetime(2026, 10, 15, tzinfo=UTC))
    assert facts(october.claims) == [("Zorbland Robotics", "ceo", "Harriet Vance")]
    assert october.cursor["entities"]["Q100"]["due"].startswith("2026-11-01")
    assert source.poll(october.cursor, datetime(2026, 10, 20, tzinfo=UTC)).not_modified
    november = source.poll(october.cursor, datetime(2026, 11, 2, tzinfo=UTC))
    assert facts(november.claims) == [("Zorbland Robotics", "ceo", "Nadia Velmont")]
    assert november.claims[0].observed_at == datetime(2026, 11, 1, tzinfo=UTC)


def test_the_cursor_advances_only_with_the_claims(mirror, clock):
    """The sink stores claims and cursor in one transaction; when storing fails, the next
    poll reads the same revision again and nothing is lost."""
    clock.now = NOW
    policy = policy_for(mirror.url, ["Q110"])
    ledger = Ledger.in_memory(clock=clock)

    class FailingOnce(LedgerSink):
        failed = False

        def store(self, *args, **kwargs):
            if not self.failed:
                self.failed = True
                raise RuntimeError("disk full")
            return super().store(*args, **kwargs)

    from kmd.sources.intake import Intake

    with Intake(policy, FailingOnce(ledger, policy.version_tag), clock=clock) as intake:
        with pytest.raises(RuntimeError):
            intake.poll("wikidata")
        assert ledger.load_cursor("wikidata") == {} and ledger.claims() == []
        assert intake.poll("wikidata").new_claims == 1
    assert ledger.load_cursor("wikidata")["entities"]["Q110"]["rev"] == 1101


# -- etiquette and limits ----------------------------------------------------------------------


def maxlag(lag: float) -> Route:
    body = {"error": {"code": "maxlag", "info": f"Waiting for db1: {lag} seconds lagged", "host": "db1", "lag": lag}}
    return Route(json.dumps(body).encode(), headers={"Retry-After": "5", "X-Database-Lag": str(int(lag))})


def test_maxlag_429_and_503_back_off_and_retry(mirror, fetcher):
    sleeps: list[float] = []
    source, _ = source_for(mirror, fetcher, ["Q110"], sleeps=sleeps)
    mirror.failures = [maxlag(7.5), Route(b"slow down", status=429, headers={"Retry-After": "3"}),
                       Route(b"", status=503)]  # fmt: skip
    result = source.poll({}, NOW)
    assert facts(result.claims) == [("Freedonia", "capital", "Fredville")] and not result.problems
    assert sleeps == [7.5, 3.0, 20.0]  # the lag, Retry-After, then exponential backoff (5 s * 2**2)


def test_throttling_that_does_not_end_gives_up_until_the_next_poll(mirror, fetcher):
    sleeps: list[float] = []
    source, _ = source_for(mirror, fetcher, ["Q110"], sleeps=sleeps)
    mirror.failures = [Route(b"", status=429, headers={"Retry-After": "600"})] * 4
    result = source.poll({"location": "kept"}, NOW)
    assert result.refused and result.cursor == {"location": "kept"}
    assert "HTTP 429; gave up after 4 tries" in result.problems[0]
    assert sleeps == [60.0, 60.0, 60.0]  # Retry-After, capped
    assert source.poll({}, NOW).claims  # the next poll reads it


def test_api_errors_and_garbage_are_reported_not_read(mirror, fetcher):
    source, _ = source_for(mirror, fetcher, ["Q100", "Q110"])
    mirror.failures = [Route(b"<html>not json</html>")]
    result = source.poll({}, NOW)
    assert result.refused and "not JSON" in result.problems[0]
    mirror.failures = [Route(json.dumps({"error": {"code": "internal_api_error", "info": "x"}}).encode())]
    assert "API error internal_api_error" in source.poll({}, NOW).problems[0]
    # One item's statements do not validate: it is skipped (and read again next time); the other is read.
    mirror.entity("Q100")["claims"]["P169"][0]["rank"] = "best"
    result = source.poll({}, NOW)
    assert facts(result.claims) == [("Freedonia", "capital", "Fredville")]
    assert any(p.startswith("Q100: entity does not validate: claims.P169.0.rank") for p in result.problems)
    assert "Q100" not in result.cursor["entities"]


def test_size_caps_split_batches_and_a_too_large_item_costs_only_itself(mirror, fetcher):
    source, _ = source_for(mirror, fetcher, ["Q100", "Q110"], extra="    limits: {max_bytes: 2500}\n")
    result = source.poll({}, NOW)
    assert facts(result.claims) == [("Freedonia", "capital", "Fredville")]  # Q100 alone is over 2500 bytes
    assert any(p.startswith("Q100:") and "2500-byte cap" in p and "max_bytes" in p for p in result.problems)
    sizes = [p["ids"] for p in mirror.params if p["props"] == "info|labels|claims"]
    assert sizes == ["Q100|Q110", "Q100", "Q110"]  # split in halves until each fits


def test_private_addresses_are_refused_unless_the_policy_allows_them(mirror, fetcher):
    source, _ = source_for(mirror, fetcher, ["Q110"], loopback=False)
    result = source.poll({}, NOW)
    assert result.refused and "not a public address" in result.problems[0]
    assert mirror.params == []


def test_more_than_fifty_items_are_asked_for_fifty_at_a_time(server, fetcher):
    mirror = WikidataMirror(server, fifty_items())
    ids = [f"Q{1000 + n}" for n in range(50)] + ["Q100", "Q110"]
    source, _ = source_for(mirror, fetcher, ids, properties="{P169: ceo}")
    result = source.poll({}, NOW)
    assert len(result.claims) == 51 and not result.problems  # Q110 has no chief executive
    assert [len(p["ids"].split("|")) for p in mirror.params if p["props"] == "info"] == [50, 2]


# -- the policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "expect"), [
    (("      entities: ENTITIES\n", "      entities: [Q1, X9]\n"), "not Wikidata item ids"),
    (("      entities: ENTITIES\n", "      entities: [Q1, Q1]\n"), "listed twice"),
    (("      contact: kmd-tests@example.org\n", "      contact: \"a\\nb\"\n"), "printable ASCII"),
    (("      properties: PROPERTIES\n", "      properties: {P169: cto}\n"), "'cto' is not in this source's relations"),
    (("      contact: kmd-tests@example.org\n", ""), "contact"),
    (("    wikidata:\n", "    extract: [{relation: capital, pattern: '(?P<subject>a)(?P<object>b)'}]\n    wikidata:\n"),
     "extraction patterns apply to feed sources only"),
    (("    kind: wikidata\n", "    kind: feed\n"), "applies to wikidata sources only"),
])  # fmt: skip
def test_policy_checks(change, expect):
    good = policy_text("https://www.wikidata.org/w/api.php", ["Q1"])
    assert parse_policy(good).source("wikidata").wikidata.entities == ("Q1",)
    text = policy_text("https://www.wikidata.org/w/api.php", ["Q1"], template=POLICY.replace(*change))
    with pytest.raises(PolicyError) as info:
        parse_policy(text, name="p.yaml")
    assert any(expect in str(p) for p in info.value.problems), info.value.problems
    assert all(str(p).startswith("p.yaml:") for p in info.value.problems)


def test_trust_and_quorum_come_from_the_policy(mirror, server, clock):
    """A medium-trust wikidata source alone does not make a fact under quorum 2; a feed
    that agrees does. No signature is asked of either."""
    from intake.helpers import atom

    server.routes["/feed.atom"] = Route(atom([{"subject": "Freedonia", "relation": "capital", "object": "Fredville"}]))
    # Both are served by one loopback host here, which would make them one source: vouch.
    feed = f"""\
  - id: gazette
    kind: feed
    location: {server.url("/feed.atom")}
    trust: medium
    relations: [capital]
    independent_of: [wikidata]
    network: {{allow_networks: ["127.0.0.0/8"]}}
"""
    clock.now = NOW
    policy = policy_for(mirror.url, ["Q110"], trust="medium", extra=feed)
    ledger = Ledger.in_memory(clock=clock)
    verifier = Verifier(policy, ledger, ObjectMatcher(SynonymEncoder(), 0.85), clock=clock)
    with intake_for(policy, ledger, clock=clock) as intake:
        intake.poll("wikidata")
        assert verifier.run().new_facts == ()  # one medium source: waiting for quorum
        intake.poll("gazette")
    (fact_id,) = verifier.run().new_facts
    fact = ledger.fact(fact_id)
    assert (fact.subject, fact.object, len(fact.claim_ids)) == ("Freedonia", "Fredville", 2)


def test_memory_sink_and_an_unknown_location_start_fresh(mirror, fetcher):
    source, _ = source_for(mirror, fetcher, ["Q110"])
    sink = MemorySink()
    first = source.poll(sink.load_cursor("wikidata"), NOW)
    sink.store("wikidata", first.claims, first.cursor, channel="wikidata")
    assert source.poll(sink.load_cursor("wikidata"), NOW).not_modified
    moved = {**sink.load_cursor("wikidata"), "location": "https://old.example/w/api.php"}
    assert len(source.poll(moved, NOW + timedelta(days=1)).claims) == 1  # a new endpoint: read afresh


def test_an_item_without_a_usable_label_waits_for_its_next_revision(mirror, fetcher):
    del mirror.entity("Q110")["labels"]["en"]
    source, _ = source_for(mirror, fetcher, ["Q110", "Q141"], extra="    limits: {max_field_chars: 9}\n")
    first = source.poll({}, NOW)
    assert first.claims == ()
    assert "Q110: no usable label in en, mul; no claims" in first.problems
    assert "Q141: its 'en' label is empty or longer than 9 characters: refused" in first.problems  # never cut
    assert source.poll(first.cursor, NOW).not_modified  # labelling the item is a new revision of it
    mirror.revise("Q110", "2026-11-20T00:00:00Z", lambda d: d["labels"].update(mul={"language": "mul", "value": "Fdonia"}))
    second = source.poll(first.cursor, NOW)
    assert facts(second.claims) == [("Fdonia", "capital", "Fredville")]


def test_empty_maps_written_as_lists_are_read_as_empty(mirror, fetcher):
    # Wikibase writes an empty map as [] in places; an item without statements is no error.
    mirror.entity("Q110")["claims"] = []
    mirror.entity("Q141")["labels"] = []
    source, _ = source_for(mirror, fetcher, ["Q110", "Q141"])
    result = source.poll({}, NOW)
    assert result.claims == () and result.problems == ("Q141: no usable label in en, mul; no claims",)
    mirror.entity("Q110")["claims"] = "garbage"
    mirror.revise("Q110", "2026-11-20T00:00:00Z")
    problems = source.poll(result.cursor, NOW).problems
    assert any(p.startswith("Q110: entity does not validate: claims") for p in problems), problems
