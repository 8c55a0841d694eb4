"""Fuzzing the parsers with Hypothesis: policy YAML, curated JSONL, feed entries to claims,
Wikidata answers, and the API's request bodies. Each may only fail in its documented way (PolicyError,
JsonlRefused, problems listed, a 4xx or 503 answer), within bounded time and memory.

The default run tries a few dozen inputs per parser; `-m fuzz` runs the same properties
with hundreds."""

from __future__ import annotations

import json
import tracemalloc
from datetime import UTC, datetime

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmd.daemon.policy import PolicyError, example_policy_path, parse_policy
from kmd.sources.config import FetchLimits, SourcePolicy
from kmd.sources.feeds import parse_feed
from kmd.sources.jsonl import JsonlRefused, parse_jsonl

NOW = datetime(2025, 1, 1, tzinfo=UTC)
MAX_PEAK_BYTES = 64 * 2**20  # per input

SHORT = settings(max_examples=30, deadline=5000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
LONG = settings(max_examples=500, deadline=5000, suppress_health_check=[HealthCheck.too_slow])


def bounded_memory(fn, *args, **kwargs):
    """Call fn; fail if it allocated more than MAX_PEAK_BYTES at its peak."""
    tracemalloc.start()
    try:
        return fn(*args, **kwargs)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MAX_PEAK_BYTES, f"peak {peak} bytes"


def both(strategy, name):
    """A short test in the default run and a long one under the `fuzz` marker."""

    def wrap(check):
        short = SHORT(given(strategy)(check))
        long = pytest.mark.fuzz(LONG(given(strategy)(check)))
        return {f"test_{name}": short, f"test_{name}_long": long}

    return wrap


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                           max_leaves=30)  # fmt: skip

# -- policy YAML ------------------------------------------------------------------------------

EXAMPLE = example_policy_path().read_text()


@st.composite
def policy_texts(draw):
    kind = draw(st.sampled_from(["text", "yaml", "mutated"]))
    if kind == "text":
        return draw(st.text(max_size=400))
    if kind == "yaml":
        doc = draw(st.dictionaries(st.sampled_from(["version", "backend", "relations", "sources", "verification",
                                                    "probes", "fetch", "x"]), json_values, max_size=6))  # fmt: skip
        return yaml.safe_dump(doc, allow_unicode=True)
    text = EXAMPLE
    for _ in range(draw(st.integers(1, 6))):  # insert, delete or replace a few characters
        at = draw(st.integers(0, len(text)))
        piece = draw(st.sampled_from(["", ":", "- ", "&a ", "*a", "[", "{", "!!binary ", "\t", "'", "\n  ", "0x", "é"]))
        text = text[:at] + piece + text[at + draw(st.integers(0, 3)) :]
    return text


def _policy(text: str) -> None:
    try:
        bounded_memory(parse_policy, text, name="fuzz.yaml")
    except PolicyError as exc:
        assert exc.problems and all(str(p) for p in exc.problems)


globals().update(both(policy_texts(), "policy_yaml_fails_only_with_policy_errors")(_policy))

# -- curated JSONL ----------------------------------------------------------------------------

SOURCE = SourcePolicy(id="curated", kind="jsonl", location="/dev/null", trust="high", relations=("capital",))
LIMITS = FetchLimits(max_entries=50, max_field_chars=200)


@st.composite
def jsonl_files(draw):
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    header = draw(st.sampled_from([{"kmd_jsonl": 1, "source": "curated", "sequence": 1}, {"kmd_jsonl": 1}, None]))
    lines = [json.dumps(header)] if header is not None else []
    for _ in range(draw(st.integers(0, 8))):
        fact = draw(st.fixed_dictionaries({}, optional={"subject": json_values, "relation": st.just("capital") | json_values,
                                                         "object": json_values, "observed": st.text(max_size=30),
                                                         "url": json_values, "id": json_values, "extra": json_values}))  # fmt: skip
        lines.append(json.dumps(fact) if draw(st.integers(0, 9)) else draw(st.text(max_size=30)))
    return "\n".join(lines).encode("utf-8", "surrogatepass")


def _jsonl(data: bytes) -> None:
    try:
        parsed = bounded_memory(parse_jsonl, data, SOURCE, LIMITS, location="fuzz.jsonl", now=NOW)
    except JsonlRefused as exc:
        assert str(exc)
        return
    for claim in parsed.claims:
        assert claim.source_id == "curated" and claim.subject and claim.object and claim.observed_at <= NOW


globals().update(both(jsonl_files(), "curated_jsonl_fails_only_by_refusing_the_file")(_jsonl))

# -- feed entries to claims -----------------------------------------------------------------

FEED = SourcePolicy(id="wire", kind="feed", location="https://wire.example/feed", trust="high", relations=("capital",),
                    on_malformed="downweight",
                    extract=({"field": "title", "relation": "capital",
                              "pattern": r"^(?P<subject>[A-Z][\w .'-]{0,80}) moves its capital to (?P<object>[A-Z][\w .'-]{0,80})$"},))  # fmt: skip


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;")


