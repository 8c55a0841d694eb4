"""Routing decisions of rows that move between batches (continuous batching).

A served batch keeps its rows' routing decisions, made at each row's prefill, in its
routing context (`Routing.decisions`, one entry per backend, indexed by batch row). When
rows leave the batch (they ended) or rows of another batch join it (their prefill ran on
its own, then they decode with the others), the decisions are carried over row by row:
`Editor.regroup` builds the new batch's context, and each backend's `_regroup` moves its
own entries with the helpers here. A row keeps exactly the decision and the answer
tracking it had, so its decode steps compute what they would in its own batch.

    how = Regroup((keep_a, keep_b))        # new batch = rows keep_a of batch a, then keep_b of batch b
    hit = how.dense([a["hit"], b["hit"]])   # (B_a,), (B_b,) -> (len(keep_a) + len(keep_b),)
    rows, picks = how.routed([a["rows"], b["rows"]])   # routed rows of the new batch, and which
    edit = how.pick([a["edit"], b["edit"]], picks)      # per-routed-row payloads go with them
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Regroup:
    """A new batch made of rows of earlier batches ("parts"): part k gives its rows
    `keep[k]` ((n_k,) indices into its own batch, in the new batch's order), after the
    rows part k - 1 gave."""

    keep: tuple[torch.Tensor, ...]

    def dense(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """One value per row of each part ((B_k, ...)) -> (n, ...) for the new batch, n = sum of n_k."""
        return torch.cat([v[k.to(v.device)] for v, k in zip(values, self.keep, strict=True)])

    def dense_list(self, values: Sequence[Sequence[T]]) -> list[T]:
        """The same for per-row Python lists."""
        return [v[i] for v, k in zip(values, self.keep, strict=True) for i in k.tolist()]

    def routed(self, rows: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per part, the rows its editor routed ((Bh_k,) indices into the part's batch;
        None: none) -> the new batch's routed rows (Bh,), in row order, and per part the
        positions in its `rows` of the routed rows it keeps (in the same order), to carry
        per-routed-row payloads with `pick`."""
        new_rows, picks, offset = [], [], 0
        for part_rows, keep in zip(rows, self.keep, strict=True):
            position = {} if part_rows is None else {int(r): i for i, r in enumerate(part_rows.tolist())}
            kept = [(offset + j, position[r]) for j, r in enumerate(keep.tolist()) if r in position]
            new_rows += [row for row, _ in kept]
            picks.append(torch.tensor([p for _, p in kept], dtype=torch.long))
            offset += int(keep.numel())
        device = next((r.device for r in rows if r is not None), torch.device("cpu"))
        return torch.tensor(new_rows, dtype=torch.long, device=device), picks

    @staticmethod
    def pick(values: Sequence[torch.Tensor], picks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-routed-row payloads ((Bh_k, ...) per part) -> (Bh, ...) for the new batch's
        routed rows (`routed`'s order)."""
        taken = [v[p.to(v.device)] for v, p in zip(values, picks, strict=True)]
        return torch.cat([t for t in taken if t.shape[0]] or taken[:1])


def entries(decisions: Sequence[dict[str, Any]], key: str) -> list[Any] | None:
    """Each part's decision under `key`; None when no part has one (no hook of that
    backend ran: it had no edits). Parts routed by one editor either all have it or none."""
    found = [d.get(key) for d in decisions]
    if all(f is None for f in found):
        return None
    if any(f is None for f in found):
        raise ValueError(f"cannot regroup: some batches have no {key!r} decision (routed under other edits?)")
    return found
