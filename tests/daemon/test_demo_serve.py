"""`kmd demo --serve`: after its cycle the demo prints the console's URL and serves until
Ctrl-C. Slow: the demo's policy (LLP, the shipped 337-prompt locality suite, the MiniLM
encoder) takes a minute or more even on the tiny model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest


@pytest.mark.slow
def test_demo_serve_prints_the_console_url_and_serves_until_ctrl_c(tmp_path, tiny_model_dir):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("KMD_API_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "kmd.daemon.cli", "demo", "--model", str(tiny_model_dir),
                             "--device", "cpu", "--workdir", str(tmp_path), "--serve", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 900
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError("the demo exited before serving:\n" + "".join(seen[-40:]))
            seen.append(line)
            found = re.search(r"Review console:\s+(http://127\.0\.0\.1:\d+)/ui", line)
            url = found.group(1) if found else None
        assert url, "".join(seen[-40:])
        token = (tmp_path / "api-token").read_text().strip()
        assert (tmp_path / "api-token").stat().st_mode & 0o077 == 0  # only the user reads it
        assert token not in "".join(seen)  # printed: where the token is, not the token
        assert httpx.get(f"{url}/ui/edits", timeout=30).status_code == 200
        assert httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"] == str(tiny_model_dir)
        time.sleep(4)  # a serve-loop cycle runs meanwhile
        assert proc.poll() is None  # still serving
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
        assert "stopped serving" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
