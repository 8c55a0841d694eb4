"""A flagged ledger is never written to, and a rollback of the chain's tail shows (issue 27,
case 5): the daemon started as the writer on a ledger `verify-chain` rejected and kept
appending; putting back an older copy of the database passed `verify-chain` unless
`--expect-head` was given. Now the head is also kept outside the database (a head file
that `verify-chain` compares by default, the head published beside the states for
replicas, and the `kmd_ledger_head_seq` metric)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from kmd.daemon.api import create_app
from kmd.daemon.cli import app
from kmd.daemon.ledger import Ledger
from kmd.daemon.policy import load_policy
from kmd.daemon.replication import Replica
from kmd.daemon.service import Daemon, FlaggedLedgerError
from kmd.daemon.settings import load_settings

from .helpers import write_setup


def _daemon(config: Path, host) -> Daemon:  # noqa: ANN001
    daemon = Daemon(load_settings(config), host=host)
    daemon.load()
    return daemon


def _copy_db(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite database (a backup, later put back: a rollback)."""
    dst.unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(f"{dst}{suffix}").unlink(missing_ok=True)
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()


def _events(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        count = conn.execute("select count(*) from kmd_event").fetchone()[0]
    conn.close()
    return count


def test_the_writer_refuses_a_ledger_that_verify_chain_rejects(tmp_path, tiny_host):
    config = write_setup(tmp_path, [("France", "capital", "Berlin")])
    daemon = _daemon(config, tiny_host)
    daemon.cycle()
    daemon.close()
    db = tmp_path / "state" / "ledger.db"
    with sqlite3.connect(db) as conn:  # an event altered in place
        conn.execute("update kmd_event set reason = 'nothing to see' where seq = 2")
    conn.close()
    before = _events(db)
    with daemon.maintainer.editor.suspended():
        with pytest.raises(FlaggedLedgerError, match=r"fails verify-chain .*event 2.*refusing to start as its writer. "
                                                      r"Inspect it with `kmd verify-chain --db"):  # fmt: skip
            _daemon(config, tiny_host)
        result = CliRunner().invoke(app, ["run", "--config", str(config), "--once"])
        assert result.exit_code == 2 and "refusing to start as its writer" in result.output, result.output
    assert _events(db) == before  # nothing appended to it


def test_a_rollback_of_the_chains_tail_shows_without_expect_head(tmp_path, tiny_host):
    config = write_setup(tmp_path, [("France", "capital", "Berlin")])
    daemon = _daemon(config, tiny_host)
    (edit_id,) = daemon.cycle().committed
    db = tmp_path / "state" / "ledger.db"
    _copy_db(db, tmp_path / "backup.db")
    daemon.maintainer.revert(edit_id, reason="operator says no", actor="alice")  # more events
    head = daemon.ledger.chain_head()
    with TestClient(create_app(daemon)) as client:  # the head is in the metrics too
        assert f"kmd_ledger_head_seq {float(head.seq)}" in client.get("/metrics").text
    daemon.close()
    url = f"sqlite:///{db}"
    ok = CliRunner().invoke(app, ["verify-chain", "--db", url])
    assert ok.exit_code == 0 and f"head file {tmp_path / 'state' / 'chain-head.json'}: seq {head.seq}" in ok.output

    _copy_db(tmp_path / "backup.db", db)  # the older copy put back: consistent in itself
    assert Ledger(url).verify_chain().ok  # (the chain alone cannot tell)
    result = CliRunner().invoke(app, ["verify-chain", "--db", url])
    assert result.exit_code == 1, result.output
    assert f"recorded the chain head at seq {head.seq}, but the chain ends at seq" in result.output
    assert "newest events were removed (a rollback)" in result.output
    with daemon.maintainer.editor.suspended():
        with pytest.raises(FlaggedLedgerError, match="a rollback"):
            _daemon(config, tiny_host)


def test_a_replica_sees_a_rollback_behind_the_published_head(tmp_path, tiny_host, tiny_model_dir):
    from kmd.editors.model import ModelHost, ModelSettings

    config = write_setup(tmp_path, [("France", "capital", "Berlin")])
    config.write_text(config.read_text() + "cluster: {publish_dir: published}\n")
    writer = _daemon(config, tiny_host)
    db = tmp_path / "state" / "ledger.db"
    _copy_db(db, tmp_path / "backup.db")
    writer.cycle()  # a commit, published with the chain's head
    writer.close()
    (tmp_path / "state" / "chain-head.json").unlink()  # even with the writer's own head file gone
    _copy_db(tmp_path / "backup.db", db)

    host = ModelHost.load(ModelSettings(model=str(tiny_model_dir), device="cpu"))
    with Ledger(f"sqlite:///{db}") as ledger:
        replica = Replica(host, ledger, load_policy(writer.settings.policy_path), writer.settings.publish_path)
        assert not replica.sync()
        ready, why = replica.readiness()
        assert not ready and "published head" in why and "a rollback" in why, why
    with writer.maintainer.editor.suspended():
        with pytest.raises(FlaggedLedgerError, match=r"published head .*a rollback.*--head-file .*published/chain-head.json"):
            _daemon(config, tiny_host)


def test_verify_chain_says_when_there_is_no_head_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger(url).close()
    result = CliRunner().invoke(app, ["verify-chain", "--db", url])
    assert result.exit_code == 0 and f"no head file at {tmp_path / 'chain-head.json'} yet" in result.output
