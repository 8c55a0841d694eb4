"""The maintenance loop in process, on the tiny random model (fast)."""

from __future__ import annotations

import pytest
import torch

from kmd.daemon.service import Daemon
from kmd.daemon.settings import load_settings
from kmd.editors.batching import left_padded

from kmd.editors.scoring import score_targets

from .helpers import add_motto_relation, write_curated, write_setup

PROMPTS = ["the capital of France is", "the language of Spain is", "the dog and the cat", "who wrote the book ?"]


def logits(host, editor):
    ids, attention = left_padded(host, PROMPTS)
    with torch.no_grad(), editor.query(attention.bool()):
        return host.model(input_ids=ids, attention_mask=attention).logits


def make_daemon(tmp_path, host, facts, **kw):
    config = write_setup(tmp_path, facts, **kw)
    return Daemon(load_settings(config), host=host), tmp_path


def test_cycle_commits_edits_and_state_survives_restart(tmp_path, tiny_host):
    daemon, tmp = make_daemon(tmp_path, tiny_host, [("France", "capital", "Berlin"), ("Spain", "language", "banana")])
    daemon.load()
    summary = daemon.cycle()
    assert summary.new_facts == 2 and len(summary.committed) == 2, summary
    m = daemon.maintainer
    edits = daemon.ledger.committed_edits()
    assert [str(e.id) for e in edits] == m.editor.edit_ids
    assert edits[0].probes["rel"] == 1.0 and edits[0].policy_version.startswith("test-1@")
    expected = logits(tiny_host, m.editor)
    with m.editor.suspended():  # a restart: a new daemon on the same state and ledger
        daemon.close()
        again = Daemon(load_settings(tmp / "kmd.yaml"), host=tiny_host)
        again.load()
        assert again.maintainer.editor.edit_ids == m.editor.edit_ids
        assert torch.equal(logits(tiny_host, again.maintainer.editor), expected)
        again.close()


def test_newer_fact_supersedes_the_committed_edit(tmp_path, tiny_host):
    daemon, tmp = make_daemon(tmp_path, tiny_host, [("France", "capital", "Berlin")])
    daemon.load()
    first = daemon.cycle().committed
    write_curated(tmp / "facts.jsonl", 2, [("France", "capital", "Rome")])
    second = daemon.cycle()
    assert len(second.committed) == 1
    m = daemon.maintainer
    assert m.editor.edit_ids == [str(second.committed[0])]
    revert = daemon.ledger.reverts()[0]
    assert revert.edit_id == first[0] and revert.superseded_by_fact_id is not None
    assert m.editor.request(m.editor.edit_ids[0]).target == "Rome"
    daemon.close()


def test_degrading_edit_is_reverted_and_outputs_return_bit_for_bit(tmp_path, tiny_host):
    daemon, tmp = make_daemon(tmp_path, tiny_host, [("France", "capital", "Berlin")], min_loc=0.999)
    daemon.load()
    m = daemon.maintainer
    daemon.cycle()
    before = logits(tiny_host, m.editor)
    # An edit that fires on every prompt (the fake backend's fault injection).
    write_curated(tmp / "facts.jsonl", 2, [("Spain", "language", "banana")])
    with m.editor.configured(fires_everywhere=True):
        summary = daemon.cycle()
    assert summary.reverted and not summary.committed, summary
    revert = daemon.ledger.reverts()[0]
    assert "locality" in revert.reason and revert.probes_before["loc"] < 0.999
    assert torch.equal(logits(tiny_host, m.editor), before)
    fact = daemon.ledger.fact(daemon.ledger.edit(summary.reverted[0]).fact_id)
    assert fact.status == "blocked"
    daemon.close()


