"""Issue 16 reproductions on the daemon: a lost operator revert (finding 2), hand-edited
edit requests in the saved manifest (finding 3), and the API's limits (finding 5)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from kmd.daemon.api import create_app
from kmd.daemon.service import Daemon
from kmd.daemon.settings import load_settings
from kmd.editors.state import StateError

from .flood import Flood
from .helpers import write_setup

TOKEN = "s3cret"


def loaded(tmp_path, host, facts, monkeypatch=None, **kw):
    config = write_setup(tmp_path, facts, **kw)
    if monkeypatch is not None:
        monkeypatch.setenv("KMD_TEST_TOKEN", TOKEN)
    daemon = Daemon(load_settings(config), host=host)
    daemon.load()
    return daemon


def restart(tmp_path, host) -> Daemon:
    again = Daemon(load_settings(tmp_path / "kmd.yaml"), host=host)
    again.load()
    return again


def test_revert_interrupted_after_the_save_is_finished_at_restart(tmp_path, tiny_host, monkeypatch):
    """Finding 2: a revert through the API, then a kill after the state was saved but before
    the ledger heard of it. Restart re-applied the edit without probes and logged nothing.
    Now the request is in the ledger first, and restart finishes the revert."""
    daemon = loaded(tmp_path, tiny_host, [("France", "capital", "Berlin"), ("Spain", "language", "banana")])
    committed = daemon.cycle().committed
    assert len(committed) == 2
    target = committed[0]
    m = daemon.maintainer

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed between the save and the ledger write")

    monkeypatch.setattr(daemon.ledger, "revert_edit", killed)
    with pytest.raises(KeyboardInterrupt):
        m.revert(target, reason="wrong capital", actor="api")
    monkeypatch.undo()
    manifest = json.loads((tmp_path / "state" / "editor" / "manifest.json").read_text())
    assert str(target) not in [e["edit_id"] for e in manifest["edits"]]  # the save happened
    daemon.close()

    with m.editor.suspended():  # the dead process's hooks off the shared model
        again = restart(tmp_path, tiny_host)
        edit = again.ledger.edit(target)
        assert edit.status == "reverted" and edit.status_reason == "wrong capital"
        (revert,) = again.ledger.reverts()
        assert revert.edit_id == target and revert.actor == "api" and revert.reason == "wrong capital"
        assert str(target) not in again.maintainer.editor.edit_ids
        assert again.maintainer.editor.edit_ids == [str(committed[1])]
        assert again.ledger.verify_chain().ok
        again.close()


def test_revert_requested_from_the_cli_is_carried_out_by_the_daemon(tmp_path, tiny_host):
    from typer.testing import CliRunner

    from kmd.daemon.cli import app

    daemon = loaded(tmp_path, tiny_host, [("France", "capital", "Berlin")])
    (edit_id,) = daemon.cycle().committed
    db = daemon.ledger.url
    result = CliRunner().invoke(app, ["revert", f"e{edit_id}", "-m", "operator says no", "--as", "alice", "--db", db])
    assert result.exit_code == 0, result.output
    assert daemon.ledger.edit(edit_id).status == "reverting"
    assert str(edit_id) in daemon.maintainer.editor.edit_ids  # not yet: the daemon does it
    daemon.cycle()
    assert daemon.ledger.edit(edit_id).status == "reverted" and not daemon.maintainer.editor.edit_ids
    (revert,) = daemon.ledger.reverts()
    assert revert.actor == "alice" and revert.reason == "operator says no"
    daemon.close()


def test_a_lost_state_is_rebuilt_only_through_the_probes(tmp_path, tiny_host):
    """Committed edits missing from the saved state go back only if their probes pass."""
    import shutil

    daemon = loaded(tmp_path, tiny_host, [("France", "capital", "Berlin")])
    (edit_id,) = daemon.cycle().committed
    daemon.close()
    with daemon.maintainer.editor.suspended():
        shutil.rmtree(tmp_path / "state" / "editor")  # the state directory is lost
        again = restart(tmp_path, tiny_host)
        assert again.maintainer.editor.edit_ids == [str(edit_id)]  # re-applied: its probes passed
        assert again.ledger.edit(edit_id).status == "committed"
        again.close()
        with again.maintainer.editor.suspended():
            shutil.rmtree(tmp_path / "state" / "editor")
            policy = tmp_path / "policy.yaml"  # now the paraphrase must hold too: it does not
            policy.write_text(policy.read_text().replace("min_gen: 0.0", "min_gen: 1.0"))
            third = restart(tmp_path, tiny_host)
            assert third.maintainer.editor.edit_ids == []
            edit = third.ledger.edit(edit_id)
            assert edit.status == "reverted" and "re-applied but probes failed" in edit.status_reason
            assert third.ledger.fact(edit.fact_id).status == "blocked"
            assert third.ledger.verify_chain().ok
            third.close()


def _tamper(tmp_path, change):
    path = tmp_path / "state" / "editor" / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_hand_edited_edit_request_in_the_manifest_is_refused(tmp_path, tiny_host):
    """Finding 3: changing an edit's "target" in manifest.json went unnoticed at restart."""
    daemon = loaded(tmp_path, tiny_host, [("France", "capital", "Berlin")])
    (edit_id,) = daemon.cycle().committed
    daemon.close()
    with daemon.maintainer.editor.suspended():
        _tamper(tmp_path, lambda m: m["edits"][0].update(target="Paris"))
        with pytest.raises(StateError, match=rf"edit {edit_id} does not match its checksum"):
            restart(tmp_path, tiny_host)

        # The same change with the checksum recomputed: the ledger does not name that state
        # (issue 27: the state is bound to the ledger; tests/daemon/test_state_binding.py).
        from kmd.editors.state import edit_checksum

        def forge(m):
            m["edit_checksums"][0] = edit_checksum(m["edits"][0])

        _tamper(tmp_path, forge)
        with pytest.raises(StateError, match="is not one the ledger recorded"):
            restart(tmp_path, tiny_host)