@st.composite
def feeds(draw):
    if draw(st.booleans()):
        return draw(st.binary(max_size=800))
    entries = []
    for i in range(draw(st.integers(0, 5))):
        fields = "".join(f"<kf:{k}>{draw(st.text(max_size=30)) if draw(st.booleans()) else _esc(draw(st.text(max_size=30)))}</kf:{k}>"
                         for k in draw(st.lists(st.sampled_from(["subject", "relation", "object", "observed"]), max_size=4)))  # fmt: skip
        title = _esc(draw(st.text(max_size=60) | st.just("Graustark moves its capital to Edelweiss")))
        entries.append(f"<entry><id>urn:{i}</id><title>{title}</title><updated>{_esc(draw(st.text(max_size=25)))}</updated>{fields}</entry>")
    text = ('<?xml version="1.0" encoding="utf-8"?><feed xmlns="http://www.w3.org/2005/Atom" xmlns:kf="urn:kmd:fact:1">'
            + "".join(entries) + ("</feed>" if draw(st.booleans()) else ""))  # fmt: skip
    return text.encode("utf-8", "surrogatepass")


def _feed(body: bytes) -> None:
    parsed = bounded_memory(parse_feed, body, FEED, LIMITS, url="https://wire.example/feed", fetched_at=NOW)
    for claim in parsed.claims:
        assert claim.source_id == "wire" and claim.observed_at <= NOW
        assert len(claim.subject) <= LIMITS.max_field_chars and len(claim.object) <= LIMITS.max_field_chars


globals().update(both(feeds(), "feed_entries_never_raise")(_feed))

# -- Wikidata answers -------------------------------------------------------------------------

WIKIDATA = SourcePolicy(id="wd", kind="wikidata", location="https://www.wikidata.org/w/api.php", trust="high",
                        relations=("capital",), wikidata={"entities": ["Q1", "Q3"], "properties": {"P36": "capital"},
                                                          "contact": "fuzz@example.org"})  # fmt: skip
_TIME = {"time": "+2020-01-01T00:00:00Z", "precision": 11, "timezone": 0}
_ANSWER = {"entities": {
    "Q1": {"id": "Q1", "lastrevid": 7, "modified": "2020-01-02T00:00:00Z", "labels": {"en": {"language": "en", "value": "Graustark"}},
           "claims": {"P36": [{"id": "Q1$a", "rank": "preferred", "mainsnak": {"snaktype": "value", "property": "P36",
                                "datavalue": {"type": "wikibase-entityid", "value": {"id": "Q2"}}},
                               "qualifiers": {"P580": [{"snaktype": "value", "property": "P580",
                                                        "datavalue": {"type": "time", "value": _TIME}}]}}]}},
    "Q2": {"id": "Q2", "labels": {"mul": {"language": "mul", "value": "Edelweiss"}}},
    "Q3": {"id": "Q1", "redirects": {"from": "Q3", "to": "Q1"}, "lastrevid": 7},  # merged into Q1
}}  # fmt: skip


def _paths(value, prefix=()):
    """Every place in a JSON document (dict keys and list indexes) that a value can replace."""
    yield prefix
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from _paths(child, (*prefix, key))


@st.composite
def wikidata_answers(draw):
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(st.binary(max_size=400))
    answer = json.loads(json.dumps(_ANSWER))
    for _ in range(draw(st.integers(1, 4))):  # replace a few parts with anything JSON
        path = draw(st.sampled_from(list(_paths(answer))))
        if not path:
            answer = draw(json_values)
            continue
        parent = answer
        try:
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier replacement removed this place
    return json.dumps(answer).encode()


class _Answering:
    """A `Fetcher` that gives every request the same answer."""

    def __init__(self, body: bytes):
        self.body = body

    def fetch(self, url, **kwargs):  # noqa: ANN001, ANN003
        from kmd.sources.net import FetchResult

        return FetchResult(url, 200, self.body, None, None)


def _wikidata(body: bytes) -> None:
    from kmd.sources.wikidata import WikidataSource

    source = WikidataSource(WIKIDATA, LIMITS, _Answering(body), sleep=lambda seconds: None)
    result = bounded_memory(source.poll, {}, NOW)
    assert all(isinstance(p, str) and p for p in result.problems)
    json.dumps(result.cursor)  # the cursor is stored as JSON
    for claim in result.claims:
        assert claim.source_id == "wd" and claim.relation == "capital" and claim.observed_at <= NOW
        assert 0 < len(claim.subject) <= LIMITS.max_field_chars and 0 < len(claim.object) <= LIMITS.max_field_chars


globals().update(both(wikidata_answers(), "wikidata_answers_never_raise")(_wikidata))

