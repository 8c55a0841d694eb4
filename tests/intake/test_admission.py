"""No path around the policy: every door into the ledger, and who counts as independent.

Reproductions of issue 16, findings 1 (the API borrowed the signed curated source's id)
and 4 (two low-trust sources on one feed URL made a quorum)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from loguru import logger

from intake.helpers import Route, SynonymEncoder, atom, make_policy
from kmd.daemon.api import create_app
from kmd.daemon.ledger import Ledger
from kmd.daemon.matching import ObjectMatcher
from kmd.daemon.service import Daemon
from kmd.daemon.settings import load_settings
from kmd.daemon.verify import Verifier
from kmd.sources.base import MemorySource
from kmd.sources.claims import Claim
from kmd.daemon.intake import intake_for
from kmd.sources.signing import generate_key

TOKEN = "t0ken"
PACKAGE = Path(__file__).resolve().parents[2]


def _daemon(tmp_path: Path, monkeypatch, api_source: str = "") -> Daemon:
    public = generate_key(tmp_path / "k.pem")
    (tmp_path / "facts.jsonl").write_text(json.dumps({"kmd_jsonl": 1, "source": "curated", "sequence": 1}) + "\n")
    (tmp_path / "policy.yaml").write_text(f"""\
version: adm-1
backend: grace
relations:
  capital: {{prompt: "the capital of {{subject}} is"}}
sources:
  - id: curated
    kind: jsonl
    location: {tmp_path / 'facts.jsonl'}
    trust: high
    relations: [capital]
    require_signature: true
    signing_keys: ["{public}"]
{api_source}""")
    (tmp_path / "kmd.yaml").write_text("policy: policy.yaml\nstate_dir: state\napi: {token_env: KMD_ADM_TOKEN}\n")
    monkeypatch.setenv("KMD_ADM_TOKEN", TOKEN)
    return Daemon(load_settings(tmp_path / "kmd.yaml"))


AUTH = {"Authorization": f"Bearer {TOKEN}"}
FACT = {"subject": "Graustark", "relation": "capital", "object": "Edelweiss"}


def test_api_submission_cannot_borrow_the_signed_sources_id(tmp_path, monkeypatch):
    """Finding 1: `POST /v1/facts` with `source_id: curated` returned 202 and became an edit
    without any signature. Now it is refused and nothing reaches the ledger."""
    daemon = _daemon(tmp_path, monkeypatch)
    client = TestClient(create_app(daemon))
    answer = client.post("/v1/facts", json=FACT | {"source_id": "curated"}, headers=AUTH)
    assert answer.status_code == 403, answer.text
    assert "jsonl source" in answer.json()["detail"]
    # without an api source in the policy, submissions are off altogether
    answer = client.post("/v1/facts", json=FACT, headers=AUTH)
    assert answer.status_code == 403 and "no api source" in answer.json()["detail"]
    assert daemon.ledger.claims() == []
    daemon.close()


def test_api_facts_come_from_the_api_source_and_wait_for_approval(tmp_path, monkeypatch):
    daemon = _daemon(tmp_path, monkeypatch, """\
  - id: web
    kind: api
    trust: high
    relations: [capital]
