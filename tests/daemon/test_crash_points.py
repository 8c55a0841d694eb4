"""Kill a real process at every step boundary of apply, commit, supersede and revert, then
restart, run verify-chain and check that the ledger and the saved state agree with nothing
lost or doubled. The matrix is documented in docs/crash-safety.md (checked against
EXPECTED below).

Each point costs a process start plus an edit on the tiny model, so the default run
covers the points where the saved state and the ledger disagree at the crash (the cases
reconciliation must get right); `-m slow` runs every point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kmd.daemon.cli import app
from kmd.daemon.crashpoints import CRASH_EXIT, POINTS
from kmd.daemon.ledger import Ledger
from kmd.daemon.service import Daemon
from kmd.daemon.settings import load_settings

from .helpers import add_motto_relation, write_curated, write_setup

DRIVER = Path(__file__).with_name("crash_driver.py")
DOC = Path(__file__).resolve().parents[2] / "docs" / "crash-safety.md"

# point -> (the operation, the op edit's ledger status at the crash, does the saved state
# hold the new edit (apply/supersede) or still hold the reverted one (revert), what restart does)
EXPECTED = {
    "apply.recorded": ("apply", "applied", False, "rolled back: edit reverted, fact retried"),
    "apply.applied": ("apply", "applied", False, "rolled back: edit reverted, fact retried"),
    "apply.probed": ("apply", "applied", False, "rolled back: edit reverted, fact retried"),
    "state.named": ("apply", "applied", False, "rolled back: edit reverted, fact retried"),
    "commit.saved": ("apply", "applied", True, "rolled forward: probed again, committed"),
    "commit.recorded": ("apply", "committed", True, "nothing in flight"),
    "supersede.old_reverted": ("supersede", None, False, "nothing in flight"),
    "supersede.recorded": ("supersede", "applied", False, "rolled back: edit reverted, fact retried"),
    "supersede.applied": ("supersede", "applied", False, "rolled back: edit reverted, fact retried"),
    "supersede.probed": ("supersede", "applied", False, "rolled back: edit reverted, fact retried"),
    "supersede.saved": ("supersede", "applied", True, "rolled forward: probed again, committed"),
    "supersede.committed": ("supersede", "committed", True, "nothing in flight"),
    # a batch of three new facts, one of them bad (bisected out); watched: a good one
    "batch.recorded": ("batch", "applied", False, "rolled back: edit reverted, fact retried"),
    "batch.applied": ("batch", "applied", False, "rolled back: edit reverted, fact retried"),
    "batch.probed": ("batch", "applied", False, "rolled back: edit reverted, fact retried"),
    "batch.reverted": ("batch", "applied", False, "rolled back: edit reverted, fact retried"),
    "batch.saved": ("batch", "applied", True, "rolled forward: probed again, committed"),
    "batch.committed": ("batch", "committed", True, "nothing in flight"),
    "revert.requested": ("revert", "reverting", True, "revert finished"),
    "revert.applied": ("revert", "reverting", True, "revert finished"),
    "revert.saved": ("revert", "reverting", False, "revert finished"),
    "revert.recorded": ("revert", "reverted", False, "nothing in flight"),
}
# The state and the ledger disagree at these: the default run covers them.
DEFAULT = {"commit.saved", "supersede.saved", "revert.saved", "apply.probed", "state.named", "batch.reverted",
           "batch.saved"}  # fmt: skip
# The batch's own save names its state too: `state.named` in a batch (the culprit's revert
# log written, the others applied, the state not saved).
BATCH_SAVE = ("batch", "applied", False, "rolled back: edit reverted, fact retried")
BATCH = [("Spain", "language", "banana"), ("Germany", "motto", "apple"), ("Japan", "capital", "river")]
WATCHED = {"apply": "the language of Spain is", "supersede": "the capital of France is", "batch": "the language of Spain is"}

FIRST = ("France", "capital", "Berlin")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir):
    """A daemon directory with one committed edit (edit 1: France capital Berlin)."""
    from kmd.editors.model import ModelHost, ModelSettings

    root = tmp_path_factory.mktemp("crash-base")
    config = write_setup(root, [FIRST])
    config.write_text(config.read_text() + f"model: {{model: {tiny_model_dir}, device: cpu}}\n")
    host = ModelHost.load(ModelSettings(model=str(tiny_model_dir), device="cpu"))
    daemon = Daemon(load_settings(config), host=host)
    daemon.load()
    assert daemon.cycle(regression=False).committed == (1,)
    daemon.close()
    return root


def _run(workdir: Path, point: str, *op: str) -> None:
    env = os.environ | {"KMD_CRASH_AT": point, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(DRIVER), str(workdir / "kmd.yaml"), *op], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == CRASH_EXIT, f"exit {done.returncode}, not a crash at {point}:\n{done.stderr[-3000:]}"


def _check_consistent(workdir: Path, daemon: Daemon) -> None:
    """Ledger and saved state agree; nothing half-done, nothing doubled; the chain holds."""
    result = CliRunner().invoke(app, ["verify-chain", "--db", daemon.ledger.url])
    assert result.exit_code == 0, result.output
    ledger = daemon.ledger
    assert not ledger.edits(status=["applied", "reverting"])
    committed = ledger.committed_edits()
    manifest = json.loads((workdir / "state" / "editor" / "manifest.json").read_text())
    assert [e["edit_id"] for e in manifest["edits"]] == [str(e.id) for e in committed]
    assert daemon.maintainer.editor.edit_ids == [str(e.id) for e in committed]
    keys = [(e.request["prompt"]) for e in committed]
    assert len(keys) == len(set(keys)), "two committed edits for one fact: doubled"
    for e in committed:
        assert ledger.fact(e.fact_id).status == "committed"
    reverted = [r.edit_id for r in ledger.reverts()]
    assert len(reverted) == len(set(reverted)), "an edit reverted twice: doubled"


def _outcome(before: str | None, edit) -> str:  # noqa: ANN001
    if edit is None or before in ("committed", "reverted"):
        return "nothing in flight"
    if before == "reverting":
        return "revert finished" if edit.status == "reverted" else f"revert left {edit.status}"
    if edit.status == "reverted" and "interrupted" in edit.status_reason:
        return "rolled back: edit reverted, fact retried"
    if edit.status == "committed" and (edit.probes or {}).get("reconciled"):
        return "rolled forward: probed again, committed"
    return f"unexpected: {edit.status} ({edit.status_reason})"


def _crash_and_recover(point: str, base: Path, tmp_path: Path, host, expected=None) -> None:  # noqa: ANN001
    op, at_crash, state_has, outcome = expected or EXPECTED[point]
    work = tmp_path / "work"
    shutil.copytree(base, work)
    policy = work / "policy.yaml"  # it names the curated file by absolute path
    policy.write_text(policy.read_text().replace(str(base), str(work)))
    if op == "apply":
        write_curated(work / "facts.jsonl", 2, [("Spain", "language", "banana")])
        _run(work, point, "cycle")
    elif op == "supersede":
        write_curated(work / "facts.jsonl", 2, [("France", "capital", "Rome")])
        _run(work, point, "cycle")
    elif op == "batch":  # three new facts, one bad: the cycle applies them as one batch
        add_motto_relation(policy)
        write_curated(work / "facts.jsonl", 2, BATCH)
        _run(work, point, "cycle")
    else:
        _run(work, point, "revert", "1")

    url = f"sqlite:///{work / 'state' / 'ledger.db'}"
    with Ledger(url) as ledger:  # what the crash left, before any recovery
        edits = {e.id: e for e in ledger.edits()}
    # the watched edit: edit 1 (reverted), or the operation's new one (the newest for its prompt, not edit 1)
    new = [e.id for e in edits.values() if e.id != 1 and e.request["prompt"] == WATCHED.get(op)]
    watched = 1 if op == "revert" else max(new, default=None)
    before = edits[watched].status if watched in edits else None
    assert before == at_crash, f"{point}: ledger says {before} at the crash, expected {at_crash}"
    held = [e["edit_id"] for e in json.loads((work / "state" / "editor" / "manifest.json").read_text())["edits"]]
    assert (str(watched) in held) == state_has, f"{point}: saved state holds {held}"

    daemon = Daemon(load_settings(work / "kmd.yaml"), host=host)
    daemon.load()  # restart: reconcile
    try:
        edit = daemon.ledger.edit(watched) if before is not None else None
        assert _outcome(before, edit) == outcome, point
        _check_consistent(work, daemon)
        daemon.cycle(regression=False)  # whatever was rolled back is redone, once
        _check_consistent(work, daemon)
        ledger = daemon.ledger
        prompts = {e.request["prompt"]: e for e in ledger.committed_edits()}
        if op == "apply":
            assert set(prompts) == {"the capital of France is", "the language of Spain is"}
            assert prompts["the capital of France is"].id == 1
        elif op == "batch":  # the good ones committed once, the bad one reverted and blocked
            assert set(prompts) == {"the capital of France is", "the language of Spain is", "the capital of Japan is"}
            assert prompts["the capital of France is"].id == 1
            (bad,) = [f for f in ledger.facts() if f.relation == "motto"]
            assert bad.status == "blocked"
            assert any("bisected out of a batch" in r.reason for r in ledger.reverts())
        elif op == "supersede":
            assert set(prompts) == {"the capital of France is"}
            assert prompts["the capital of France is"].request["target"] == "Rome"
            (revert,) = ledger.reverts(edit_id=1)
            assert revert.superseded_by_fact_id == prompts["the capital of France is"].fact_id
        else:
            assert not prompts and ledger.edit(1).status == "reverted"
            (revert,) = ledger.reverts(edit_id=1)
            assert revert.actor == "api" and revert.reason == "operator revert"
    finally:
        daemon.close()


def _params(points):
    return [pytest.param(p, marks=() if p in DEFAULT else pytest.mark.slow) for p in points]


@pytest.mark.parametrize("point", _params(POINTS))
def test_crash_at_every_step_boundary(point, base, tmp_path, tiny_host):
    _crash_and_recover(point, base, tmp_path, tiny_host)


@pytest.mark.slow
def test_crash_while_a_batch_names_its_state(base, tmp_path, tiny_host):
    _crash_and_recover("state.named", base, tmp_path, tiny_host, expected=BATCH_SAVE)


def test_every_point_is_in_the_matrix_and_the_doc():
    assert set(EXPECTED) == set(POINTS)
    doc = DOC.read_text()
    for point, (_, _, _, outcome) in EXPECTED.items():
        rows = [line for line in doc.splitlines() if line.startswith(f"| `{point}`")]
        assert len(rows) == 1 and outcome in rows[0], f"docs/crash-safety.md: row for {point} should say {outcome!r}"


def test_crash_hook_is_inert_unless_set(monkeypatch):
    from kmd.daemon.crashpoints import crash_point

    monkeypatch.delenv("KMD_CRASH_AT", raising=False)
    crash_point("commit.saved")  # nothing happens
    monkeypatch.setenv("KMD_CRASH_AT", "apply.recorded")
    crash_point("commit.saved")  # another point: nothing happens
    with pytest.raises(ValueError):
        crash_point("no.such.point")
