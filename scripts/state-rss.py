#!/usr/bin/env python
"""Memory a saved editor state costs to load and to save again: the process's resident set
(RSS) before, at its peak during, and after each step, sampled every 5 ms.

    python scripts/state-rss.py STATE

STATE is any `save_editor` state (a `kmd bench --checkpoint` slot). The save goes to a
temporary directory beside STATE (on its disk) and is removed afterwards.
"""
import argparse
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from kmd.editors.model import ModelHost, ModelSettings
from kmd.editors.state import load_editor, save_editor

PAGE = 4096


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


@contextmanager
def peak_rss(label: str):
    """Print RSS before, the peak during and after the block (GB)."""
    before, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        after = rss_bytes()
        peak[0] = max(peak[0], after)
        gb = 1e9
        print(f"{label}: RSS before {before / gb:.2f} GB, peak {peak[0] / gb:.2f} GB (+{(peak[0] - before) / gb:.2f}), "
              f"after {after / gb:.2f} GB; {time.perf_counter() - start:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    host = ModelHost.load(ModelSettings(device="cpu"))
    with peak_rss("load"):
        editor = load_editor(args.state, host)
    state_bytes = sum(t.numel() * t.element_size() for t in editor.state_tensors().values())
    print(f"{editor.name}: {len(editor.edit_ids)} edits, state tensors {state_bytes / 1e9:.2f} GB")
    with tempfile.TemporaryDirectory(dir=args.state.parent) as tmp, peak_rss("save"):
        save_editor(editor, Path(tmp) / "state")


if __name__ == "__main__":
    main()
