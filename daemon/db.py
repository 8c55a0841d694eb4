"""Database engines for the ledger: SQLite by default, PostgreSQL by URL.

SQLite connections get WAL (readers never block the writer), a busy timeout (writers wait
for each other instead of failing) and foreign keys (off by default in SQLite). Write
transactions start with BEGIN IMMEDIATE so two writers serialise at BEGIN rather than
deadlocking on a read-to-write upgrade; this also serialises appends to the event chain.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import StaticPool
from sqlmodel import create_engine

__all__ = ["DEFAULT_DB_ENV", "HEAD_FILE", "default_db_url", "default_head_file", "default_state_dir", "make_engine", "writer"]

DEFAULT_DB_ENV = "KMD_DB_URL"
HEAD_FILE = "chain-head.json"  # the chain head outside the database (kmd.daemon.ledger.head)
_BUSY_TIMEOUT_MS = 30_000


def default_state_dir() -> Path:
    """`$KMD_STATE_DIR`, else `./state`."""
    return Path(os.environ.get("KMD_STATE_DIR", "state"))


def default_db_url() -> str:
    """`$KMD_DB_URL`, else `$KMD_STATE_DIR/ledger.db`, else `./state/ledger.db` (SQLite)."""
    url = os.environ.get(DEFAULT_DB_ENV)
    if url:
        return url
    return f"sqlite:///{default_state_dir() / 'ledger.db'}"


def default_head_file(url: str, state_dir: Path) -> Path | None:
    """Where a ledger keeps its chain head outside the database (kmd.daemon.ledger.head):
    next to a SQLite file, else in the state directory; none for an in-memory database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return Path(state_dir) / HEAD_FILE
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database).expanduser().parent / HEAD_FILE


def make_engine(url: str, *, echo: bool = False) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, echo=echo, pool_pre_ping=True)

    database = parsed.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    kwargs: dict = {"connect_args": {"check_same_thread": False, "timeout": _BUSY_TIMEOUT_MS / 1000}}
    if in_memory:
        kwargs["poolclass"] = StaticPool  # one shared connection, or each sees an empty db
    else:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, echo=echo, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # noqa: ANN001 - DB-API objects
        dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" hook emit BEGIN itself
        cur = dbapi_conn.cursor()
        if not in_memory:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # noqa: ANN001
        # Writers (see `writer`) take the write lock up front; readers stay deferred so
        # they never wait for a writer (WAL).
        write = conn.get_execution_options().get("kmd_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def writer(engine: Engine) -> Engine:
    """The same engine, marked so that its transactions begin as writers."""
    return engine.execution_options(kmd_write=True)
