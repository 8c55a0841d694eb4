#!/usr/bin/env python
"""GRACE's radius upkeep per edit at N entries (synthetic keys, d_ff = 1536): the old all-pairs
recomputation against the kept halves (one key measured against the N others)."""
import time, torch
torch.set_num_threads(1)
from kmd.editors.grace.editor import _distances
g = torch.Generator().manual_seed(0)
for n in (1000, 2000, 5000, 10000):
    keys = torch.randn(n, 1536, generator=g)
    labels = [f"t{i % 997}" for i in range(n)]
    scales, splits = torch.full((n,), 0.5), torch.ones(n, dtype=torch.bool)
    halves = torch.full((n - 1,), torch.inf)
    t = time.perf_counter()
    for _ in range(5):  # the new way: what one apply does
        conflicts = torch.tensor([o != labels[-1] for o in labels[:-1]], dtype=torch.bool)
        half = torch.where(conflicts, _distances(keys[:-1], keys[-1]) / 2, torch.inf)
        h = torch.cat([torch.minimum(halves, half), half.amin(0, keepdim=True)])
        reach = torch.cat([scales[:-1], 0.5 * keys[-1:].norm(dim=1)])
        radii = torch.where(splits, torch.minimum(reach, h), reach)
    kept = (time.perf_counter() - t) / 5
    old = None
    if n <= 2000:
        t = time.perf_counter()
        dist = torch.cdist(keys, keys)
        conflict = torch.tensor([[a != b for b in labels] for a in labels])
        torch.where(conflict, dist / 2, torch.inf).amin(1)
        old = time.perf_counter() - t
    print(f"N={n}: kept halves {kept*1000:.1f} ms per edit; all pairs {'-' if old is None else f'{old*1000:.0f} ms'}", flush=True)
