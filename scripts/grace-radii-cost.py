#!/usr/bin/env python
"""GRACE's radius upkeep per edit at N entries (synthetic keys of the embedded model's d_ff):
the editor's own `_add_radius` + `_update_radii` (one key measured against the N others)
against the all-pairs recomputation it replaced (reproduced below, as it was)."""
import time

import torch

from kmd.editors.model import ModelHost, ModelSettings
from kmd.editors.registry import get_backend

torch.set_num_threads(1)
editor = get_backend("grace")(ModelHost.load(ModelSettings(device="cpu")))
d_ff = editor.keys.shape[1]
g = torch.Generator().manual_seed(0)
for n in (1000, 2000, 5000, 10000):
    keys = torch.randn(n, d_ff, generator=g)
    labels = [f"t{i % 997}" for i in range(n)]
    kept = []
    for _ in range(9):  # an edit arriving at n - 1 entries (its key row itself is appended in O(1), not timed)
        editor.keys, editor.labels = keys[:-1], labels[:-1]
        editor.halves, editor.reach = torch.full((n - 1,), torch.inf), torch.full((n - 1,), 1.0)
        editor.splits = torch.ones(n, dtype=torch.bool)
        start = time.perf_counter()
        editor._add_radius(labels[-1], keys[-1], 0.5)
        editor._update_radii()
        kept.append(time.perf_counter() - start)
    old = None
    if n <= 2000:  # the former _update_radii, every edit
        start = time.perf_counter()
        dist = torch.cdist(keys, keys)
        conflict = torch.tensor([[a != b for b in labels] for a in labels])
        torch.where(conflict, dist / 2, torch.inf).amin(1)
        old = time.perf_counter() - start
    print(f"N={n}: kept halves {sorted(kept)[len(kept) // 2] * 1000:.1f} ms per edit (median of 9); all pairs {'-' if old is None else f'{old * 1000:.0f} ms'}", flush=True)
