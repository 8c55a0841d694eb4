"""Many HTTP clients hammering one endpoint, from their own process (as real clients are):
threads in the test's process would take the server's GIL, and then a test measures its
own clients rather than the server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

_SCRIPT = """
import json, os, sys, threading, time, httpx
url, body, clients, stop_file, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
lock = threading.Lock()

def hammer():
    with httpx.Client(timeout=120) as client:
        while not os.path.exists(stop_file):
            status = client.post(url, json=body).status_code
            with lock, open(out, "a") as f:
                f.write(f"{status} {time.time()}\\n")
            if status == 429:
                time.sleep(0.05)

threads = [threading.Thread(target=hammer) for _ in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


class Flood:
    """`with Flood(url, body, clients, tmp_path) as flood:` posts `body` to `url` from
    `clients` threads of another process until the block ends; `flood.served()` lists
    (status, time.time() it finished) of every request so far."""

    def __init__(self, url: str, body: dict, clients: int, workdir: Path) -> None:
        self.args = [url, json.dumps(body), str(clients)]
        self.stop_file, self.out = workdir / "flood.stop", workdir / "flood.log"

    def __enter__(self) -> Flood:
        self.stop_file.unlink(missing_ok=True)
        self.out.write_text("")
        self.process = subprocess.Popen([sys.executable, "-c", _SCRIPT, *self.args, str(self.stop_file), str(self.out)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_file.touch()
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def served(self) -> list[tuple[int, float]]:
        rows = [line.split() for line in self.out.read_text().splitlines()]
        return [(int(r[0]), float(r[1])) for r in rows if len(r) == 2]

    def statuses(self) -> set[int]:
        return {status for status, _ in self.served()}

    def wait_until_budget_spent(self, timeout: float = 60) -> None:
        """Until the budget is spent (a 429) and being served (a 200)."""
        deadline = time.monotonic() + timeout
        while not {429, 200} <= self.statuses() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {429, 200} <= self.statuses(), f"the flood never filled the budget: {self.statuses()}"