""")
    client = TestClient(create_app(daemon))
    answer = client.post("/v1/facts", json=FACT, headers=AUTH)
    assert answer.status_code == 202, answer.text
    assert answer.json()["source_id"] == "web" and "approval" in answer.json()["note"]
    assert client.post("/v1/facts", json=FACT | {"source_id": "curated"}, headers=AUTH).status_code == 403
    (claim,) = daemon.ledger.claims()
    assert claim.source_id == "web" and "via:api" in claim.flags
    report = Verifier(daemon.policy, daemon.ledger, ObjectMatcher(SynonymEncoder(), 0.85)).run()
    (fact_id,) = report.new_facts
    fact = daemon.ledger.fact(fact_id)
    assert fact.status == "quarantined" and "needs approval" in fact.status_reason  # a person decides
    daemon.close()


def _record_calls() -> set[str]:
    """Every function in the package that calls `record_claims` (a door into the ledger)."""
    found = set()
    for path in PACKAGE.glob("*/**/*.py"):
        if path.parts[len(PACKAGE.parts)] not in ("common", "daemon", "sources", "editors", "policies"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Call) and getattr(inner.func, "attr", None) == "record_claims":
                        found.add(f"{path.relative_to(PACKAGE)}:{node.name}")
    return found


def test_every_path_into_the_ledger_is_known_and_checked(tmp_path):
    """The doors that record claims are exactly these; each one stamps the channel, and
    the verifier admits a claim only from a source of that channel's kind."""
    assert _record_calls() == {
        "daemon/intake.py:store",  # polled feed and jsonl sources (the intake's ledger sink)
        "daemon/service/app.py:submit_fact",  # POST /v1/facts (the api source)
        "daemon/ledger/store.py:record_claims",  # Ledger.record_claims -> LedgerTransaction.record_claims
    }
    policy = make_policy("""\
  - id: curated
    kind: jsonl
    location: /nonexistent/facts.jsonl
    trust: high
    relations: [capital]
  - id: wire
    kind: feed
    location: https://wire.example.org/feed
    trust: high
    relations: [capital]
  - id: web
    kind: api
    trust: high
    relations: [capital]
    needs_approval: false
""")
    ledger = Ledger.in_memory()

    def claim(source: str, ref: str) -> Claim:
        return Claim("Graustark", "capital", "Edelweiss", source, "x", observed_at=ledger._clock(), ref=ref)

    # Door 1, the intake: a source can only record claims under its own id.
    sneaky = MemorySource("wire", [claim("curated", "w1"), claim("wire", "w2")])
    with intake_for(policy, ledger, sources={"wire": sneaky}) as intake:
        (report,) = intake.poll_many(["wire"])
    assert report.new_claims == 1 and "dropped" in report.problems[-1]
    # Door 2 (and anything calling the ledger directly): the channel is stamped, and the
    # verifier refuses an api claim under a jsonl source's id whatever the caller did.
    ledger.record_claims([claim("curated", "api:1")], policy_version="x", channel="api")
    ledger.record_claims([claim("web", "api:2")], policy_version="x", channel="api")
    ledger.record_claims([claim("web", "f:3")], policy_version="x", channel="feed")
    Verifier(policy, ledger, ObjectMatcher(SynonymEncoder(), 0.85)).run()
    status = {(c.source_id, c.ref): (c.status, c.status_reason) for c in ledger.claims()}
    assert status[("curated", "api:1")][0] == "rejected" and "came in through api" in status[("curated", "api:1")][1]
    assert status[("web", "f:3")][0] == "rejected" and "came in through feed" in status[("web", "f:3")][1]
    assert status[("web", "api:2")][0] != "rejected" and status[("wire", "w2")][0] != "rejected"


# -- independence (finding 4) --------------------------------------------------------------


def _low(name: str, url: str, extra: str = "") -> str:
    return f"""\
  - id: {name}
    kind: feed
    location: {url}
    trust: low
    relations: [capital]
    network: {{allow_networks: ["127.0.0.0/8"]}}
{extra}"""


@pytest.fixture
def log_lines():
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")
    yield lines
    logger.remove(sink)


def _verify(policy, clock):
    ledger = Ledger.in_memory(clock=clock)
    with intake_for(policy, ledger, clock=clock) as intake:
        intake.poll_due()
    report = Verifier(policy, ledger, ObjectMatcher(SynonymEncoder(), 0.85), clock=clock).run()
    return ledger, report


def test_two_sources_on_one_feed_url_are_one_source(server, clock, log_lines):
    """Finding 4: two `trust: low` sources pointing at the same feed, no `group`, made a
    quorum of 2 and a false fact became ready. They are one source now, and the log says so."""
    server.routes["/feed"] = Route(atom([{"subject": "Graustark", "relation": "capital", "object": "Edelweiss"}]))
    url = server.url("/feed")
    policy = make_policy(_low("mirror-a", url) + _low("mirror-b", url))
    ledger, report = _verify(policy, clock)
    assert report.new_facts == () and ledger.ready_facts() == []
    assert any("quorum not met" in line and "count as one: same host" in line for line in log_lines), log_lines