def test_an_edit_that_did_not_take_is_retried_once_stronger_and_committed(tmp_path, tiny_host):
    """The single edit's retry: the first attempt (the fake's `weak`: it acts on no row) did
    not take and harmed nothing, so it is reverted with its fact put back to ready, and the
    one retry with the backend's stronger overrides is applied, probed and committed."""
    daemon, tmp = make_daemon(tmp_path, tiny_host, [("France", "capital", "Berlin")])
    daemon.load()
    m = daemon.maintainer
    with m.editor.configured(weak=True):  # the backend's base options for this cycle
        assert m.editor.stronger_overrides() == {"weak": False}
        summary = daemon.cycle(regression=False)
    ledger = daemon.ledger
    assert len(summary.committed) == 1 and not summary.reverted, summary
    retry = ledger.edit(summary.committed[0])
    (first,) = [e for e in ledger.edits(fact_id=retry.fact_id) if e.id != retry.id]
    assert first.id < retry.id and first.status == "reverted" and retry.status == "committed"
    assert first.backend_config["weak"] is True and retry.backend_config["weak"] is False
    (revert,) = ledger.reverts(edit_id=first.id)
    assert revert.probes_before["took"] is False and revert.probes_before["failures"]  # missed, no harm
    assert ledger.events(entity="edit", entity_id=retry.id)[0].reason == "retry 1 with {'weak': False}"
    assert ledger.fact(retry.fact_id).status == "committed"
    assert m.editor.edit_ids == [str(retry.id)] and m.serving.edit_ids == m.editor.edit_ids
    request = m.serving.request(str(retry.id))
    assert score_targets(tiny_host, m.serving, [(request.prompt, "Berlin")])[0].accuracy == 1.0
    assert (m.stats.edits_committed, m.stats.edits_reverted, m.stats.edits_retried) == (1, 1, 1)
    daemon.close()


def test_without_a_stronger_option_an_edit_that_did_not_take_is_blocked(tmp_path, tiny_host):
    """The same miss made by a relation's options (the base config is not weak: no stronger
    retry is offered): reverted once, and its fact blocked rather than retried blindly."""
    config = write_setup(tmp_path, [("France", "motto", "Liberty")])
    add_motto_relation(tmp_path / "policy.yaml", "{weak: true}")
    daemon = Daemon(load_settings(config), host=tiny_host)
    daemon.load()
    summary = daemon.cycle(regression=False)
    ledger = daemon.ledger
    (reverted,) = summary.reverted
    edit = ledger.edit(reverted)
    assert edit.edit_request.subject == "France" and edit.backend_config["weak"] is True
    assert ledger.fact(edit.fact_id).status == "blocked" and len(ledger.edits(fact_id=edit.fact_id)) == 1
    assert daemon.maintainer.stats.edits_retried == 0
    daemon.close()


def test_interrupted_edit_is_rolled_back_on_restart(tmp_path, tiny_host):
    """A crash between apply and commit: the ledger says applied, the saved state lacks it."""
    daemon, tmp = make_daemon(tmp_path, tiny_host, [("France", "capital", "Berlin")])
    daemon.load()
    daemon.ingest(all_sources=True)
    fact = daemon.ledger.ready_facts()[0]
    record = daemon.ledger.record_edit_applied(fact.id, request={"prompt": "x", "target": "y"}, backend="fake",
                                               backend_config={}, policy_version="t")  # fmt: skip
    daemon.close()
    again = Daemon(load_settings(tmp / "kmd.yaml"), host=tiny_host)
    again.load()
    assert again.ledger.edit(record.id).status == "reverted"
    assert again.ledger.fact(fact.id).status == "ready"  # retried, not lost
    summary = again.cycle()
    assert len(summary.committed) == 1
    again.close()


def test_failed_superseding_edit_keeps_the_old_one(tmp_path, tiny_host):
    """A newer fact whose edit fails its probes must not cost the older committed fact."""
    daemon, tmp = make_daemon(tmp_path, tiny_host, [("France", "capital", "Berlin")], min_loc=0.999)
    daemon.load()
    first = daemon.cycle().committed
    m = daemon.maintainer
    before = logits(tiny_host, m.editor)
    write_curated(tmp / "facts.jsonl", 2, [("France", "capital", "Rome")])
    with m.editor.configured(fires_everywhere=True):  # fires on every prompt: locality fails
        summary = daemon.cycle()
    assert summary.reverted and not summary.committed, summary
    assert m.editor.edit_ids == [str(first[0])]
    assert torch.equal(logits(tiny_host, m.editor), before)
    old = daemon.ledger.edit(first[0])
    assert old.status == "committed" and daemon.ledger.fact(old.fact_id).status == "committed"
    assert all(r.superseded_by_fact_id is None for r in daemon.ledger.reverts())
    daemon.close()


