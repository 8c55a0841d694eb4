"""The ledger: claims, verified facts, edits, reverts and a hash-chained event log.

Rows are append-only facts (`tables`); every write goes through a `LedgerTransaction`
(`transaction`), which checks status changes against the state machines (`lifecycle`) and
appends one event per change to the hash chain (`chain`). Operational rows that are not
ledger facts (source cursors, the writer term, the published state) are in `cluster`.
Writes that belong together go through `Ledger.transaction()`; the other write methods
each run one transaction. Everything returned is an immutable record (`records`), never
an ORM object. Each read opens its own session and runs a query of `reads` (plain
functions over a session).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel

from kmd.common.values import iso, utcnow
from kmd.daemon.db import default_db_url, make_engine, writer
from kmd.daemon.ledger import chain, cluster, queries, reads
from kmd.daemon.ledger.chain import GENESIS_HASH
from kmd.daemon.ledger.head import Head, HeadFile, HeadFileError
from kmd.daemon.ledger.cluster import CLUSTER_TABLES, WriterTermRow
from kmd.daemon.ledger.lifecycle import FactNotReadyError, LedgerError, NotWriterError
from kmd.daemon.ledger.records import (
    ChainReport,
    ClaimRecord,
    EditRecord,
    EventRecord,
    FactRecord,
    PublishedState,
    RecordResult,
    RevertRecord,
    StateRecord,
)
from kmd.daemon.ledger.tables import LEDGER_TABLES, ChainHeadRow
from kmd.daemon.ledger.transaction import LedgerTransaction

if TYPE_CHECKING:
    from kmd.sources.claims import Claim

__all__ = ["Ledger"]

_SCHEMA_LOCK_KEY = 0x6B6D642D736368  # "kmd-sch": serialises table creation on PostgreSQL


class Ledger:
    """The daemon's durable record. Create with a database URL (SQLite file by default).

    Methods the maintenance loop uses, in the order it uses them:
      `ready_facts()`            verified facts waiting for an edit (approved if sensitive)
      `skip_fact(id, ...)`       the model already answers correctly; nothing to edit
      `record_edit_applied(...)` an edit was applied (not yet persisted)
      `commit_edit(id, probes)`  the probes passed and the edit state was persisted; for a
                                 fact whose `supersedes_edit_id` is set, pass it: the old
                                 edit is recorded as reverted for it in the same transaction
      `revert_edit(id, ...)`     the probes failed; writes the revert log and blocks the fact
      `block_fact(id, ...)`      do not retry this fact blindly
      `record_state(digest, ...)` before each save of the editor state: names it in the chain
      `committed_edits()`        on restart: what the saved editor state must contain
      `uncommitted_edits()`      on restart: edits applied but never committed or reverted
      `named_state(digest)`      on every load: did the writer save this state?
    People (the CLI): `approve`, `reject`, `facts`, `edits`, `claims`, `reverts`, `events`,
    `verify_chain`. The verifier: `transaction()`, `claims()`, `active_facts()`.
    """

    def __init__(self, url: str | None = None, *, clock: Callable[[], datetime] = utcnow, echo: bool = False,
                 head_file: Path | None = None):  # fmt: skip
        """`head_file`: where to keep the chain head outside the database (`head.py`);
        written after every transaction that appends events, compared by `verify_chain`."""
        self.url = url or default_db_url()
        self.head_file = HeadFile(head_file) if head_file is not None else None
        self._engine = make_engine(self.url, echo=echo)
        self._writer = writer(self._engine)
        self._clock = clock
        self._term: int | None = None  # the writer term this process holds (see begin_writer_term)
        self._create_tables()
        self._ensure_row(ChainHeadRow(id=1, seq=0, hash=GENESIS_HASH))
        self._ensure_row(WriterTermRow(id=1, term=0, holder="", since=""))

    def _create_tables(self) -> None:
        # Several processes may start at once on one PostgreSQL database: CREATE TABLE is
        # not safe to race, so serialise it on a transaction-level advisory lock.
        with self._writer.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
            SQLModel.metadata.create_all(conn, tables=LEDGER_TABLES + CLUSTER_TABLES)

    def _ensure_row(self, row: SQLModel) -> None:
        """Create a singleton row up front, so concurrent first writers lock one row."""
        try:
            with Session(self._writer) as s, s.begin():
                if s.get(type(row), 1) is None:
                    s.add(row)
        except IntegrityError:
            pass  # another process created it first

    @classmethod
    def in_memory(cls, *, clock: Callable[[], datetime] = utcnow) -> Ledger:
        return cls("sqlite://", clock=clock)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sessions ------------------------------------------------------------------------
    @contextmanager
    def transaction(self, actor: str) -> Iterator[LedgerTransaction]:
        """One atomic unit of writes; its events join the chain when the block ends."""
        with Session(self._writer, expire_on_commit=False) as session, session.begin():
            if self._term is not None:
                cluster.check_term(session, self._term)
            tx = LedgerTransaction(session, actor, self._clock)
            yield tx
            tx.append_events()
        if self.head_file is not None and tx.head is not None:  # after the commit: it may lag, never lead
            self.head_file.advance(tx.head)

    # -- reading (each read is its own session; the queries are `reads`) -------------------
    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self._engine, expire_on_commit=False) as session:
            yield session

    def claim(self, claim_id: int) -> ClaimRecord:
        with self._read() as s:
            return reads.claim(s, claim_id)

    def claims(
        self,
        *,
        status: str | Sequence[str] | None = None,
        source_id: str | None = None,
        fact_id: int | None = None,
        keys: Iterable[tuple[str, str]] | None = None,
        since: datetime | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[ClaimRecord]:
        """Claims filtered by status, source, fact, (subject_key, relation) keys, ingest time."""
        with self._read() as s:
            return reads.claims(s, status=status, source_id=source_id, fact_id=fact_id, keys=keys, since=since,
                                limit=limit, newest_first=newest_first)  # fmt: skip

    def count_claims(self, source_id: str, *, status: Sequence[str], since: datetime) -> int:
        with self._read() as s:
            return queries.count_claims(s, source_id, status, since)

    def fact(self, fact_id: int) -> FactRecord:
        with self._read() as s:
            return reads.fact(s, fact_id)

    def facts(self, *, status: str | Sequence[str] | None = None, limit: int | None = None,
              newest_first: bool = True) -> list[FactRecord]:  # fmt: skip
        with self._read() as s:
            return reads.facts(s, status=status, limit=limit, newest_first=newest_first)

    def active_facts(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[FactRecord]]:
        """Facts still speaking for each key (see ACTIVE_FACT_STATUSES), oldest first."""
        with self._read() as s:
            return reads.active_facts(s, keys)

    def edit(self, edit_id: int) -> EditRecord:
        with self._read() as s:
            return reads.edit(s, edit_id)

    def edits(self, *, status: str | Sequence[str] | None = None, fact_id: int | None = None,
              limit: int | None = None, newest_first: bool = False) -> list[EditRecord]:  # fmt: skip
        with self._read() as s:
            return reads.edits(s, status=status, fact_id=fact_id, limit=limit, newest_first=newest_first)

    def reverts(self, *, edit_id: int | None = None, limit: int | None = None) -> list[RevertRecord]:
        with self._read() as s:
            return reads.reverts(s, edit_id=edit_id, limit=limit)

    def events(self, *, entity: str | None = None, entity_id: int | None = None,
               limit: int | None = None) -> list[EventRecord]:  # fmt: skip
        with self._read() as s:
            return reads.events(s, entity=entity, entity_id=entity_id, limit=limit)

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per status for claims, facts and edits (for summaries and metrics)."""
        with self._read() as s:
            return reads.counts(s)

    def named_state(self, digest: str) -> StateRecord | None:
        """The newest record of the editor state with this digest, if the writer saved it."""
        with self._read() as s:
            return reads.named_state(s, digest)

    def load_cursor(self, source_id: str) -> dict[str, Any]:
        with self._read() as s:
            return cluster.load_cursor(s, source_id)

    def published_state(self) -> PublishedState | None:
        with self._read() as s:
            return cluster.published(s)

    # -- integrity -----------------------------------------------------------------------
    def verify_chain(self, *, expect_head: str | None = None, max_problems: int = 50) -> ChainReport:
        """Check the event chain and every row against it (see `chain.verify_chain`), and
        that it still holds the head recorded in the ledger's head file (`head.py`)."""
        recorded, unreadable = None, None
        if self.head_file is not None:  # read before the chain: the file may lag it, never lead it
            try:
                recorded = self.head_file.read()
            except HeadFileError as exc:
                unreadable = str(exc)
        with self._read() as s:
            report = chain.verify_chain(s, expect_head=expect_head, max_problems=max_problems,
                                        recorded=(recorded, f"the head file {self.head_file.path}") if recorded else None)  # fmt: skip
        if unreadable is not None:
            report = replace(report, ok=False, problems=(*report.problems, unreadable))
        if self.head_file is None:
            return report
        return replace(report, head_file=str(self.head_file.path), head_file_seq=recorded.seq if recorded else None)

    def chain_head(self) -> Head:
        """The chain's head as the database has it now (seq and hash)."""
        with self._read() as s:
            return chain.current_head(s)

    def check_head(self, recorded: Head, where: str) -> str | None:
        """None if the chain still holds a head recorded earlier (by `where`), else the problem."""
        with self._read() as s:
            return chain.head_problem(s, recorded, where)

    # -- the single writer ---------------------------------------------------------------
    def begin_writer_term(self, holder: str) -> int:
        """Become the writer: bump the term; from now on every write checks it is still ours."""
        with Session(self._writer, expire_on_commit=False) as s, s.begin():
            term = cluster.bump_term(s, holder, iso(self._clock()))
        self._term = term
        logger.info("writer term {} begins ({})", term, holder)
        return term

    @property
    def writer_term(self) -> int | None:
        return self._term

    def publish_state(self, version: str, edit_ids: Sequence[str], *, holder: str) -> None:
        """Record the committed editor state replicas should serve (needs a writer term)."""
        if self._term is None:
            raise NotWriterError("only the writer publishes states (begin_writer_term first)")
        with self.transaction("writer") as tx:
            tx.publish_state(version, edit_ids, term=self._term, holder=holder)

    # -- intake --------------------------------------------------------------------------
    def record_claims(self, claims: Iterable[Claim], *, policy_version: str, channel: str,
                      actor: str = "intake") -> RecordResult:  # fmt: skip
        with self.transaction(actor) as tx:
            return tx.record_claims(claims, policy_version=policy_version, channel=channel)

    def save_cursor(self, source_id: str, cursor: Mapping[str, Any]) -> None:
        with self.transaction("intake") as tx:
            tx.save_cursor(source_id, cursor)

    # -- the maintenance loop ------------------------------------------------------------
    def ready_facts(self, limit: int | None = None) -> list[FactRecord]:
        """Verified facts waiting for an edit, oldest first.

        A fact with `supersedes_edit_id` set replaces that committed edit: revert it in the
        backend, apply this one, and commit with `supersedes_edit_id` (or put the old edit
        back if the new one fails).
        """
        return self.facts(status="ready", limit=limit, newest_first=False)

    def record_edit_applied(
        self,
        fact_id: int,
        *,
        request: Mapping[str, Any],
        backend: str,
        backend_config: Mapping[str, Any],
        policy_version: str,
        actor: str = "daemon",
        reason: str = "edit applied",
        supersedes_edit_id: int | None = None,
    ) -> EditRecord:
        """An edit for a ready fact was applied to the model (not yet persisted).

        Records the provenance (supporting claims' sources and hashes, policy version,
        backend and its config, the edit request) and moves the fact to `applied`. When the
        fact supersedes an older one, `supersedes_edit_id` defaults to the edit that
        `supersede_edit` reverted for it.
        """
        with self.transaction(actor) as tx:
            fact = tx.fact(fact_id)
            if fact.status != "ready":
                raise FactNotReadyError(f"fact {fact_id} is {fact.status}, not ready")
            if supersedes_edit_id is None and fact.supersedes_fact_id is not None:
                supersedes_edit_id = tx.edit_reverted_for(fact_id)
            edit = tx.add_edit(fact_id, request=request, backend=backend, backend_config=backend_config,
                               policy_version=policy_version, supersedes_edit_id=supersedes_edit_id, reason=reason)  # fmt: skip
            tx.set_fact_status(fact_id, "applied", reason=f"edit {edit.id} applied")
            logger.bind(edit_id=edit.id).info(
                "edit {}: applied for fact {} ({} {} -> {})", edit.id, fact_id, fact.subject, fact.relation, fact.object
            )
            return edit

    def commit_edit(self, edit_id: int, *, probes: Mapping[str, Any], actor: str = "daemon",
                    reason: str = "probes passed; state persisted", supersedes_edit_id: int | None = None,
                    superseded_probes: Mapping[str, Any] | None = None) -> EditRecord:  # fmt: skip
        """The edit passed its probes and the editor state was persisted.

        With `supersedes_edit_id`, in the same transaction: that older committed edit, which
        the persisted state no longer holds, is recorded as reverted for this edit's fact
        (its fact becomes `superseded`). One transaction, so a crash cannot leave the ledger
        with both facts committed or with neither."""
        with self.transaction(actor) as tx:
            edit = tx.set_edit_status(edit_id, "committed", reason=reason, probes=probes)
            tx.set_fact_status(edit.fact_id, "committed", reason=f"edit {edit_id} committed")
            if supersedes_edit_id is not None:
                self._mark_superseded(tx, supersedes_edit_id, edit.fact_id, None, superseded_probes)
        logger.bind(edit_id=edit_id).info("edit {}: committed", edit_id)
        return edit

    def commit_edits(self, commits: Sequence[tuple[int, Mapping[str, Any]]], *, actor: str = "daemon",
                     reason: str = "probes passed with its batch; state persisted") -> list[EditRecord]:  # fmt: skip
        """A batch of edits passed their probes together and the state holding them was
        persisted: each committed with its own probe figures (`(edit_id, probes)` pairs), in
        one transaction, so a crash leaves all of them committed or none."""
        with self.transaction(actor) as tx:
            edits = []
            for edit_id, probes in commits:
                edit = tx.set_edit_status(edit_id, "committed", reason=reason, probes=probes)
                tx.set_fact_status(edit.fact_id, "committed", reason=f"edit {edit_id} committed")
                edits.append(edit)
        for edit in edits:
            logger.bind(edit_id=edit.id).info("edit {}: committed", edit.id)
        return edits

    def revert_edit(
        self,
        edit_id: int,
        *,
        reason: str,
        probes_before: Mapping[str, Any] | None,
        probes_after: Mapping[str, Any] | None,
        actor: str = "daemon",
        retry: bool = False,
    ) -> RevertRecord:
        """The edit was removed from the model; write the revert log.

        The fact becomes `blocked` (not retried blindly) unless `retry` is true, in which
        case it goes back to `ready`.
        """
        with self.transaction(actor) as tx:
            edit = tx.set_edit_status(edit_id, "reverted", reason=reason)
            revert = tx.add_revert(edit_id, reason=reason, probes_before=probes_before, probes_after=probes_after)
            tx.set_fact_status(edit.fact_id, "ready" if retry else "blocked",
                               reason=f"edit {edit_id} reverted: {reason}", kind="fact.retry" if retry else None)  # fmt: skip
        logger.bind(edit_id=edit_id).warning("edit {}: reverted ({})", edit_id, reason)
        return revert

    def request_revert(self, edit_id: int, *, reason: str, actor: str) -> EditRecord:
        """Write ahead: a committed edit is to be reverted (status `reverting`), before the
        model changes. The maintainer then reverts it, saves the state and records the
        revert (`revert_edit`); after a crash, restart finishes it (`revert_requests`).
        Asking again for an edit already being reverted returns it unchanged."""
        with self.transaction(actor) as tx:
            current = tx.edit(edit_id)
            if current.status == "reverting":
                return current
            if current.status != "committed":
                raise LedgerError(f"edit {edit_id} is {current.status}; only committed edits are reverted")
            edit = tx.set_edit_status(edit_id, "reverting", reason=reason)
        logger.bind(edit_id=edit_id).info("edit {}: revert requested by {} ({})", edit_id, actor, reason)
        return edit

    def revert_requests(self) -> list[tuple[EditRecord, str]]:
        """Reverts requested and not yet finished, oldest first, with who asked."""
        with self._read() as s:
            return reads.revert_requests(s)

    def supersede_edit(
        self,
        old_edit_id: int,
        *,
        by_fact_id: int,
        actor: str = "daemon",
        probes_before: Mapping[str, Any] | None = None,
        probes_after: Mapping[str, Any] | None = None,
    ) -> RevertRecord:
        """A committed edit was reverted because a newer verified fact replaces it.

        The old fact becomes `superseded` and the revert log names the newer fact. (The
        maintenance loop records this with `commit_edit(..., supersedes_edit_id=...)`, once
        the newer fact's edit is committed, so that a failed replacement loses nothing.)
        """
        with self.transaction(actor) as tx:
            revert = self._mark_superseded(tx, old_edit_id, by_fact_id, probes_before, probes_after)
        return revert

    @staticmethod
    def _mark_superseded(tx: LedgerTransaction, old_edit_id: int, by_fact_id: int, probes_before: Mapping[str, Any] | None,
                         probes_after: Mapping[str, Any] | None) -> RevertRecord:  # fmt: skip
        try:
            new, old = tx.fact(by_fact_id), tx.edit(old_edit_id)
        except LedgerError:
            raise LedgerError(f"no fact {by_fact_id} or no edit {old_edit_id}") from None
        if new.supersedes_fact_id != old.fact_id:
            raise LedgerError(f"fact {by_fact_id} does not supersede fact {old.fact_id} (edit {old_edit_id})")
        if old.status != "committed":
            raise LedgerError(f"edit {old_edit_id} is {old.status}, not committed")
        reason = f"superseded by fact {by_fact_id}"
        tx.set_edit_status(old_edit_id, "reverted", reason=reason)
        revert = tx.add_revert(old_edit_id, reason=reason, probes_before=probes_before,
                               probes_after=probes_after, superseded_by_fact_id=by_fact_id)  # fmt: skip
        tx.set_fact_status(old.fact_id, "superseded", reason=reason)
        logger.bind(edit_id=old_edit_id).info("edit {}: reverted, superseded by fact {}", old_edit_id, by_fact_id)
        return revert

    def block_fact(self, fact_id: int, *, reason: str, actor: str = "daemon") -> FactRecord:
        """Do not retry this fact blindly; a person can release it with `approve`."""
        with self.transaction(actor) as tx:
            return tx.set_fact_status(fact_id, "blocked", reason=reason)

    def skip_fact(self, fact_id: int, *, reason: str = "model already answers correctly",
                  actor: str = "daemon") -> FactRecord:  # fmt: skip
        with self.transaction(actor) as tx:
            if (status := tx.fact(fact_id).status) != "ready":
                raise FactNotReadyError(f"fact {fact_id} is {status}, not ready")
            return tx.set_fact_status(fact_id, "skipped", reason=reason)

    def record_state(self, digest: str, edit_ids: Sequence[str], *, actor: str = "daemon",
                     reason: str = "editor state saved") -> StateRecord:  # fmt: skip
        """Name an editor state in the chain *before* writing it (write-ahead): a crash
        between the two leaves the state saved before, which the ledger named too."""
        with self.transaction(actor) as tx:
            return tx.add_state(digest, edit_ids, reason=reason)

    def committed_edits(self) -> list[EditRecord]:
        """Edits that the persisted editor state must contain, oldest first."""
        return self.edits(status="committed")

    def uncommitted_edits(self) -> list[EditRecord]:
        """Edits applied but neither committed nor reverted (a crash in between)."""
        return self.edits(status="applied")

    # -- people --------------------------------------------------------------------------
    def approve(self, fact_id: int, *, actor: str, reason: str = "approved") -> FactRecord:
        """A person approves a quarantined fact (or releases a blocked one): it becomes ready."""
        with self.transaction(actor) as tx:
            current = tx.fact(fact_id)
            if current.status not in ("quarantined", "blocked"):
                raise LedgerError(f"fact {fact_id} is {current.status}; only quarantined or blocked facts are approved")
            fact = tx.set_fact_status(fact_id, "ready", reason=reason, kind="fact.approved")
        logger.info("fact {}: approved by {}", fact_id, actor)
        return fact

    def reject(self, fact_id: int, *, actor: str, reason: str = "rejected") -> FactRecord:
        """A person rejects a fact that is not yet edited: it never becomes an edit."""
        with self.transaction(actor) as tx:
            fact = tx.set_fact_status(fact_id, "rejected", reason=reason)
        logger.info("fact {}: rejected by {}", fact_id, actor)
        return fact
