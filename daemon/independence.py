"""Which sources are independent of each other: measured, not just declared.

A quorum means "this many *independent* sources agree". The policy's `group` already lets
an operator say that two sources are one publisher; this module also finds it out:

- sources whose locations share a **host** or a **registrable domain** (`feeds.acme.org`
  and `www.acme.org/rss` are both `acme.org`; per the Public Suffix List, so
  `alice.github.io` and `bob.github.io` stay apart) count as one;
- two local files with the same resolved path count as one; all `api` sources count as
  one (whoever holds the API token can submit under any of them);
- claims from different sources carrying **the same entry content** count as one: the
  `entry:` digest stamped at parsing (`kmd.sources.claims.content_flag`) covers what an
  entry says (normalised subject, relation and object, summary text, link target), not
  its bytes, so a mirror or a copycat feed adds nothing even when it rewrites the entry's
  id, title, dates or a JSONL line's spacing.

unless the policy marks a pair independent (`independent_of`). The Public Suffix List is
the snapshot shipped inside the `publicsuffixlist` wheel: nothing is downloaded.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from kmd.daemon.policy import Policy
from kmd.sources.claims import ENTRY_FLAG
from kmd.sources.config import SourcePolicy

__all__ = ["GroupCount", "Independence", "registrable_domain"]

@functools.cache
def _suffix_list():  # noqa: ANN202 - loaded on first use (~70 ms), never at import
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def registrable_domain(host: str) -> str:
    """`news.example.co.uk` -> `example.co.uk`; an IP address or a bare name stays as it is."""
    host = host.lower().rstrip(".")
    try:
        ipaddress.ip_address(host.strip("[]"))
        return host
    except ValueError:
        pass
    return _suffix_list().privatesuffix(host) or host


def _identities(source: SourcePolicy, base: Path | None) -> dict[str, str]:
    """What a source shares with another when they are one: {kind of sameness: value}."""
    if source.kind == "api":
        return {"the API": "api"}
    location = source.location
    if location.startswith(("http://", "https://")):
        host = (urlsplit(location).hostname or "").lower()
        return {"host": host, "registrable domain": registrable_domain(host)} if host else {}
    path = Path(location)
    if not path.is_absolute() and base is not None:
        path = base / path
    return {"file": str(path.resolve(strict=False))}


@dataclass(frozen=True)
class GroupCount:
    """Independent groups among some claims' sources, and why sources were merged."""

    trust: dict[str, int]  # group representative -> best trust level in it
    members: dict[str, tuple[str, ...]]  # group representative -> its source ids
    merged: tuple[str, ...]  # human-readable reasons two sources counted as one

    def __len__(self) -> int:
        return len(self.trust)

    def describe(self) -> str:
        groups = ", ".join("[" + ", ".join(m) + "]" for m in self.members.values())
        return f"{len(self)} independent group(s) {groups}" + (f"; {'; '.join(self.merged)}" if self.merged else "")


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[max(ra, rb)] = min(ra, rb)
        return True


class Independence:
    """Static sameness of the policy's sources, computed once; `count` adds the entries."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        base = Path(policy.path).parent if policy.path and not policy.path.startswith("<") else None
        sources = list(policy.sources)
        self._static: list[tuple[str, str, str]] = []  # (a, b, why) pairs that are one
        ident = {s.id: _identities(s, base) for s in sources}
        for i, a in enumerate(sources):
            for b in sources[i + 1 :]:
                if policy.declared_independent(a.id, b.id):
                    continue
                if a.independence_group == b.independence_group:
                    self._static.append((a.id, b.id, f"{a.id} and {b.id} are in group {a.independence_group!r}"))
                    continue
                for what, value in ident[a.id].items():
                    if value and ident[b.id].get(what) == value:
                        self._static.append((a.id, b.id, f"{a.id} and {b.id} count as one: same {what} {value}"))
                        break

    def count(self, claims: Sequence, trust: Callable[[object], int | None]) -> GroupCount:
        """Independent groups among `claims` (ClaimRecords) whose `trust(claim)` is not None
        or negative (unknown sources and down-weighted-away claims do not count)."""
        counted = [c for c in claims if (t := trust(c)) is not None and t >= 0]
        ids = sorted({c.source_id for c in counted})
        present = set(ids)
        uf = _UnionFind()
        for sid in ids:
            uf.find(sid)
        merged: list[str] = []
        for a, b, why in self._static:
            if a in present and b in present and uf.union(a, b):
                merged.append(why)
        by_entry: dict[str, str] = {}
        for c in counted:
            for digest in _entries(c.flags):
                first = by_entry.setdefault(digest, c.source_id)
                if first != c.source_id and not self.policy.declared_independent(first, c.source_id):
                    if uf.union(first, c.source_id):
                        merged.append(f"{first} and {c.source_id} count as one: the same entry content "
                                      "(fact, summary, link)")
        best: dict[str, int] = {}
        members: dict[str, list[str]] = {}
        for c in counted:
            rep = uf.find(c.source_id)
            best[rep] = max(best.get(rep, -1), trust(c))  # type: ignore[arg-type]
            if c.source_id not in members.setdefault(rep, []):
                members[rep].append(c.source_id)
        return GroupCount(best, {k: tuple(sorted(v)) for k, v in members.items()}, tuple(merged))


def _entries(flags: Iterable[str]) -> list[str]:
    return [f[len(ENTRY_FLAG) :] for f in flags if f.startswith(ENTRY_FLAG)]
