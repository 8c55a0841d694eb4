"""Curated JSONL: strict lines, signatures against pinned keys, replay protection."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from intake.helpers import Route, make_policy
from kmd.daemon.cli import app
from kmd.sources.jsonl import JsonlSource
from kmd.sources.net import SafeFetcher
from kmd.sources.signing import generate_key, sign_file

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def header(seq: int, source: str = "curated") -> str:
    return json.dumps({"kmd_jsonl": 1, "source": source, "sequence": seq, "created": "2024-12-01T00:00:00Z"})


def write(path, seq: int, lines: list[str], source: str = "curated"):
    path.write_text("\n".join([header(seq, source), *lines]) + "\n")
    return path


GOOD = [
    json.dumps({"subject": "France", "relation": "capital", "object": "Paris"}),
    json.dumps({"subject": "Acme", "relation": "ceo", "object": "Jane Doe", "observed": "2024-11-01T00:00:00Z",
                "url": "https://acme.example/press", "id": "acme-ceo"}),
]  # fmt: skip


def jsonl_source(path, *, keys=(), required=False, location=None, extra=""):
    key_lines = "".join(f"\n      - \"{k}\"" for k in keys)
    text = f"""\
  - id: curated
    kind: jsonl
    location: {location or path}
    trust: high
    relations: [capital, ceo]
    require_signature: {str(required).lower()}
{"    signing_keys:" + key_lines if keys else ""}
{extra}"""
    policy = make_policy(text)
    return JsonlSource(policy.source("curated"), policy.limits_for(policy.source("curated")), None)


@pytest.fixture
def signer(tmp_path):
    key_file = tmp_path / "signer.pem"
    return key_file, generate_key(key_file)


def test_valid_file(tmp_path):
    path = write(tmp_path / "facts.jsonl", 1, GOOD)
    result = jsonl_source(path).poll({}, NOW)
    assert not result.refused and not result.problems
    france, acme = result.claims
    assert (france.subject, france.relation, france.object) == ("France", "capital", "Paris")
    assert france.observed_at == datetime(2024, 12, 1, tzinfo=UTC)  # the header's created time
    assert france.url.endswith("facts.jsonl#L2")
    assert acme.ref == "acme-ceo" and acme.url == "https://acme.example/press"
    assert result.cursor["sequence"] == 1


def test_invalid_lines_are_reported_and_valid_ones_kept(tmp_path):
    lines = [
        GOOD[0],
        "{not json",
        json.dumps({"subject": "Spain", "relation": "capital"}),
        json.dumps({"subject": "Italy", "relation": "capital", "object": "Rome", "colour": "red"}),
        "",
        json.dumps({"subject": 7, "relation": "capital", "object": "Bern"}),
        json.dumps({"subject": "\u200b", "relation": "capital", "object": "X"}),
        GOOD[1],
    ]
    result = jsonl_source(write(tmp_path / "f.jsonl", 1, lines)).poll({}, NOW)
    assert [c.subject for c in result.claims] == ["France", "Acme"]
    assert [p.split(":")[0] for p in result.problems] == ["line 3", "line 4", "line 5", "line 7", "line 8"]
    assert "not JSON" in result.problems[0]
    assert "object: Field required" in result.problems[1]
    assert "colour: unknown key" in result.problems[2]
    assert "subject: Input should be a valid string" in result.problems[3]


@pytest.mark.parametrize(
    ("first_line", "message"),
    [("", "header line is missing"), ('{"kmd_jsonl": 2, "source": "curated", "sequence": 1}', "bad header"),
     (header(1, "other"), "expected 'curated'"), (GOOD[0], "bad header")],
)  # fmt: skip
def test_bad_headers_refuse_the_file(tmp_path, first_line, message):
    path = tmp_path / "f.jsonl"
    path.write_text(first_line + ("\n" + GOOD[0] if first_line else ""))
    result = jsonl_source(path).poll({}, NOW)
    assert result.refused and result.claims == () and message in result.problems[0]


def test_signed_file_is_accepted(tmp_path, signer):
    key_file, public = signer
    path = write(tmp_path / "f.jsonl", 1, GOOD)
    sign_file(path, key_file)
    result = jsonl_source(path, keys=[public], required=True).poll({}, NOW)
    assert not result.refused and len(result.claims) == 2


def test_unsigned_file_is_refused_when_signing_is_required(tmp_path, signer):
    path = write(tmp_path / "f.jsonl", 1, GOOD)
    result = jsonl_source(path, keys=[signer[1]], required=True).poll({}, NOW)
    assert result.refused and "unsigned file refused" in result.problems[0]


def test_tampered_file_is_refused(tmp_path, signer):
    key_file, public = signer
    path = write(tmp_path / "f.jsonl", 1, GOOD)
    sign_file(path, key_file)
    path.write_text(path.read_text().replace("Paris", "Lyon"))
    result = jsonl_source(path, keys=[public], required=True).poll({}, NOW)
    assert result.refused and "does not match" in result.problems[0] and result.claims == ()


def test_signature_from_an_unpinned_key_is_refused(tmp_path, signer):
    other_key = tmp_path / "other.pem"
    generate_key(other_key)
    path = write(tmp_path / "f.jsonl", 1, GOOD)
    sign_file(path, other_key)
    assert jsonl_source(path, keys=[signer[1]], required=True).poll({}, NOW).refused
    # A bad signature is refused even where signing is optional.
    assert jsonl_source(path, keys=[signer[1]], required=False).poll({}, NOW).refused
    (tmp_path / "f.jsonl.sig").write_text("not base64!!")
    assert "not base64" in jsonl_source(path, keys=[signer[1]]).poll({}, NOW).problems[0]


def test_replayed_and_reused_sequences_are_refused(tmp_path, signer):
    key_file, public = signer
    old = write(tmp_path / "old.jsonl", 1, GOOD[:1])
    sign_file(old, key_file)
    old_bytes, old_sig = old.read_bytes(), (tmp_path / "old.jsonl.sig").read_bytes()
    path = write(tmp_path / "f.jsonl", 2, GOOD)
    sign_file(path, key_file)
    src = jsonl_source(path, keys=[public], required=True)
    first = src.poll({}, NOW)
    assert first.cursor["sequence"] == 2 and len(first.claims) == 2
    again = src.poll(first.cursor, NOW)
    assert again.not_modified and again.claims == ()  # same bytes: nothing new, no alarm
    # An attacker puts the old, validly signed file back in place.
    path.write_bytes(old_bytes)
    (tmp_path / "f.jsonl.sig").write_bytes(old_sig)
    replay = src.poll(first.cursor, NOW)
    assert replay.refused and "replay refused" in replay.problems[0] and replay.cursor == first.cursor
    # Same sequence, different content.
    write(path, 2, GOOD[:1])
    sign_file(path, key_file)
    reuse = src.poll(first.cursor, NOW)
    assert reuse.refused and "reused" in reuse.problems[0]
    write(path, 3, GOOD[:1])
    sign_file(path, key_file)
    assert src.poll(first.cursor, NOW).cursor["sequence"] == 3


def test_too_many_facts_refuses_the_file(tmp_path):
    path = write(tmp_path / "f.jsonl", 1, GOOD * 3)
    src = jsonl_source(path, extra="    limits: {max_entries: 4}\n")
    result = src.poll({}, NOW)
    assert result.refused and "exceed the cap of 4" in result.problems[0]


def test_signed_jsonl_over_http(server, tmp_path, signer):
    key_file, public = signer
    path = write(tmp_path / "f.jsonl", 5, GOOD)
    sign_file(path, key_file)
    server.routes["/facts.jsonl"] = Route(path.read_bytes(), etag='"a"')
    server.routes["/facts.jsonl.sig"] = Route((tmp_path / "f.jsonl.sig").read_bytes())
    text = f"""\
  - id: curated
    kind: jsonl
    location: {server.url('/facts.jsonl')}
    trust: high
    relations: [capital, ceo]
    require_signature: true
    signing_keys: ["{public}"]
    network: {{allow_networks: ["127.0.0.1/32"]}}
"""
    policy = make_policy(text)
    with SafeFetcher() as fetcher:
        src = JsonlSource(policy.source("curated"), policy.fetch, fetcher)
        result = src.poll({}, NOW)
        assert len(result.claims) == 2 and result.cursor["etag"] == '"a"'
        assert src.poll(result.cursor, NOW).not_modified


def test_keygen_and_sign_commands(tmp_path):
    from kmd.daemon.logs import configure_logging

    runner = CliRunner()
    key = tmp_path / "k.pem"
    out = runner.invoke(app, ["intake", "keygen", str(key)])
    assert out.exit_code == 0, out.output
    public = out.output.split("signing_keys): ")[1].strip()
    assert public.startswith("ed25519:") and oct(key.stat().st_mode & 0o777) == "0o600"
    assert runner.invoke(app, ["intake", "keygen", str(key)]).exit_code == 1  # never overwrite
    path = write(tmp_path / "f.jsonl", 1, GOOD)
    assert runner.invoke(app, ["intake", "sign", str(path), "--key", str(key)]).exit_code == 0
    configure_logging("INFO")  # the CLI pointed loguru at the runner's (now closed) stderr
    assert not jsonl_source(path, keys=[public], required=True).poll({}, NOW).refused
