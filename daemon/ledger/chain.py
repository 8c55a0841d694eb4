"""The hash chain: every ledger event is appended to it, and `verify_chain` replays it.

Each event's hash covers the previous event's hash and the event's canonical JSON payload,
so editing, deleting or reordering events breaks it; every row's immutable fields are
hashed into its creation event (`record_hash`), so editing a row breaks it too; the head
(last seq and hash) is kept in its own row, so deleting the newest events is caught. A
consistent rollback (the newest events removed and the head row reset to match) is caught
by the head recorded outside the database (`head.py`: the head file the ledger writes,
and the one the writer publishes for replicas): the chain must still hold it. Against
someone who can rewrite those too, anchor the head hash elsewhere (`kmd verify-chain`
prints it; `--expect-head` checks it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import insert
from sqlmodel import Session, SQLModel, col, select

from kmd.common.values import canonical_json
from kmd.daemon.ledger.head import Head
from kmd.daemon.ledger.lifecycle import LedgerError
from kmd.daemon.ledger.records import ChainReport
from kmd.daemon.ledger.tables import CACHE_FIELDS, RECORD_FIELDS, ROW_TYPES, ChainHeadRow, EventRow

__all__ = ["GENESIS_HASH", "Event", "append_events", "chain_hash", "current_head", "head_problem", "record_hash",
           "verify_chain"]

GENESIS_HASH = "0" * 64

# (kind, entity, entity_id, actor, reason, data): one event waiting to join the chain.
Event = tuple[str, str, int, str, str, dict[str, Any]]


def record_hash(kind: str, row: SQLModel | Mapping[str, Any]) -> str:
    """The hash of a row's immutable fields, as its creation event records it."""
    get = row.get if isinstance(row, Mapping) else (lambda name: getattr(row, name))
    values = {name: get(name) for name in RECORD_FIELDS[kind]}
    return hashlib.sha256(canonical_json(values).encode()).hexdigest()


