"""The whole intake against real feeds on loopback: poll, record, verify, edit requests."""

from __future__ import annotations

import json

from intake.helpers import SynonymEncoder, Route, atom, make_policy
from kmd.daemon.edit_request import build_edit_request
from kmd.editors.protocol import EditRequest
from kmd.daemon.ledger import Ledger
from kmd.daemon.matching import ObjectMatcher
from kmd.daemon.verify import Verifier
from kmd.daemon.intake import intake_for
from kmd.sources.signing import generate_key, sign_file


def feed_source(name, server, trust, extra=""):
    return f"""\
  - id: {name}
    kind: feed
    location: {server.url('/' + name)}
    trust: {trust}
    relations: [capital, head_of_state]
    poll_interval: 10m
    network: {{allow_networks: ["127.0.0.0/8"]}}
    independent_of: ["*"]  # separate publishers, all simulated on one loopback host
{extra}"""


def test_poll_verify_and_conditional_get_end_to_end(server, clock, tmp_path):
    key = tmp_path / "k.pem"
    public = generate_key(key)
    curated = tmp_path / "facts.jsonl"
    curated.write_text(
        json.dumps({"kmd_jsonl": 1, "source": "curated", "sequence": 1}) + "\n"
        + json.dumps({"subject": "Freedonia", "relation": "head_of_state", "object": "Rufus T. Firefly"}) + "\n"
    )  # fmt: skip
    sign_file(curated, key)
    server.routes["/a"] = Route(atom([{"subject": "France", "relation": "capital", "object": "Paris"},
                                      {"subject": "Freedonia", "relation": "head_of_state", "object": "Rufus T. Firefly"}]),
                                etag='"a1"')  # fmt: skip
    server.routes["/b"] = Route(atom([{"subject": "France", "relation": "capital", "object": "Paris, France"}]),
                                last_modified="Wed, 01 Jan 2025 00:00:00 GMT")  # fmt: skip
    server.routes["/lo"] = Route(atom([{"subject": "Spain", "relation": "capital", "object": "Barcelona"}]))
    server.routes["/broken"] = Route(b"<rss><channel><item><title>x")
    server.routes["/huge"] = Route(b"x" * 50_000)
    server.routes["/evil"] = Route(status=302, headers={"Location": "http://169.254.169.254/latest/"})
    policy = make_policy(
        feed_source("a", server, "medium") + feed_source("b", server, "medium") + feed_source("lo", server, "low")
        + feed_source("broken", server, "high") + feed_source("huge", server, "high", "    limits: {max_bytes: 10000}\n")
        + feed_source("evil", server, "high")
        + f"""\
  - id: curated
    kind: jsonl
    location: {curated}
    trust: high
    relations: [head_of_state]
    poll_interval: 10m
    require_signature: true
    signing_keys: ["{public}"]
"""
    )  # fmt: skip
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(db, clock=clock)
    with intake_for(policy, ledger, clock=clock) as intake:
        reports = {r.source_id: r for r in intake.poll_due()}
    assert {k: r.new_claims for k, r in reports.items()} == {
        "a": 2, "b": 1, "lo": 1, "broken": 0, "huge": 0, "evil": 0, "curated": 1}  # fmt: skip
    assert reports["broken"].refused and "malformed" in reports["broken"].problems[0]
    assert reports["huge"].refused and "cap" in reports["huge"].problems[0]
    assert reports["evil"].refused and "not a public address" in reports["evil"].problems[0]

    verifier = Verifier(policy, ledger, ObjectMatcher(SynonymEncoder([["Paris", "Paris, France"]]), 0.85), clock=clock)
    report = verifier.run()
    assert report.claims_seen == 5 and len(report.new_facts) == 2 and report.waiting == 1  # Spain: low trust alone
    (ready,) = ledger.ready_facts()
    assert (ready.subject, ready.relation) == ("France", "capital")
    assert build_edit_request(ready, policy.relation(ready.relation)) == EditRequest(
        prompt="The capital of France is", target=ready.object, subject="France",
        rephrases=("France's capital city is",),
    )  # fmt: skip
    (quarantined,) = ledger.facts(status="quarantined")
    assert quarantined.object == "Rufus T. Firefly"  # feed a + signed curated file, sensitive relation

    # Nothing is due before the poll interval; then conditional GETs find nothing new.
    with intake_for(policy, Ledger(db, clock=clock), clock=clock) as intake:
        assert intake.due() == []
        clock.advance(minutes=11)
        assert "a" in intake.due()
        again = {r.source_id: r for r in intake.poll_due()}
    assert again["a"].not_modified and again["curated"].not_modified
    assert again["b"].new_claims == 0 and again["b"].duplicates == 1  # no ETag: re-read, dropped by hash
    assert sum(r.new_claims for r in again.values()) == 0
    assert server.requests[-1][0] in {"/a", "/b", "/lo", "/broken", "/huge", "/evil"}
    sent = {path: headers for path, headers in server.requests[-8:]}
    assert sent["/a"].get("if-none-match") == '"a1"'
    assert sent["/b"].get("if-modified-since") == "Wed, 01 Jan 2025 00:00:00 GMT"
    assert ledger.verify_chain().ok