# -- API bodies -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from kmd.daemon.api import create_app
    from kmd.daemon.service import Daemon
    from kmd.daemon.settings import load_settings

    root = tmp_path_factory.mktemp("fuzz-api")
    (root / "policy.yaml").write_text("""\
version: fuzz-1
backend: grace
relations:
  capital: {prompt: "the capital of {subject} is"}
sources:
  - {id: web, kind: api, trust: high, relations: [capital]}
""")
    (root / "kmd.yaml").write_text("policy: policy.yaml\nstate_dir: state\napi: {token_env: KMD_FUZZ_TOKEN}\n")
    import os

    os.environ["KMD_FUZZ_TOKEN"] = "fuzz-token"
    daemon = Daemon(load_settings(root / "kmd.yaml"))  # no model loaded: generate and revert answer 503
    with TestClient(create_app(daemon), raise_server_exceptions=False) as c:
        yield c
    daemon.close()


requests = st.tuples(
    st.sampled_from(["/v1/facts", "/v1/generate", "/v1/edits/{id}/revert", "/v1/edits/{id}"]),
    json_values | st.binary(max_size=200),
    st.integers(-(2**70), 2**70),
    st.sampled_from([None, "Bearer fuzz-token", "Bearer wrong"]) | st.text(max_size=20),
)


def _api(client, request) -> None:  # noqa: ANN001
    path, body, number, auth = request
    path = path.replace("{id}", str(number))
    headers = {}
    if auth is not None:
        headers["Authorization"] = auth.encode("utf-8", "surrogatepass")
    if isinstance(body, bytes):
        answer = client.post(path, content=body, headers=headers | {"content-type": "application/json"})
    elif path.startswith("/v1/edits/") and not path.endswith("revert"):
        answer = client.get(path, headers=headers)
    else:
        answer = client.post(path, json=body, headers=headers)
    assert answer.status_code < 500 or answer.status_code == 503, (path, body, answer.status_code, answer.text[:300])


def test_api_bodies_never_give_500(client):
    SHORT(given(requests)(lambda r: _api(client, r)))()


@pytest.mark.fuzz
def test_api_bodies_never_give_500_long(client):
    LONG(given(requests)(lambda r: _api(client, r)))()


# -- ids in the console's paths and the CLI's arguments -----------------------------------------

ids = (st.integers(-(2**80), 2**80).map(str) | st.text(max_size=30)
       | st.tuples(st.sampled_from(["", "e", "f", "c", "r", "fact:", "edit:", "E", " e", "x"]),
                   st.integers(0, 10**30) | st.just(2**64) | st.just(10**23)).map(lambda p: f"{p[0]}{p[1]}")
       | st.integers(1, 6000).map(lambda n: "9" * n))  # fmt: skip


def _console_id(client, csrf: str, ref: str) -> None:  # noqa: ANN001
    from urllib.parse import quote

    part = quote(ref, safe="")
    if not part:
        return
    answers = [client.get(f"/ui/edits/{part}")]
    for path in (f"/ui/facts/{part}/approve", f"/ui/facts/{part}/reject", f"/ui/edits/{part}/revert"):
        answers.append(client.post(path, data={"csrf": csrf, "reason": "fuzz"}))
    for answer in answers:
        assert answer.status_code < 500, (ref, answer.request.url, answer.status_code, answer.text[:300])


def test_console_ids_never_give_500(client):
    csrf = _console_login(client)
    SHORT(given(ids)(lambda ref: _console_id(client, csrf, ref)))()


@pytest.mark.fuzz
def test_console_ids_never_give_500_long(client):
    csrf = _console_login(client)
    LONG(given(ids)(lambda ref: _console_id(client, csrf, ref)))()


def _console_login(client) -> str:  # noqa: ANN001
    import re

    csrf = re.compile(r'name="csrf" value="([^"]+)"')
    nonce = csrf.search(client.get("/ui/login").text).group(1)
    assert client.post("/ui/login", data={"token": "fuzz-token", "csrf": nonce}).status_code == 200
    return csrf.search(client.get("/ui/pending").text).group(1)


@pytest.fixture(scope="module")
def cli_db(tmp_path_factory) -> str:
    from kmd.daemon.ledger import Ledger

    db = f"sqlite:///{tmp_path_factory.mktemp('fuzz-cli') / 'ledger.db'}"
    Ledger(db).close()
    return db


def _cli_id(db: str, ref: str) -> None:
    from typer.testing import CliRunner

    from kmd.daemon.cli import app

    for command in (["ledger", "show"], ["approve"], ["reject"], ["revert"]):
        result = CliRunner().invoke(app, [*command, "--db", db, "--", ref])
        assert result.exception is None or isinstance(result.exception, SystemExit), (command, ref, repr(result.exception))
        assert result.exit_code in (1, 2), (command, ref, result.exit_code, result.output)  # the ledger is empty
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, (command, ref, result.output)


def test_cli_ids_fail_in_one_line(cli_db):
    SHORT(given(ids)(lambda ref: _cli_id(cli_db, ref)))()


@pytest.mark.fuzz
def test_cli_ids_fail_in_one_line_long(cli_db):
    LONG(given(ids)(lambda ref: _cli_id(cli_db, ref)))()
