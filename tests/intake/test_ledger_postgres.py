"""The ledger on PostgreSQL. Runs only when KMD_TEST_PG_URL names a database to use (its kmd_
tables are dropped first), e.g. postgresql+psycopg://postgres@127.0.0.1:5432/kmd_test."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine, text

from intake.test_ledger import REQUEST, seed
from intake.test_verify import World
from kmd.daemon.ledger import Ledger

PG_URL = os.environ.get("KMD_TEST_PG_URL")
pytestmark = pytest.mark.skipif(not PG_URL, reason="set KMD_TEST_PG_URL to run the PostgreSQL tests")


@pytest.fixture
def pg(clock):
    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        for table in ("kmd_revert", "kmd_edit", "kmd_claim", "kmd_fact", "kmd_event", "kmd_chain_head",
                      "kmd_source_cursor"):  # fmt: skip
            conn.execute(text(f"DROP TABLE IF EXISTS {table} CASCADE"))
    engine.dispose()
    with Ledger(PG_URL, clock=clock) as ledger:
        yield ledger


def test_lifecycle_and_chain_on_postgres(pg):
    fid = seed(pg)
    edit = pg.record_edit_applied(fid, request=REQUEST, backend="grace", backend_config={"eps": 1.0},
                                  policy_version="v")  # fmt: skip
    pg.commit_edit(edit.id, probes={"rel": 1.0})
    pg.save_cursor("wire", {"etag": '"x"'})
    assert pg.load_cursor("wire") == {"etag": '"x"'}
    assert [e.id for e in pg.committed_edits()] == [edit.id]
    report = pg.verify_chain()
    assert report.ok and report.events > 5
    with pg._engine.begin() as conn:
        conn.execute(text("UPDATE kmd_fact SET object = 'Lyon'"))
    assert not pg.verify_chain().ok


def test_verification_on_postgres(pg, clock):
    world = World(clock)
    world.ledger = pg
    world.verifier.ledger = pg
    world.claim("a", "Paris")
    world.claim("b", "Paris, France")
    (fid,) = world.run().new_facts
    assert pg.fact(fid).status == "ready" and pg.verify_chain().ok
