"""One daemon operation in a process of its own, for the crash-point tests.

    python crash_driver.py CONFIG cycle          poll, verify and edit once (apply, supersede)
    python crash_driver.py CONFIG revert ID      an operator's revert, as `POST /v1/edits/ID/revert` does it

Run with `KMD_CRASH_AT=<point>`: the process dies there (kmd.daemon.crashpoints).
"""

from __future__ import annotations

import sys

from kmd.daemon.service import Daemon
from kmd.daemon.settings import load_settings


def main(config: str, op: str, *args: str) -> None:
    daemon = Daemon(load_settings(config))
    daemon.load()
    if op == "cycle":
        daemon.cycle(regression=False)
    elif op == "revert":
        daemon.maintainer.revert(int(args[0]), reason="operator revert", actor="api")
    else:
        raise SystemExit(f"unknown operation {op!r}")
    daemon.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