def test_cli_check_policy_and_poll(server, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from intake.helpers import BASE_POLICY
    from kmd.daemon.cli import app
    from kmd.daemon.logs import configure_logging

    runner = CliRunner()
    good = tmp_path / "policy.yaml"
    good.write_text(BASE_POLICY + "sources:\n" + feed_source("a", server, "high"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("trust: high", "trust: total"))
    try:
        out = runner.invoke(app, ["intake", "check-policy", str(good)])
        assert out.exit_code == 0 and "ok:" in out.output
        out = runner.invoke(app, ["intake", "check-policy", str(bad)])
        assert out.exit_code == 1 and f"{bad}:" in out.output and "sources[0].trust" in out.output
        server.routes["/a"] = Route(atom([{"subject": "France", "relation": "capital", "object": "Paris"}]))
        monkeypatch.setenv("KMD_DB_URL", f"sqlite:///{tmp_path / 'l.db'}")
        out = runner.invoke(app, ["intake", "poll", "--policy", str(good), "--encoder", "ngram"])
        assert out.exit_code == 0, out.output
        assert "a: ok, 1 new claims" in out.output and "1 new facts" in out.output
    finally:
        configure_logging("INFO")  # the CLI pointed loguru at the runner's (now closed) stderr


def test_supersession_and_signed_files_over_http(server, clock, tmp_path):
    """Feeds change their answer: the newer verified fact supersedes the committed edit.
    A curated file served over HTTP is refused when unsigned or tampered with."""
    key = tmp_path / "k.pem"
    public = generate_key(key)
    facts = tmp_path / "facts.jsonl"

    def publish(seq: int, obj: str, *, sign: bool = True, tamper: bool = False) -> None:
        facts.write_text(json.dumps({"kmd_jsonl": 1, "source": "curated", "sequence": seq}) + "\n"
                         + json.dumps({"subject": "France", "relation": "capital", "object": obj}) + "\n")  # fmt: skip
        server.routes.pop("/facts.jsonl.sig", None)
        if sign:
            sign_file(facts, key)
            server.routes["/facts.jsonl.sig"] = Route((tmp_path / "facts.jsonl.sig").read_bytes())
        body = facts.read_bytes().replace(b"Paris", b"Lille") if tamper else facts.read_bytes()
        server.routes["/facts.jsonl"] = Route(body)

    def feed(obj: str, day: int) -> Route:
        stamp = f"2025-01-{day:02d}T00:00:00Z"
        return Route(atom([{"id": f"urn:{obj}", "subject": "France", "relation": "capital", "object": obj,
                            "observed": stamp}]), etag=f'"{obj}"')  # fmt: skip

    clock.advance(days=30)  # "now" is after every observation below
    server.routes["/a"] = feed("Lyon", 1)
    publish(1, "Lyon")
    policy = make_policy(feed_source("a", server, "medium") + f"""\
  - id: curated
    kind: jsonl
    location: {server.url('/facts.jsonl')}
    trust: medium
    relations: [capital]
    poll_interval: 10m
    require_signature: true
    signing_keys: ["{public}"]
    network: {{allow_networks: ["127.0.0.0/8"]}}
    independent_of: ["*"]
""")  # fmt: skip
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}", clock=clock)
    verifier = Verifier(policy, ledger, ObjectMatcher(SynonymEncoder(), 0.85), clock=clock)
    with intake_for(policy, ledger, clock=clock) as intake:
        intake.poll_due()
        (lyon,) = verifier.run().new_facts
        edit = ledger.record_edit_applied(lyon, request=build_edit_request(ledger.fact(lyon), policy.relation("capital")).to_dict(), backend="fake",
                                          backend_config={}, policy_version=policy.version_tag)  # fmt: skip
        ledger.commit_edit(edit.id, probes={"rel": 1.0})

        # An unsigned file, then a tampered one: refused, nothing recorded.
        clock.advance(minutes=11)
        publish(2, "Paris", sign=False)
        server.routes["/a"] = feed("Paris", 20)
        reports = {r.source_id: r for r in intake.poll_due()}
        assert reports["curated"].refused and "unsigned" in reports["curated"].problems[0]
        assert reports["a"].new_claims == 1
        assert verifier.run().new_facts == ()  # one source is not a quorum
        clock.advance(minutes=11)
        publish(2, "Paris", tamper=True)
        reports = {r.source_id: r for r in intake.poll_due()}
        assert reports["curated"].refused and "does not match" in reports["curated"].problems[0]
        assert reports["a"].not_modified

        # The properly signed file arrives: quorum for the newer answer.
        clock.advance(minutes=11)
        publish(2, "Paris")
        assert {r.source_id: r.new_claims for r in intake.poll_due()} == {"a": 0, "curated": 1}
    (paris,) = verifier.run().new_facts
    fact = ledger.fact(paris)
    assert fact.object == "Paris" and fact.supersedes_fact_id == lyon and fact.supersedes_edit_id == edit.id
    revert = ledger.supersede_edit(edit.id, by_fact_id=paris)
    assert revert.superseded_by_fact_id == paris and ledger.fact(lyon).status == "superseded"
    assert ledger.verify_chain().ok
