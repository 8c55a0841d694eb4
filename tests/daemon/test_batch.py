"""Bursts (issue 29): ready facts applied and probed as one batch, culprits bisected out (tiny model)."""

from __future__ import annotations

import torch

from kmd.daemon.service import Daemon
from kmd.daemon.settings import load_settings
from kmd.editors.fake import FakeEditor
from kmd.editors.protocol import EditRequest

from .helpers import add_motto_relation, write_curated, write_setup
from .test_maintainer import logits

GOOD = [("France", "capital", "Berlin"), ("Spain", "language", "banana"), ("Japan", "capital", "river"),
        ("Italy", "language", "cherry"), ("England", "capital", "moon")]  # fmt: skip


def batch_setup(tmp_path, facts, *, bad_options: str = "{fires_everywhere: true}", **kw):
    """The test policy plus a relation `motto` whose edits are bad."""
    config = write_setup(tmp_path, facts, **kw)
    add_motto_relation(tmp_path / "policy.yaml", bad_options)
    return config


def logits_of(host, requests) -> torch.Tensor:
    """The test prompts' logits under a fresh fake editor holding `requests`: what a batch must equal."""
    editor = FakeEditor(host)
    for r in requests:
        editor.apply(r)
    try:
        return logits(host, editor)
    finally:
        editor.revert_all()  # its hooks off the shared model


def test_a_batch_with_one_bad_edit_bisects_it_out_and_commits_the_others(tmp_path, tiny_host):
    facts = GOOD[:2] + [("Germany", "motto", "apple")] + GOOD[2:]
    daemon = Daemon(load_settings(batch_setup(tmp_path, facts, min_loc=0.999)), host=tiny_host)
    daemon.load()
    m = daemon.maintainer
    summary = daemon.cycle(regression=False)
    ledger = daemon.ledger
    assert len(summary.committed) == 5 and len(summary.reverted) == 1, summary
    (bad,) = summary.reverted
    edit = ledger.edit(bad)
    assert edit.request["prompt"] == "the motto of Germany is" and ledger.fact(edit.fact_id).status == "blocked"
    (revert,) = ledger.reverts(edit_id=bad)
    assert "locality degraded" in revert.reason and "bisected out of a batch of 6" in revert.reason
    assert revert.probes_before["batch"]["size"] == 6 and revert.probes_before["batch"]["culprits"] == 1
    # the others: committed, each with its own events and figures, in the saved state
    committed = ledger.committed_edits()
    assert sorted(e.id for e in committed) == sorted(summary.committed)
    assert m.editor.edit_ids == [str(e.id) for e in committed]
    for e in committed:
        assert e.probes["rel"] == 1.0 and e.probes["loc"] >= 0.999 and e.probes["batch"]["size"] == 6
        assert [a["prompt"] for a in e.probes["answers"]] == [e.request["prompt"], *e.request["rephrases"]]
        kinds = [ev.kind for ev in ledger.events(entity="edit", entity_id=e.id)]
        assert kinds[0] == "edit.applied" and kinds[-1] == "edit.committed", kinds
        assert ledger.fact(e.fact_id).status == "committed"
    assert ledger.verify_chain().ok
    # the model is exactly the good edits, bit for bit
    want = logits_of(tiny_host, [m.editor.request(i) for i in m.editor.edit_ids])
    assert torch.equal(logits(tiny_host, m.editor), want)
    daemon.close()


def test_an_edit_whose_own_rows_fail_is_its_own_culprit(tmp_path, tiny_host):
    """A hijack of a same-subject question shows in the edit's own rows: a suspect at once.
    Three probes: the batch, the batch without it (passes), the suspect on top (fails)."""
    # ("Madrid ." : the tiny model glues the next word onto the target's last one otherwise)
    facts = [("France", "motto", "Madrid ."), ("Spain", "language", "banana"), ("Japan", "capital", "river")]
    daemon = Daemon(load_settings(batch_setup(tmp_path, facts, bad_options="{fires_on_subject: true}")), host=tiny_host)
    daemon.load()
    summary = daemon.cycle(regression=False)
    assert len(summary.committed) == 2 and len(summary.reverted) == 1, summary
    (revert,) = daemon.ledger.reverts()
    assert "same-subject" in revert.reason and "bisected out of a batch of 3" in revert.reason
    committed = daemon.ledger.committed_edits()
    assert all(e.probes["batch"]["states_probed"] == 3 for e in committed)
    daemon.close()


def test_suspects_that_all_failed_their_own_rows_are_each_tried_alone(tmp_path, tiny_host):
    """Three edits that each hijack a same-subject question, with two good ones: the batch,
    the good ones (pass), the three suspects on top (fail, every one a suspect), then each
    suspect alone on top of the good ones: 6 probes (halving the three would take 7)."""
    facts = [("France", "motto", "Madrid ."), ("Spain", "motto", "banana ."), ("Japan", "motto", "river ."),
             ("Italy", "language", "cherry"), ("England", "capital", "moon")]  # fmt: skip
    daemon = Daemon(load_settings(batch_setup(tmp_path, facts, bad_options="{fires_on_subject: true}")), host=tiny_host)
    daemon.load()
    summary = daemon.cycle(regression=False)
    assert len(summary.committed) == 2 and len(summary.reverted) == 3, summary
    assert all("same-subject" in r.reason and "bisected out of a batch of 5" in r.reason for r in daemon.ledger.reverts())
    assert all(e.probes["batch"]["states_probed"] == 6 for e in daemon.ledger.committed_edits())
    daemon.close()


