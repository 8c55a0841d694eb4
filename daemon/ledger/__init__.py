"""The ledger: what the daemon knows and did, append-only and hash-chained.

    tables.py       the rows (claims, facts, edits, reverts, saved states, events, the chain head)
    records.py      the immutable records every method returns
    lifecycle.py    the status state machines and the ledger's errors
    chain.py        the hash chain: appending events, `verify_chain`
    transaction.py  `LedgerTransaction`: the one way rows are written
    queries.py      queries the transaction and the reads share
    reads.py        reading: records by id, lists, counts
    store.py        `Ledger`: the database, transactions, the maintenance loop's and people's operations
    cluster.py      operational rows, not chained: source cursors, writer term, published state
    head.py         the chain head kept outside the database (a rollback of the tail shows)

Import the public names from here (`from kmd.daemon.ledger import Ledger, LedgerError`).
"""

from kmd.daemon.ledger.head import Head, HeadFile, HeadFileError
from kmd.daemon.ledger.lifecycle import FactNotReadyError, LedgerError, NotWriterError
from kmd.daemon.ledger.records import (
    ChainReport,
    ClaimRecord,
    ClaimUpdate,
    EditRecord,
    EventRecord,
    FactRecord,
    PublishedState,
    RecordResult,
    RevertRecord,
    StateRecord,
)
from kmd.daemon.ledger.store import Ledger
from kmd.daemon.ledger.transaction import LedgerTransaction

__all__ = [
    "ChainReport",
    "ClaimRecord",
    "ClaimUpdate",
    "EditRecord",
    "EventRecord",
    "FactNotReadyError",
    "FactRecord",
    "Head",
    "HeadFile",
    "HeadFileError",
    "Ledger",
    "LedgerError",
    "LedgerTransaction",
    "NotWriterError",
    "PublishedState",
    "RecordResult",
    "RevertRecord",
    "StateRecord",
]