# -- the API's limits (finding 5) -----------------------------------------------------------


@pytest.fixture
def api(tmp_path, monkeypatch):
    write_setup(tmp_path, [("France", "capital", "Berlin")])
    monkeypatch.setenv("KMD_TEST_TOKEN", TOKEN)
    daemon = Daemon(load_settings(tmp_path / "kmd.yaml"))
    with TestClient(create_app(daemon)) as client:
        yield client
    daemon.close()


def test_oversized_bodies_get_413_before_auth(api):
    """Finding 5: an unauthenticated 300 MB POST was read whole before its 401."""
    big = b'{"subject": "' + b"x" * 1_100_000 + b'"}'
    answer = api.post("/v1/facts", content=big, headers={"content-type": "application/json"})
    assert answer.status_code == 413
    # streamed without a Content-Length: counted as it arrives
    answer = api.post("/v1/facts", content=(b"x" * 65536 for _ in range(20)), headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert api.post("/v1/facts", json={"subject": "x"}).status_code == 401  # small bodies reach auth as before


def test_non_ascii_token_and_huge_ids_are_client_errors(api):
    """Finding 5: a non-ASCII bearer token and an edit id over 2^63 gave 500s."""
    answer = api.post("/v1/facts", json={"subject": "a", "relation": "capital", "object": "b"},
                      headers={"Authorization": "Bearer t\u00f6ken\u00e9".encode()})  # raw UTF-8 bytes on the wire
    assert answer.status_code == 401
    assert api.get(f"/v1/edits/{2**63}").status_code == 422
    assert api.get(f"/v1/edits/{2**63 - 1}").status_code == 404
    assert api.post(f"/v1/edits/{2**64}/revert", json={}, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 422


def test_token_less_api_beyond_loopback_needs_insecure(tmp_path, monkeypatch):
    from loguru import logger

    from kmd.daemon.service import InsecureConfigError

    config = write_setup(tmp_path, [("France", "capital", "Berlin")])
    config.write_text(config.read_text().replace("host: 127.0.0.1", "host: 0.0.0.0"))
    monkeypatch.delenv("KMD_TEST_TOKEN", raising=False)
    with pytest.raises(InsecureConfigError, match="--insecure"):
        Daemon(load_settings(config))
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    try:
        Daemon(load_settings(config), insecure=True).close()
    finally:
        logger.remove(sink)
    assert any("no API token is configured" in line for line in lines)


def test_health_answers_fast_while_generation_is_saturated(tmp_path, tiny_host):
    """Finding 5: 45 concurrent /v1/generate requests made /healthz take 37 s. Health checks
    now run on the event loop and generation has a budget (429 beyond it)."""
    config = write_setup(tmp_path, [("France", "capital", "Berlin")])
    daemon = Daemon(load_settings(config), host=tiny_host)
    daemon.load()
    daemon.start_api()
    base = daemon.api_url
    body = {"prompt": "the capital of France is", "max_new_tokens": 64}
    try:
        with Flood(f"{base}/v1/generate", body, 45, tmp_path) as flood:
            flood.wait_until_budget_spent()
            timings = []
            with httpx.Client(timeout=30) as client:
                for path in ["/healthz", "/readyz"] * 5:
                    started = time.perf_counter()
                    assert client.get(base + path).status_code in (200, 503)
                    timings.append(time.perf_counter() - started)
                    time.sleep(0.05)
    finally:
        daemon.stop_api()
        daemon.close()
    timings.sort()
    # The finding was 37 s. The bounds leave room for a 2-core machine that is also running
    # other work (0.1 s / 1.0 s failed there now and then, never on an idle one).
    assert timings[len(timings) // 2] < 0.25, timings  # the median
    assert timings[-1] < 2.0, timings


@pytest.mark.parametrize("number", [2**64, 10**23, 2**63])
def test_cli_ids_beyond_the_databases_integers_are_one_line_errors(tmp_path, number):
    """Issue 27: `kmd ledger show`, `revert`, `approve` and `reject` printed a traceback (OverflowError)."""
    from typer.testing import CliRunner

    from kmd.daemon.cli import app
    from kmd.daemon.ledger import Ledger

    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger(db).close()
    for args, kind in ((["ledger", "show", f"e{number}"], "edit"), (["ledger", "show", str(number)], "fact"),
                       (["ledger", "show", f"c{number}"], "claim"), (["revert", str(number)], "edit"),
                       (["approve", str(number)], "fact"), (["reject", f"f{number}"], "fact")):  # fmt: skip
        result = CliRunner().invoke(app, [*args, "--db", db])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args, repr(result.exception))
        assert result.output.strip() == f"no {kind} {number}", (args, result.output)