def test_a_batch_commits_what_one_at_a_time_commits(tmp_path, tiny_host):
    """The same facts with `edit_batch: 1` (one edit at a time) and as one batch: the same
    edits committed with the same verdicts, and the same model."""
    results = []
    for batch in (1, 50):
        work = tmp_path / f"batch-{batch}"
        work.mkdir()
        config = batch_setup(work, GOOD, min_loc=0.9)
        config.write_text(config.read_text().replace("schedule: {", f"schedule: {{edit_batch: {batch}, "))
        daemon = Daemon(load_settings(config), host=tiny_host)
        daemon.load()
        summary = daemon.cycle(regression=False)
        assert len(summary.committed) == len(GOOD), summary
        edits = daemon.ledger.committed_edits()
        verdicts = {e.request["prompt"]: (e.probes["rel"], e.probes["served_rel"], [a["answer"] for a in e.probes["answers"]],
                                          [(f["prompt"], f["hijacked"]) for f in e.probes["same_subject"]]) for e in edits}  # fmt: skip
        results.append((verdicts, [EditRequest.from_dict(e.request) for e in edits]))
        assert ("batch" in edits[0].probes) == (batch > 1)
        daemon.close()
        daemon.maintainer.editor.revert_all()  # its hooks off the shared model before the next daemon
    assert results[0][0] == results[1][0]
    assert torch.equal(logits_of(tiny_host, results[0][1]), logits_of(tiny_host, results[1][1]))


def test_more_ready_facts_than_a_batch_go_in_several_batches(tmp_path, tiny_host):
    config = batch_setup(tmp_path, GOOD)
    config.write_text(config.read_text().replace("schedule: {", "schedule: {edit_batch: 2, "))
    daemon = Daemon(load_settings(config), host=tiny_host)
    daemon.load()
    summary = daemon.cycle(regression=False)
    assert len(summary.committed) == 5
    sizes = sorted(e.probes.get("batch", {}).get("size", 1) for e in daemon.ledger.committed_edits())
    assert sizes == [1, 2, 2, 2, 2]  # two batches of two, the fifth alone
    daemon.close()


def test_a_batch_interrupted_after_its_save_is_probed_again_together(tmp_path, tiny_host, monkeypatch):
    """A crash between the batch's save and its commit: restart probes the saved edits
    together and commits them (the crash-point matrix runs this in a real process too)."""
    daemon = Daemon(load_settings(batch_setup(tmp_path, GOOD[:3])), host=tiny_host)
    daemon.load()
    m = daemon.maintainer

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(daemon.ledger, "commit_edits", crash)
    try:
        daemon.cycle(regression=False)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    held = list(m.editor.edit_ids)
    assert len(held) == 3 and all(e.status == "applied" for e in daemon.ledger.edits())
    with m.editor.suspended():  # the crashed process's hooks off the shared model
        again = Daemon(load_settings(tmp_path / "kmd.yaml"), host=tiny_host)
        again.load()
        assert again.maintainer.editor.edit_ids == held
        edits = again.ledger.committed_edits()
        assert [str(e.id) for e in edits] == held and all(e.probes["reconciled"] for e in edits)
        assert again.ledger.verify_chain().ok
        assert not again.cycle(regression=False).committed
        again.close()


def test_write_curated_for_the_next_cycle_is_batched_too(tmp_path, tiny_host):
    """A second burst after a first: committed edits are the earlier ones the new batch is checked against."""
    daemon = Daemon(load_settings(batch_setup(tmp_path, GOOD[:2])), host=tiny_host)
    daemon.load()
    assert len(daemon.cycle(regression=False).committed) == 2
    write_curated(tmp_path / "facts.jsonl", 2, GOOD[2:])
    summary = daemon.cycle(regression=False)
    assert len(summary.committed) == 3
    for e in daemon.ledger.edits(status="committed")[2:]:
        assert e.probes["earlier_checked"] == 2
    daemon.close()


def test_a_batch_edit_that_did_not_take_is_retried_alone_stronger(tmp_path, tiny_host, monkeypatch):
    """An edit whose answers are wrong (degenerate: a word pair three times) harmed nothing:
    bisected out, then tried once more alone with the backend's stronger overrides, as a
    single edit would be; both attempts are in the ledger, the others committed."""
    monkeypatch.setattr(FakeEditor, "stronger_overrides", lambda self: {"fires_on_subject": False})
    # (" .": the tiny model glues the next word onto the target's last one otherwise)
    facts = [("France", "capital", "Berlin ."), ("Spain", "language", "moon moon moon moon ."), ("Japan", "capital", "river .")]
    daemon = Daemon(load_settings(batch_setup(tmp_path, facts, min_served_rel=1.0)), host=tiny_host)
    daemon.load()
    summary = daemon.cycle(regression=False)
    ledger = daemon.ledger
    assert len(summary.committed) == 2 and len(summary.reverted) == 2, summary
    first, second = (ledger.edit(i) for i in sorted(summary.reverted))
    assert first.fact_id == second.fact_id and ledger.fact(first.fact_id).status == "blocked"
    assert "bisected out of a batch of 3" in ledger.reverts(edit_id=first.id)[0].reason
    assert "degenerate" in ledger.reverts(edit_id=first.id)[0].reason
    assert ledger.events(entity="edit", entity_id=second.id)[0].reason.startswith("retry 1 with")
    assert daemon.maintainer.stats.edits_retried == 1
    daemon.close()
