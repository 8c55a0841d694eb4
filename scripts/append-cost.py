#!/usr/bin/env python
"""Per-edit cost of growing a backend's row stores: `torch.cat` of the whole store against
`editors.rows.GrowingRows`, for the rows LLP, MEMOIR and GRACE append per edit on
SmolLM2-135M (shapes below). Prints the mean seconds per append of the first and last
1000 of N appends, and their ratio. Pin it to one core (taskset, one torch thread).

    python scripts/append-cost.py [--appends 3000]
"""
import argparse
import time

import torch

from kmd.editors.rows import GrowingRows

# name -> [(row shape, axis of the edits, dtype)], per edit (SmolLM2-135M: |R| 8, D 576, d_ff 1536;
# LLP's prefix rows: 10 layers >= z, b 4, 3 kv heads of 64; MEMOIR: k 154)
ROWS = {
    "llp": [((1, 8, 576), 0, torch.float32), ((1, 4, 576), 0, torch.float32), ((1, 10, 4, 3, 64), 0, torch.float32),
            ((1, 10, 4, 3, 64), 0, torch.float32), ((8, 1, 576), 1, torch.float32), ((1,), 0, torch.float32)],
    "memoir": [((1, 154), 0, torch.int64), ((1, 1536), 0, torch.float32), ((1,), 0, torch.int64)],
    "grace": [((1, 1536), 0, torch.float32), ((1, 576), 0, torch.float32)] + [((1,), 0, torch.float32)] * 4,
}


class Store:
    pass


def timed(backend: str, appends: int, grow: bool) -> list[float]:
    store, grown = Store(), GrowingRows()
    rows = [torch.ones(shape, dtype=dtype) for shape, _, dtype in ROWS[backend]]
    for i, (shape, dim, dtype) in enumerate(ROWS[backend]):
        empty = list(shape)
        empty[dim] = 0
        setattr(store, f"t{i}", torch.empty(empty, dtype=dtype))
    seconds = []
    for _ in range(appends):
        start = time.perf_counter()
        for i, (row, (_, dim, _)) in enumerate(zip(rows, ROWS[backend], strict=True)):
            if grow:
                grown.append(store, f"t{i}", row, dim=dim)
            else:
                setattr(store, f"t{i}", torch.cat([getattr(store, f"t{i}"), row], dim=dim))
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    window = min(1000, args.appends // 2)
    for backend in ROWS:
        for grow in (False, True):
            seconds = timed(backend, args.appends, grow)
            first, last = sum(seconds[:window]) / window, sum(seconds[-window:]) / window
            how = "GrowingRows" if grow else "torch.cat"
            print(f"{backend:7s} {how:11s} first {window}: {first * 1e6:8.1f} us  last {window}: {last * 1e6:8.1f} us  "
                  f"ratio {last / first:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