def test_byte_identical_entries_from_different_hosts_count_once(server, clock, log_lines):
    body = atom([{"subject": "Graustark", "relation": "capital", "object": "Edelweiss"}])
    server.routes["/a"] = Route(body)
    server.routes["/b"] = Route(body)
    # different host names (both loopback): only the identical entries give them away
    a, b = server.url("/a"), server.url("/b").replace("127.0.0.1", "localhost")
    policy = make_policy(_low("a", a) + _low("b", b))
    ledger, report = _verify(policy, clock)
    assert report.new_facts == ()
    assert any("the same entry content" in line for line in log_lines), log_lines


# Issue 27, case 2: a mirror that rewrites bytes but says the same thing is still a mirror.


def _two_hosts(server, first: bytes, second: bytes) -> tuple[str, str]:
    server.routes["/a"], server.routes["/b"] = Route(first), Route(second)
    return server.url("/a"), server.url("/b").replace("127.0.0.1", "localhost")


@pytest.mark.parametrize("change", [{"id": "urn:mirror:7"}, {"title": "BREAKING: a new capital"},
                                    {"id": "urn:x", "title": "t", "updated": "2024-12-02T00:00:00Z",
                                     "object": "  edelweiss. "}])  # fmt: skip
def test_a_copied_entry_with_its_id_or_title_rewritten_counts_once(server, clock, log_lines, change):
    fact = {"subject": "Graustark", "relation": "capital", "object": "Edelweiss"}
    a, b = _two_hosts(server, atom([fact]), atom([fact | change]))
    ledger, report = _verify(make_policy(_low("a", a) + _low("b", b)), clock)
    assert report.new_facts == () and ledger.ready_facts() == []
    assert any("quorum not met" in line and "a and b count as one: the same entry content" in line
               for line in log_lines), log_lines


def test_entries_with_their_own_link_or_summary_are_independent(server, clock, log_lines):
    """The control: two publishers reporting the same fact each link to their own story."""
    fact = {"subject": "Graustark", "relation": "capital", "object": "Edelweiss"}
    a, b = _two_hosts(server, atom([fact]), atom([fact]).replace(b"https://example.org/e0", b"https://b.example/story"))
    ledger, report = _verify(make_policy(_low("a", a) + _low("b", b)), clock)
    assert len(report.new_facts) == 1, log_lines


def test_the_same_jsonl_line_with_its_whitespace_removed_counts_once(tmp_path, clock, log_lines):
    line = {"subject": "Graustark", "relation": "capital", "object": "Edelweiss", "url": "https://gazette.example/1"}
    for name, text in (("a", json.dumps(line, indent=None)), ("b", json.dumps(line, separators=(",", ":")))):
        header = json.dumps({"kmd_jsonl": 1, "source": name, "sequence": 1})
        (tmp_path / f"{name}.jsonl").write_text(f"{header}\n{text}\n")
    sources = "".join(f"""\
  - id: {name}
    kind: jsonl
    location: {tmp_path / f'{name}.jsonl'}
    trust: low
    relations: [capital]
""" for name in "ab")
    ledger, report = _verify(make_policy(sources), clock)
    assert report.new_facts == ()
    assert any("a and b count as one: the same entry content" in line for line in log_lines), log_lines


def test_sources_the_policy_marks_independent_still_make_a_quorum(server, clock, log_lines):
    server.routes["/a"] = Route(atom([{"id": "a1", "subject": "Graustark", "relation": "capital", "object": "Edelweiss"}]))
    server.routes["/b"] = Route(atom([{"id": "b1", "subject": "Graustark", "relation": "capital", "object": "Edelweiss"}]))
    policy = make_policy(_low("a", server.url("/a"), "    independent_of: [b]\n") + _low("b", server.url("/b")))
    ledger, report = _verify(policy, clock)
    assert len(report.new_facts) == 1
    assert any("quorum met" in line and "2 independent group(s)" in line for line in log_lines), log_lines


def test_registrable_domain_groups_subdomains_but_not_shared_suffixes():
    from kmd.daemon.independence import registrable_domain

    assert registrable_domain("feeds.acme.co.uk") == registrable_domain("WWW.acme.co.uk") == "acme.co.uk"
    assert registrable_domain("alice.github.io") != registrable_domain("bob.github.io")  # a public suffix
    assert registrable_domain("127.0.0.1") == "127.0.0.1" and registrable_domain("localhost") == "localhost"
