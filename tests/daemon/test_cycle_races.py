"""People act while a cycle runs: a fact rejected after the cycle listed it as ready is an
expected race, skipped with an info line; not a job error (issue 27, case 6)."""

from __future__ import annotations

from loguru import logger

from kmd.daemon.service import Daemon
from kmd.daemon.service.jobs import EDIT_JOB
from kmd.daemon.settings import load_settings

from .helpers import write_curated, write_setup


def _rejected_once_listed(daemon: Daemon, subject: str) -> None:
    """The next `ready_facts()` lists the facts, then a person rejects `subject`'s."""
    ledger = daemon.ledger
    real = ledger.ready_facts

    def listed(*args, **kwargs):
        facts = real(*args, **kwargs)
        for fact in facts:
            if fact.subject == subject:
                ledger.reject(fact.id, actor="alice", reason="wrong")
        return facts

    ledger.ready_facts = listed


def _run_edit_job(daemon: Daemon) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    sink = logger.add(lambda m: lines.append((m.record["level"].name, m.record["message"])), level="INFO")
    try:
        daemon.jobs.run(EDIT_JOB)  # as the scheduler runs it
    finally:
        logger.remove(sink)
    return lines


def test_a_fact_rejected_after_the_cycle_listed_it_is_skipped(tmp_path, tiny_host):
    config = write_setup(tmp_path, [("France", "capital", "Berlin"), ("Spain", "language", "banana")])
    daemon = Daemon(load_settings(config), host=tiny_host)
    daemon.load()
    daemon.ingest(all_sources=True)
    _rejected_once_listed(daemon, "France")
    lines = _run_edit_job(daemon)
    m = daemon.maintainer
    assert m.stats.errors == 0 and not [line for line in lines if line[0] == "ERROR"], lines
    assert any(level == "INFO" and "rejected" in text and "skipped" in text for level, text in lines), lines
    (edit,) = daemon.ledger.committed_edits()  # the other fact went on as usual
    assert daemon.ledger.fact(edit.fact_id).subject == "Spain"
    assert m.editor.edit_ids == [str(edit.id)] and not daemon.ledger.edits(status="applied")
    daemon.close()


def test_a_superseding_fact_rejected_after_listing_keeps_the_old_edit(tmp_path, tiny_host):
    config = write_setup(tmp_path, [("France", "capital", "Berlin")])
    daemon = Daemon(load_settings(config), host=tiny_host)
    daemon.load()
    (old,) = daemon.cycle().committed
    write_curated(tmp_path / "facts.jsonl", 2, [("France", "capital", "Rome")])
    daemon.ingest(all_sources=True)
    _rejected_once_listed(daemon, "France")
    lines = _run_edit_job(daemon)
    m = daemon.maintainer
    assert m.stats.errors == 0 and not [line for line in lines if line[0] == "ERROR"], lines
    assert m.editor.edit_ids == [str(old)] and m.serving.edit_ids == [str(old)]  # the old edit still answers
    assert daemon.ledger.edit(old).status == "committed"
    daemon.close()
