"""The ledger: lifecycle methods for the maintenance loop, tamper detection, the CLI."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from kmd.daemon.cli import app
from kmd.daemon.ledger import ClaimUpdate, Ledger, LedgerError
from kmd.daemon.logs import configure_logging
from kmd.sources.claims import Claim


def seed(ledger: Ledger, *, sensitive: bool = False) -> int:
    """Two claims and a verified fact built from them; returns the fact id."""
    t = datetime(2024, 12, 1, tzinfo=UTC)
    claims = [Claim("France", "capital", "Paris", src, f"https://{src}.example/1", t, ref="1") for src in ("a", "b")]
    ids = ledger.record_claims(claims, policy_version="test@abc", channel="feed").new_ids
    with ledger.transaction("verifier") as tx:
        fact = tx.add_fact(subject="France", relation="capital", object="Paris", subject_key="france", observed_at=t,
                           claim_ids=ids, sensitive=sensitive, policy_version="test@abc", reason="quorum")  # fmt: skip
        tx.update_claims([ClaimUpdate(i, "accepted", "supports", fact.id) for i in ids])
    return fact.id


REQUEST = {"prompt": "The capital of France is", "target": "Paris", "subject": "France", "rephrases": []}


def apply(ledger: Ledger, fact_id: int):
    return ledger.record_edit_applied(fact_id, request=REQUEST, backend="grace", backend_config={"eps": 1.0},
                                      policy_version="test@abc")  # fmt: skip


@pytest.fixture
def db(tmp_path, clock):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Ledger(url, clock=clock) as ledger:
        yield url, ledger, tmp_path / "ledger.db"


def test_sqlite_settings(db):
    url, ledger, path = db
    with ledger._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_edit_lifecycle_with_full_provenance(db):
    _, ledger, _ = db
    fid = seed(ledger)
    edit = apply(ledger, fid)
    assert edit.status == "applied" and ledger.fact(fid).status == "applied"
    assert edit.sources == ("a", "b") and len(edit.content_hashes) == 2
    assert edit.backend == "grace" and edit.backend_config == {"eps": 1.0} and edit.request == REQUEST
    assert edit.policy_version == "test@abc"
    assert [e.id for e in ledger.uncommitted_edits()] == [edit.id]
    committed = ledger.commit_edit(edit.id, probes={"rel": 1.0, "gen": 0.8, "loc": 1.0})
    assert committed.status == "committed" and committed.probes == {"rel": 1.0, "gen": 0.8, "loc": 1.0}
    assert ledger.fact(fid).status == "committed" and ledger.uncommitted_edits() == []
    assert [e.id for e in ledger.committed_edits()] == [edit.id]
    with pytest.raises(LedgerError):
        ledger.commit_edit(edit.id, probes={})
    assert ledger.verify_chain().ok


def test_revert_blocks_the_fact_and_writes_the_revert_log(db):
    _, ledger, _ = db
    fid = seed(ledger)
    edit = apply(ledger, fid)
    revert = ledger.revert_edit(edit.id, reason="locality dropped", probes_before={"loc": 1.0}, probes_after={"loc": 0.7})
    assert revert.probes_after == {"loc": 0.7} and revert.actor == "daemon"
    assert ledger.edit(edit.id).status == "reverted"
    fact = ledger.fact(fid)
    assert fact.status == "blocked" and "locality dropped" in fact.status_reason
    assert ledger.ready_facts() == []  # not retried blindly
    assert ledger.approve(fid, actor="ops", reason="retry after fix").status == "ready"  # a person releases it
    edit2 = apply(ledger, fid)
    ledger.revert_edit(edit2.id, reason="transient", probes_before=None, probes_after=None, retry=True)
    assert ledger.fact(fid).status == "ready"
    assert [r.edit_id for r in ledger.reverts()] == [edit2.id, edit.id]
    assert ledger.verify_chain().ok


def test_invalid_transitions_are_refused(db):
    _, ledger, _ = db
    fid = seed(ledger)
    with pytest.raises(LedgerError):
        ledger.approve(fid, actor="x")  # ready, not quarantined
    with pytest.raises(LedgerError):
        ledger.record_edit_applied(999, request={}, backend="x", backend_config={}, policy_version="v")
    ledger.skip_fact(fid)
    with pytest.raises(LedgerError):
        apply(ledger, fid)
    with pytest.raises(LedgerError):
        with ledger.transaction("t") as tx:
            tx.update_claims([ClaimUpdate(1, "pending")])  # accepted claims stay accepted
    assert ledger.verify_chain().ok  # the failed transactions left nothing behind


def test_state_survives_a_restart_and_cursors_are_kept(db, clock):
    url, ledger, _ = db
    fid = seed(ledger)
    ledger.commit_edit(apply(ledger, fid).id, probes={"rel": 1.0})
    ledger.save_cursor("wire", {"etag": '"x"', "sequence": 3})
    ledger.close()
    with Ledger(url, clock=clock) as again:
        assert [e.fact_id for e in again.committed_edits()] == [fid]
        assert again.load_cursor("wire") == {"etag": '"x"', "sequence": 3}
        assert again.load_cursor("other") == {}
        assert again.verify_chain().ok


def tamper(path, sql: str, *args) -> None:
    conn = sqlite3.connect(path)
    conn.execute(sql, args)
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("sql", "expect"),
    [
        ("UPDATE kmd_event SET payload = replace(payload, 'quorum', 'QUORUM') WHERE kind = 'fact.verified'",
         "event altered"),
        ("DELETE FROM kmd_event WHERE seq = 3", "missing or reordered"),
        ("DELETE FROM kmd_event WHERE seq = (SELECT max(seq) FROM kmd_event)", "events deleted"),
        ("UPDATE kmd_event SET seq = -seq WHERE seq IN (2, 3)", "prev_hash does not match"),
        ("UPDATE kmd_claim SET object = 'Lyon' WHERE id = 1", "row altered"),
        ("UPDATE kmd_fact SET object = 'Lyon'", "row altered"),
        ("UPDATE kmd_edit SET request = '{}'", "row altered"),
        ("UPDATE kmd_fact SET status = 'ready'", "the events say 'committed'"),
        ("UPDATE kmd_edit SET probes = '{\"rel\": 1.0}'", "probes"),
        ("UPDATE kmd_event SET actor = 'mallory' WHERE seq = 1", "disagree with the hashed payload"),
        ("DELETE FROM kmd_chain_head", "chain head says seq 0"),
        ("INSERT INTO kmd_claim (content_hash, source_id, subject, relation, object, subject_key, url, ref, observed_at,"
         " ingested_at, flags, policy_version, status, status_reason) VALUES ('h', 's', 'x', 'capital', 'y', 'x', 'u',"
         " '', 't', 't', '[]', 'v', 'new', '')", "no creation event"),
    ],
    ids=["event-payload", "event-deleted", "tail-deleted", "reordered", "claim-row", "fact-row", "edit-row",
         "status-cache", "probe-cache", "event-column", "head-deleted", "row-inserted"],
)  # fmt: skip
def test_tampering_is_detected(db, sql, expect):
    url, ledger, path = db
    fid = seed(ledger)
    ledger.commit_edit(apply(ledger, fid).id, probes={"rel": 0.9})
    assert ledger.verify_chain().ok
    if "seq = -seq" in sql:  # swap two events: move them aside, then back in the other order
        tamper(path, sql)
        tamper(path, "UPDATE kmd_event SET seq = 3 WHERE seq = -2")
        tamper(path, "UPDATE kmd_event SET seq = 2 WHERE seq = -3")
    else:
        tamper(path, sql)
    report = ledger.verify_chain()
    assert not report.ok
    assert any(expect in p for p in report.problems), report.problems


def test_concurrent_writers_keep_one_valid_chain(db, clock):
    import threading

    url, ledger, _ = db
    others = [Ledger(url, clock=clock) for _ in range(3)]

    def write(n: int, target: Ledger) -> None:
        for i in range(20):
            c = Claim(f"S{n}-{i}", "capital", "X", f"src{n}", "u", clock(), ref=str(i))
            target.record_claims([c], policy_version="v", channel="feed")

    threads = [threading.Thread(target=write, args=(n, t)) for n, t in enumerate([ledger, *others])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = ledger.verify_chain()
    assert report.ok and report.events == 80
    for other in others:
        other.close()


def test_deleted_rows_are_detected(db):
    url, ledger, path = db
    fid = seed(ledger)
    edit = apply(ledger, fid)
    ledger.revert_edit(edit.id, reason="r", probes_before=None, probes_after=None)
    tamper(path, "PRAGMA foreign_keys=OFF")
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM kmd_revert")
    conn.commit()
    conn.close()
    assert any("revert 1: row deleted" in p for p in ledger.verify_chain().problems)


def test_expected_head(db):
    _, ledger, _ = db
    seed(ledger)
    head = ledger.verify_chain().head_hash
    assert ledger.verify_chain(expect_head=head).ok
    assert not ledger.verify_chain(expect_head="0" * 64).ok


# -- the CLI --------------------------------------------------------------------------------


def cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    # The CLI points loguru at the runner's stderr, which is closed afterwards: point it back.
    configure_logging("INFO")
    return result


def test_cli_list_show_approve_reject_reverts(db):
    url, ledger, _ = db
    quarantined = seed(ledger, sensitive=True)
    out = cli("ledger", "list", "--db", url)
    assert out.exit_code == 0 and f"f{quarantined}" in out.output and "quarantined" in out.output
    data = json.loads(cli("ledger", "list", "--db", url, "--json", "--status", "quarantined").output)
    assert [r["id"] for r in data["rows"]] == [quarantined] and data["counts"] == {"quarantined": 1}
    assert cli("ledger", "list", "--kind", "claims", "--db", url).exit_code == 0
    shown = json.loads(cli("ledger", "show", f"f{quarantined}", "--db", url, "--json").output)
    assert shown["record"]["object"] == "Paris" and len(shown["claims"]) == 2
    assert [e["kind"] for e in shown["events"]] == ["fact.verified"]
    assert "fact.verified" in cli("ledger", "show", str(quarantined), "--db", url).output

    out = cli("approve", f"f{quarantined}", "--reason", "checked", "--as", "dana", "--db", url)
    assert out.exit_code == 0 and "is now ready [by dana]" in out.output
    assert cli("approve", f"f{quarantined}", "--db", url).exit_code == 1  # already ready
    assert cli("approve", "e1", "--db", url).exit_code == 2
    assert cli("ledger", "show", "zz", "--db", url).exit_code == 2
    assert cli("ledger", "show", "f99", "--db", url).exit_code == 1

    edit = apply(ledger, quarantined)
    ledger.revert_edit(edit.id, reason="probe failed", probes_before={"loc": 1.0}, probes_after={"loc": 0.5})
    out = cli("reverts", "--db", url)
    assert out.exit_code == 0 and f"e{edit.id}" in out.output and "probe" in out.output
    reverts = json.loads(cli("reverts", "--db", url, "--json").output)
    assert reverts[0]["probes_after"] == {"loc": 0.5}
    assert cli("ledger", "list", "--kind", "edits", "--db", url).exit_code == 0
    assert "reverted" in cli("ledger", "show", f"e{edit.id}", "--db", url).output
    assert cli("reject", f"f{quarantined}", "-m", "wrong", "--db", url).exit_code == 0  # blocked -> rejected
    assert ledger.fact(quarantined).status == "rejected"


def test_cli_verify_chain(db, monkeypatch):
    url, ledger, path = db
    seed(ledger)
    monkeypatch.setenv("KMD_DB_URL", url)  # the default comes from the environment
    out = cli("verify-chain")
    assert out.exit_code == 0 and out.output.startswith("ok: ")
    head = json.loads(cli("verify-chain", "--json").output)["head_hash"]
    assert cli("verify-chain", "--expect-head", head).exit_code == 0
    tamper(path, "UPDATE kmd_claim SET object = 'Lyon' WHERE id = 2")
    out = cli("verify-chain")
    assert out.exit_code == 1 and "TAMPERING" in out.output and "claim 2" in out.output
