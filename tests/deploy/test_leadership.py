"""Writer election and fencing, in process: advisory lock, writer terms, published state."""

from __future__ import annotations

import pytest

from kmd.daemon.leadership import AdvisoryLockLeadership, SingleWriter, leadership_for
from kmd.daemon.ledger import Ledger, NotWriterError

from .conftest import needs_pg, pg_execute


def _claim_write(ledger: Ledger) -> None:
    ledger.save_cursor("wire", {"etag": "x"})  # any write transaction


@needs_pg
def test_one_lock_holder_and_takeover_when_its_session_ends(pg_url):
    first = AdvisoryLockLeadership(pg_url, key=42, keepalive=1)
    second = AdvisoryLockLeadership(pg_url, key=42, keepalive=1)
    try:
        assert first.try_acquire() and first.check()
        assert not second.try_acquire() and not second.check()
        # The server ends the first writer's session (as when its process dies or its
        # network path is cut): it notices, and the standby takes over.
        (ended,) = pg_execute(pg_url, "SELECT count(pg_terminate_backend(pid)) FROM pg_locks "
                                      "WHERE locktype = 'advisory' AND objid = 42 AND granted")[0]  # fmt: skip
        assert ended == 1
        assert not first.check()
        assert not first.try_acquire()  # a lost writer never takes the role back in-process
        assert second.try_acquire() and second.check()
    finally:
        first.release()
        second.release()
    third = AdvisoryLockLeadership(pg_url, key=42)
    assert third.try_acquire()  # released cleanly
    third.release()


@needs_pg
def test_writer_terms_fence_a_deposed_writer(pg_url):
    with Ledger(pg_url) as old, Ledger(pg_url) as new:
        assert old.begin_writer_term("old") == 1
        _claim_write(old)
        old.publish_state("a" * 64, ["1"], holder="old")
        assert new.begin_writer_term("new") == 2
        with pytest.raises(NotWriterError):
            _claim_write(old)
        with pytest.raises(NotWriterError):
            old.publish_state("b" * 64, ["1", "2"], holder="old")
        _claim_write(new)
        new.publish_state("c" * 64, ["1", "3"], holder="new")
        state = new.published_state()
        assert (state.version, state.edit_ids, state.term, state.holder) == ("c" * 64, ("1", "3"), 2, "new")
        assert old.published_state() == state  # readers are never fenced
        assert new.verify_chain().ok


def test_sqlite_is_always_the_writer(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    assert isinstance(leadership_for(url), SingleWriter)
    with Ledger(url) as ledger:
        assert ledger.published_state() is None
        with pytest.raises(NotWriterError):
            ledger.publish_state("a" * 64, [], holder="x")  # only a writer publishes
        ledger.begin_writer_term("x")
        ledger.publish_state("a" * 64, [], holder="x")
        assert ledger.published_state().version == "a" * 64
