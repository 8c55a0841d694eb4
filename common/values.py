"""The encodings the ledger, the sources and the daemon share: UTC times and canonical JSON.

Times are stored as fixed-width UTC ISO-8601 text (sorts lexically, hashes the same on
every database); JSON that is hashed is written in one canonical form.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

__all__ = ["canonical_json", "iso", "parse_time", "utcnow"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime) -> str:
    """Fixed-width UTC ISO-8601 text: sorts lexically and hashes the same on every database."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """Inverse of `iso`; also accepts other ISO-8601 forms (naive times are taken as UTC)."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def canonical_json(obj: object) -> str:
    """The one JSON form used for hashing: sorted keys, no spaces, UTF-8 text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
