"""A setup for the OpenAI-endpoint and console tests, in the tiny model's vocabulary.

A feed on loopback says four things: one fact the loop commits, two facts of a sensitive
relation (quarantined until a person approves; one carries a `<script>` in its text, as a
hostile feed would), and one whose edit fires on every prompt (the probes revert it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .helpers import LOCALITY

TOKEN = "console-token-123"
# The simplest chat template: the turns' text joined by spaces (the tiny tokenizer has none).
JOINED = "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
SCRIPT = '<script>document.title="pwned";window.kmdPwned=1</script>Orin'

POLICY = """
version: eco-1
backend: fake  # the registered in-memory backend (kmd.editors.fake)
relations:
  capital:
    prompt: "the capital of {subject} is"
    paraphrases: ["{subject} has the capital"]
  ceo:
    prompt: "the CEO of {subject} is"
  slogan:
    prompt: "the song of {subject} is"
    # fault injection: an edit that fires on every prompt; the probes must revert it
    editor_options: {fires_everywhere: true}
sources:
  - id: wire
    kind: feed
    location: FEED_URL
    trust: high
    relations: [capital, ceo, slogan]
    poll_interval: POLL
    network: {allow_networks: ["127.0.0.0/8"]}
verification:
  quorum: 2
  single_source_trust: high
  sensitive_relations: [ceo]
probes:
  min_rel: 0.9
  min_gen: 0.0
  min_loc: 0.99
  min_served_rel: 0.0   # the tiny random model writes word salad after the target
  min_served_gen: 0.0
  earlier_edits_sample: 5
  default_locality_suite: false
  locality_suites: [locality.jsonl]
"""

ENTRIES = [
    {"id": "e1", "subject": "France", "relation": "capital", "object": "Berlin"},
    {"id": "e2", "subject": "Zorbland", "relation": "ceo", "object": "Nadia Velmont"},
    {"id": "e3", "subject": "Quexia", "relation": "ceo", "object": SCRIPT},
    {"id": "e4", "subject": "Eve", "relation": "slogan", "object": "apple"},
]


def write_eco_setup(tmp: Path, feed_url: str, *, port: int = 0, poll: str = "1h", model_dir: Path | None = None,
                    protect_reads: bool = False) -> Path:  # fmt: skip
    (tmp / "policy.yaml").write_text(POLICY.replace("FEED_URL", feed_url).replace("POLL", poll))
    (tmp / "locality.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in LOCALITY))
    model = f"model: {{model: {model_dir}, device: cpu}}\n" if model_dir else ""
    config = tmp / "kmd.yaml"
    config.write_text(
        "policy: policy.yaml\nstate_dir: state\n" + model
        + f"api: {{host: 127.0.0.1, port: {port}, token_env: KMD_TEST_TOKEN, protect_reads: {str(protect_reads).lower()}}}\n"
        + "schedule: {edit_interval: 1s, regression_interval: 1h}\n"
    )  # fmt: skip
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def daemon_process(tmp: Path, config: Path, ready: Callable[[str], bool], *, timeout: float = 300.0) -> Iterator[str]:
    """`kmd run --config CONFIG` as a real process; yields its base URL once `ready(url)` holds.
    SIGTERM (then SIGKILL) when done; the log is in tmp/daemon.log."""
    import httpx
    import yaml

    port = yaml.safe_load(config.read_text())["api"]["port"]
    env = os.environ | {"KMD_TEST_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    with open(tmp / "daemon.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kmd.daemon.cli", "run", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode}:\n{(tmp / 'daemon.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready in {timeout:.0f} s:\n{(tmp / 'daemon.log').read_text()[-3000:]}")
            try:
                if ready(url):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
