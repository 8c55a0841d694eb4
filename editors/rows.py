"""Per-edit row stores that grow one edit at a time in amortised O(1) (RECIPE, LLP, MEMOIR, GRACE).

A backend keeps each edit's rows in tensors (N, ...) on the editor. `torch.cat` per edit
copies the whole store (on RECIPE the last 1000 of 10,000 edits cost 4.1x the first
1000; with these buffers 0.82x). Here the tensor is a prefix view of a buffer with
spare rows, reallocated at twice the size when full.

Forks (`Editor.fork`) share the views: the owner writes only past the rows of the view it
holds, and only into a buffer it allocated, while it still holds the very view handed to
it; so a fork never writes into its parent's buffer (nor the parent into rows a fork
sees), and a revert or a load, which make new tensors, make the next append copy them.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch


@dataclasses.dataclass
class GrowingRows:
    """The buffers behind an owner's growing tensors, by attribute name. One per editor,
    composed (`self.grown = GrowingRows()`; a fork gets a copy, being a mutable dataclass,
    whose entries still name the parent, so its first append of each name copies)."""

    # name -> (the owner, the buffer (spare rows on the edits' axis), the view last set on the owner)
    buffers: dict[str, tuple[weakref.ref, torch.Tensor, weakref.ref]] = dataclasses.field(default_factory=dict)

    def append(self, owner: object, name: str, rows: torch.Tensor, dim: int = 0) -> None:
        """`owner.<name>` (N, ...) becomes (N + M, ...) with `rows` (M, ...) after its rows:
        the values, dtype, device and shape that torch.cat([owner.<name>, rows], dim) gives
        (`dim` >= 0: the axis of the edits, e.g. 1 for LLP's unit keys (|R|, N, D))."""
        current = getattr(owner, name)
        n, m = current.shape[dim], rows.shape[dim]
        same = [a == b for axis, (a, b) in enumerate(zip(rows.shape, current.shape)) if axis != dim]
        fits = rows.dim() == current.dim() and all(same) and rows.device == current.device
        if not fits or torch.promote_types(current.dtype, rows.dtype) != current.dtype:  # torch.cat would fail or promote
            raise ValueError(f"{name}: rows {tuple(rows.shape)} {rows.dtype} {rows.device} do not fit "
                             f"{tuple(current.shape)} {current.dtype} {current.device}")
        entry = self.buffers.get(name)
        if entry is not None and entry[0]() is owner and entry[2]() is current and entry[1].shape[dim] >= n + m:
            buffer = entry[1]
        else:  # none yet, full, a fork's, or the tensor was replaced (revert, load): copy into a new one
            shape = list(current.shape)
            shape[dim] = max(16, 2 * (n + m))
            buffer = torch.empty(shape, dtype=current.dtype, device=current.device)
            buffer.narrow(dim, 0, n).copy_(current)
        buffer.narrow(dim, n, m).copy_(rows)
        view = buffer.narrow(dim, 0, n + m)
        self.buffers[name] = (weakref.ref(owner), buffer, weakref.ref(view))
        setattr(owner, name, view)