def chain_hash(prev_hash: str, payload: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{payload}".encode()).hexdigest()


def append_events(s: Session, events: Sequence[Event], now: str) -> Head | None:
    """Append events to the chain in order, inside the caller's transaction; returns the
    new head (None when there was nothing to append)."""
    if not events:
        return None
    # Lock the head: serialises chain appends on PostgreSQL (SQLite already holds the
    # write lock from BEGIN IMMEDIATE).
    head = s.exec(select(ChainHeadRow).where(ChainHeadRow.id == 1).with_for_update()).first()
    if head is None:
        raise LedgerError("the chain head row is missing: the ledger was tampered with (run verify-chain)")
    seq, prev = head.seq, head.hash
    rows = []
    for kind, entity, entity_id, actor, reason, data in events:
        seq += 1
        envelope = {
            "seq": seq, "ts": now, "kind": kind, "entity": entity, "entity_id": entity_id,
            "actor": actor, "reason": reason, "data": data,
        }  # fmt: skip
        payload = canonical_json(envelope)
        digest = chain_hash(prev, payload)
        rows.append({"seq": seq, "ts": now, "kind": kind, "entity": entity, "entity_id": entity_id,
                     "actor": actor, "reason": reason, "payload": payload, "prev_hash": prev, "hash": digest})  # fmt: skip
        prev = digest
    # Core inserts: building ORM objects costs more than hashing for big batches.
    s.execute(insert(EventRow), rows)
    head.seq, head.hash = seq, prev
    s.add(head)
    return Head(seq, prev)


def current_head(s: Session) -> Head:
    head = s.get(ChainHeadRow, 1)
    return Head(head.seq, head.hash) if head is not None else Head(0, GENESIS_HASH)


def head_problem(s: Session, recorded: Head, where: str) -> str | None:
    """Does the chain still hold a head recorded earlier (`where` says by whom)? A chain
    only grows, so the event at that seq must exist with that hash."""
    if recorded.seq == 0:
        return None
    event = s.get(EventRow, recorded.seq)
    if event is None:
        end = current_head(s).seq
        return (f"{where} recorded the chain head at seq {recorded.seq}, but the chain ends at seq {end}: "
                "its newest events were removed (a rollback)")  # fmt: skip
    if event.hash != recorded.hash:
        return (f"{where} recorded event {recorded.seq} with hash {recorded.hash[:16]}..., the chain has "
                f"{event.hash[:16]}...: the chain was rewritten after it")  # fmt: skip
    return None


def verify_chain(s: Session, *, expect_head: str | None = None, recorded: tuple[Head, str] | None = None,
                 max_problems: int = 50) -> ChainReport:  # fmt: skip
    """Check the event chain and every row against it.

    Detects: a changed, inserted, deleted or reordered event (hash chain and sequence),
    deleted newest events (head row), changed immutable row fields (record hashes in
    creation events), rows without a creation event or events without their row, and
    status caches that disagree with the events. With `recorded` (a head recorded outside
    the database, and where), also a consistent rollback of the chain's tail.
    """
    problems: list[str] = []

    def problem(text: str) -> None:
        if len(problems) < max_problems:
            problems.append(text)

    created: dict[tuple[str, int], str] = {}
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    prev_hash, expected_seq, count = GENESIS_HASH, 1, 0
    for ev in s.exec(select(EventRow).order_by(col(EventRow.seq))):
        count += 1
        if ev.seq != expected_seq:
            problem(f"event {ev.seq}: expected seq {expected_seq} (events missing or reordered)")
        if ev.prev_hash != prev_hash:
            problem(f"event {ev.seq}: prev_hash does not match the previous event's hash")
        if chain_hash(ev.prev_hash, ev.payload) != ev.hash:
            problem(f"event {ev.seq}: hash does not match its payload (event altered)")
        try:
            env = json.loads(ev.payload)
        except ValueError:
            problem(f"event {ev.seq}: payload is not JSON")
            env = {}
        columns = {"seq": ev.seq, "ts": ev.ts, "kind": ev.kind, "entity": ev.entity,
                   "entity_id": ev.entity_id, "actor": ev.actor, "reason": ev.reason}  # fmt: skip
        if any(env.get(k) != v for k, v in columns.items()):
            problem(f"event {ev.seq}: columns disagree with the hashed payload")
        data = env.get("data") or {}
        key = (ev.entity, ev.entity_id)
        if "record" in data:
            created[key] = data["record"]
        if "status" in data:
            latest[key] = data
        prev_hash, expected_seq = ev.hash, ev.seq + 1
    head = s.get(ChainHeadRow, 1)
    head_seq, head_hash = (head.seq, head.hash) if head else (0, GENESIS_HASH)
    if head_seq != expected_seq - 1 or head_hash != prev_hash:
        problem(f"chain head says seq {head_seq} but the log ends at {expected_seq - 1} (events deleted or added)")
    if expect_head is not None and expect_head != head_hash:
        problem(f"head hash {head_hash[:16]}... is not the expected {expect_head[:16]}...")
    if recorded is not None and (text := head_problem(s, *recorded)) is not None:
        problem(text)

    for kind, table in ROW_TYPES.items():
        seen: set[int] = set()
        for row in s.exec(select(table)):
            rid = row.id
            seen.add(rid)
            record = created.get((kind, rid))
            if record is None:
                problem(f"{kind} {rid}: no creation event (row inserted outside the ledger)")
                continue
            if record_hash(kind, row) != record:
                problem(f"{kind} {rid}: row differs from what its creation event recorded (row altered)")
            state = latest.get((kind, rid))
            if kind in CACHE_FIELDS and state is not None:
                for name in CACHE_FIELDS[kind]:
                    have = getattr(row, name)
                    want = state.get(name)
                    if name == "probes":
                        have = json.loads(have)
                    if have != want:
                        problem(f"{kind} {rid}: {name} is {have!r} but the events say {want!r}")
        for ek, rid in created:
            if ek == kind and rid not in seen:
                problem(f"{kind} {rid}: row deleted (its creation event exists)")
    ok = not problems
    return ChainReport(ok, count, head_seq, head_hash, tuple(problems))