def test_crash_before_a_superseding_commit_is_finished_at_restart(tmp_path, tiny_host, monkeypatch):
    """A crash after the new state was saved but before the ledger committed the replacement:
    the saved state is the one whose probes passed, so restart probes it again and commits
    the replacement (the old edit recorded as superseded), never re-applying the old edit."""
    daemon, tmp = make_daemon(tmp_path, tiny_host, [("France", "capital", "Berlin")])
    daemon.load()
    first = daemon.cycle().committed
    m = daemon.maintainer
    write_curated(tmp / "facts.jsonl", 2, [("France", "capital", "Rome")])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(daemon.ledger, "commit_edit", crash)
    with pytest.raises(KeyboardInterrupt):
        daemon.cycle()
    monkeypatch.undo()
    assert m.editor.edit_ids != [str(first[0])]  # the saved state holds the new edit only
    expected = logits(tiny_host, m.editor)
    (new_id,) = m.editor.edit_ids
    with m.editor.suspended():  # the crashed process's hooks off the shared model
        again = Daemon(load_settings(tmp / "kmd.yaml"), host=tiny_host)
        again.load()
        assert again.maintainer.editor.edit_ids == [new_id]
        assert torch.equal(logits(tiny_host, again.maintainer.editor), expected)
        new = again.ledger.edit(int(new_id))
        assert new.status == "committed" and new.probes["reconciled"] is True
        assert again.ledger.edit(first[0]).status == "reverted"
        (revert,) = again.ledger.reverts()
        assert revert.edit_id == first[0] and revert.superseded_by_fact_id == new.fact_id
        assert again.ledger.verify_chain().ok
        assert not again.cycle().committed  # nothing left to redo
        again.close()


def test_an_edit_that_hijacks_same_subject_questions_is_reverted(tmp_path, tiny_host):
    """The same-subject probe: an edit that answers another question about its subject with
    its own target is reverted with that reason, and the model is as before, bit for bit."""
    # ("Madrid ." : the tiny model glues the next word onto the target's last one otherwise)
    daemon, tmp = make_daemon(tmp_path, tiny_host, [("France", "capital", "Madrid .")])
    daemon.load()
    m = daemon.maintainer
    before = logits(tiny_host, m.editor)
    with m.editor.configured(fires_on_subject=True):  # fires on every prompt naming France
        summary = daemon.cycle()
    assert summary.reverted and not summary.committed, summary
    revert = daemon.ledger.reverts()[0]
    assert "same-subject" in revert.reason and "the language of France is" in revert.reason
    same = revert.probes_before["same_subject"]
    hijacked = [f for f in same if f["hijacked"]]
    assert hijacked and hijacked[0]["after"].startswith("Madrid") and not hijacked[0]["before"].startswith("Madrid")
    assert torch.equal(logits(tiny_host, m.editor), before)
    assert daemon.ledger.fact(daemon.ledger.edit(summary.reverted[0]).fact_id).status == "blocked"
    daemon.close()


def test_a_specific_edit_keeps_same_subject_answers_and_records_them(tmp_path, tiny_host):
    daemon, _ = make_daemon(tmp_path, tiny_host, [("France", "capital", "Berlin")])
    daemon.load()
    summary = daemon.cycle()
    assert len(summary.committed) == 1, summary
    same = daemon.ledger.edit(summary.committed[0]).probes["same_subject"]
    assert [f["prompt"] for f in same] == ["the language of France is"]
    assert all(f["unchanged"] and not f["hijacked"] for f in same)
    daemon.close()
