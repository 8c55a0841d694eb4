"""A fresh PostgreSQL database per test, on the server named by KMD_TEST_PG_URL.

CI starts a throwaway server (scripts/pg-test-server.sh, from .ci/run); locally:
    eval "$(scripts/pg-test-server.sh start)"
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

PG_URL = os.environ.get("KMD_TEST_PG_URL")
needs_pg = pytest.mark.skipif(
    not PG_URL,
    reason="no PostgreSQL server configured: set KMD_TEST_PG_URL (eval \"$(scripts/pg-test-server.sh start)\")",
)


def _conninfo(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A SQLAlchemy URL of an empty database, dropped after the test."""
    import psycopg
    from sqlalchemy.engine import make_url

    assert PG_URL
    name = f"kmd_deploy_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_conninfo(PG_URL), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with psycopg.connect(_conninfo(PG_URL), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_execute(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    import psycopg

    with psycopg.connect(_conninfo(url), autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []
