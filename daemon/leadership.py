"""Which process is the writer: exactly one at a time edits the model and writes the ledger.

With SQLite (one machine) the process is always the writer. With PostgreSQL several kmd
processes share one ledger and elect the writer with a session-level advisory lock, held
on a dedicated connection for the writer's whole lifetime. PostgreSQL releases the lock
when that session ends, so a writer that dies (SIGKILL, node lost: TCP keepalives end the
session) frees it, and a standby, polling `try_acquire`, takes over.

Holding the lock is not enough on its own: a writer whose session was cut may not have
noticed yet. So the new writer also bumps the ledger's writer term
(`Ledger.begin_writer_term`) and every write transaction of the old one checks the term
first and fails (`NotWriterError`). `check()` notices a lost lock within `keepalive`
seconds, and the daemon then exits at once, exactly like a crash: the crash recovery
(ledger `applied` before the model changes, reconciliation at start) makes that safe.
"""

from __future__ import annotations

import os
import socket
from typing import Protocol

from loguru import logger
from sqlalchemy.engine import make_url

__all__ = ["AdvisoryLockLeadership", "Leadership", "SingleWriter", "holder_name", "leadership_for"]

# Advisory lock key (a bigint) when the settings do not name one: "kmd-wri" in ASCII.
DEFAULT_LOCK_KEY = 0x6B6D642D777269


def holder_name() -> str:
    """Who holds the writer role, for logs and the ledger: $KMD_INSTANCE (e.g. the pod name), else host:pid."""
    return os.environ.get("KMD_INSTANCE") or f"{socket.gethostname()}:{os.getpid()}"


class Leadership(Protocol):
    def try_acquire(self) -> bool:
        """Become the writer if nobody is; True when this process holds the role."""

    def check(self) -> bool:
        """Is the role still held? False once it is lost (never True again for this object)."""

    def release(self) -> None: ...


class SingleWriter:
    """SQLite: one machine, one process; always the writer."""

    def try_acquire(self) -> bool:
        return True

    def check(self) -> bool:
        return True

    def release(self) -> None:
        pass


class AdvisoryLockLeadership:
    """A PostgreSQL session-level advisory lock on a connection of its own."""

    def __init__(self, url: str, *, key: int = DEFAULT_LOCK_KEY, keepalive: float = 5.0) -> None:
        import psycopg  # the `postgres` extra

        self._psycopg = psycopg
        self._conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.key = key
        self._timeout_s = max(1, int(keepalive))
        self._conn = None
        self._held = False
        self._lost = False

    def _connect(self):  # noqa: ANN202 - a psycopg connection
        # TCP keepalives and a user timeout: a dead network path fails `check()` within
        # seconds instead of hanging; statement_timeout bounds each query.
        return self._psycopg.connect(
            self._conninfo, autocommit=True, connect_timeout=self._timeout_s, keepalives=1,
            keepalives_idle=self._timeout_s, keepalives_interval=1, keepalives_count=3,
            tcp_user_timeout=self._timeout_s * 1000, application_name="kmd-writer-lock",
            options=f"-c statement_timeout={self._timeout_s * 1000}",
        )  # fmt: skip

    def try_acquire(self) -> bool:
        if self._held:
            return True
        if self._lost:
            return False
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            got = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0]
        except self._psycopg.Error as exc:
            logger.warning("writer lock: cannot reach PostgreSQL ({}); retrying", exc)
            self._close()
            return False
        self._held = bool(got)
        return self._held

    def check(self) -> bool:
        if not self._held:
            return False
        try:
            # Still our session, and the lock still granted to it.
            (count,) = self._conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()"
                " AND objsubid = 1 AND classid::bigint = %s AND objid::bigint = %s",
                ((self.key >> 32) & 0xFFFFFFFF, self.key & 0xFFFFFFFF),
            ).fetchone()
            ok = count == 1
        except self._psycopg.Error as exc:
            logger.error("writer lock: connection lost ({})", exc)
            ok = False
        if not ok:
            self._held, self._lost = False, True
            self._close()
        return ok

    def release(self) -> None:
        if self._held and self._conn is not None and not self._conn.closed:
            try:
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
            except self._psycopg.Error:
                pass  # closing the session releases it anyway
        self._held = False
        self._close()

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except self._psycopg.Error:
                pass
            self._conn = None


def leadership_for(database_url: str, *, key: int = DEFAULT_LOCK_KEY, keepalive: float = 5.0) -> Leadership:
    """Advisory-lock election on PostgreSQL; a single writer on SQLite."""
    if make_url(database_url).get_backend_name() == "postgresql":
        return AdvisoryLockLeadership(database_url, key=key, keepalive=keepalive)
    return SingleWriter()
