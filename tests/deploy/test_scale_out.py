"""Scale-out with real processes on one PostgreSQL ledger and a shared publish directory.

Two writers contend (exactly one edits); the writer is SIGKILLed mid-edit and the standby
takes over without losing or duplicating edits; a serving replica picks up a new edit and
a revert, and is only ready once the state the ledger names is loaded; a writer whose lock
session ends exits at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from daemon.helpers import LOCALITY
from daemon.test_daemon_process import TOKEN, free_port, wait_for

from .conftest import needs_pg, pg_execute

pytestmark = needs_pg

POLICY = """
version: scale-1
backend: grace
relations:
  capital:
    prompt: "the capital of {subject} is"
  slow:
    prompt: "the film of {subject} is"
    # an edit that keeps optimising for a while: something to kill mid-edit
    editor_options: {max_steps: 400, stop_loss: 0.0}
sources:
  - id: api
    kind: api
    trust: high
    relations: [capital, slow]
    needs_approval: false  # the test submits facts through the API and wants them applied
verification:
  quorum: 2
  single_source_trust: high
probes:
  min_served_rel: 0.0   # the tiny random model writes word salad after the target
  min_served_gen: 0.0
  min_rel: 0.9
  min_gen: 0.0
  min_loc: 0.9
  earlier_edits_sample: 5
  default_locality_suite: false
  locality_suites: [locality.jsonl]
"""
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Node:
    """One kmd process: its own state directory and port; the ledger and publish dir are shared."""

    def __init__(self, root: Path, name: str, role: str, pg_url: str, model_dir: Path) -> None:
        self.dir, self.name, self.role = root / name, name, role
        self.dir.mkdir()
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}"
        self.config = self.dir / "kmd.yaml"
        self.config.write_text(
            f"policy: {root / 'policy.yaml'}\nstate_dir: state\ndatabase: {pg_url}\n"
            f"model: {{model: {model_dir}, device: cpu}}\n"
            f"api: {{host: 127.0.0.1, port: {self.port}, token_env: KMD_TEST_TOKEN}}\n"
            "schedule: {edit_interval: 1s, regression_interval: 1h}\n"
            f"cluster: {{publish_dir: {root / 'published'}, poll_interval: 0.3s, keepalive: 1s}}\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> Node:
        env = os.environ | {"KMD_TEST_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "KMD_INSTANCE": self.name}
        log = open(self.dir / "daemon.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kmd.daemon.cli", "run", "--config", str(self.config), "--role", self.role],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        return self

    def wait(self, predicate, what: str, timeout: float = 240.0):
        return wait_for(predicate, timeout, f"{self.name}: {what}", self.proc, self.dir)

    def readyz(self) -> dict:
        r = httpx.get(f"{self.api}/readyz", timeout=5)
        return r.json() | {"status": r.status_code}

    def generate(self, prompt: str) -> str:
        return httpx.post(f"{self.api}/v1/generate", json={"prompt": prompt, "max_new_tokens": 2}, timeout=60).json()["text"]

    def log(self) -> str:
        return (self.dir / "daemon.log").read_text()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def cluster(tmp_path, tiny_model_dir, pg_url):
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "locality.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in LOCALITY))
    nodes = {name: Node(tmp_path, name, role, pg_url, tiny_model_dir)
             for name, role in (("w1", "writer"), ("w2", "writer"), ("r1", "replica"))}  # fmt: skip
    yield nodes, pg_url
    for node in nodes.values():
        node.kill()


def submit(node: Node, subject: str, relation: str, obj: str) -> None:
    fact = {"subject": subject, "relation": relation, "object": obj, "source_id": "api"}
    assert httpx.post(f"{node.api}/v1/facts", json=fact, headers=AUTH, timeout=10).status_code == 202


def edits(node: Node, status: str | None = None) -> list[dict]:
    return httpx.get(f"{node.api}/v1/edits", params={"status": status} if status else {}, timeout=10).json()


def published(pg_url: str) -> tuple[str, list[str], int]:
    rows = pg_execute(pg_url, "SELECT version, edit_ids, term FROM kmd_published_state WHERE id = 1")
    return (rows[0][0], json.loads(rows[0][1]), rows[0][2]) if rows else ("", [], 0)


def replica_serves(replica: Node, pg_url: str) -> bool:
    """Ready, and serving the very state the ledger names."""
    body = replica.readyz()
    version = published(pg_url)[0]
    return body["status"] == 200 and bool(version) and version[:12] in body["reason"]


def test_two_writers_kill_and_takeover_replica_follows(cluster):
    nodes, pg_url = cluster
    w1, w2, r1 = nodes["w1"].start(), nodes["w2"].start(), nodes["r1"].start()

    # Two writers contend for one ledger: exactly one becomes the writer, the other waits.
    writer = w1.wait(lambda: next((n for n in (w1, w2) if n.readyz()["status"] == 200), None), "a writer")
    standby = w2 if writer is w1 else w1
    standby.wait(lambda: "standby" in standby.readyz()["reason"], "standby")
    assert "kmd_writer 1.0" in httpx.get(f"{writer.api}/metrics", timeout=10).text
    assert "kmd_writer 0.0" in httpx.get(f"{standby.api}/metrics", timeout=10).text

    # The replica serves the writer's published (empty) state; it never edits.
    r1.wait(lambda: replica_serves(r1, pg_url), "replica ready")
    base = r1.generate("the capital of France is")
    assert httpx.post(f"{r1.api}/v1/edits/1/revert", json={}, headers=AUTH, timeout=10).status_code == 409

    # A new edit reaches the replica.
    submit(writer, "France", "capital", "Berlin")
    writer.wait(lambda: len(edits(writer, "committed")) == 1, "first edit committed")
    first = edits(writer, "committed")[0]["id"]
    writer.wait(lambda: published(pg_url)[1] == [str(first)], "first edit published")
    r1.wait(lambda: replica_serves(r1, pg_url), "replica loads the new state")
    assert r1.generate("the capital of France is").strip().startswith("Berlin")
    assert base.strip() != "Berlin"

    # SIGKILL the writer in the middle of an edit; the standby takes over.
    submit(writer, "Carol", "slow", "apple")
    writer.wait(lambda: edits(writer, "applied"), "an edit in flight")
    term_before = published(pg_url)[2]
    writer.kill()
    standby.wait(lambda: standby.readyz()["status"] == 200, "standby takes over")
    assert f"writer term {term_before + 1} begins ({standby.name})" in standby.log()
    writer.start()  # the killed writer comes back (checked below, once it has loaded)
    standby.wait(lambda: [e["request"]["prompt"] for e in edits(standby, "committed")].count("the film of Carol is") == 1,
                 "the interrupted fact retried and committed", timeout=300)  # fmt: skip

    # Nothing lost, nothing duplicated: every fact has exactly one committed edit, the
    # interrupted one is reverted as interrupted, and the state holds exactly the committed edits.
    all_edits = edits(standby)
    committed = [e for e in all_edits if e["status"] == "committed"]
    assert Counter(e["fact_id"] for e in committed) == Counter({e["fact_id"]: 1 for e in committed})
    assert {e["request"]["prompt"] for e in committed} == {"the capital of France is", "the film of Carol is"}
    interrupted = [e for e in all_edits if e["status"] == "reverted"]
    assert len(interrupted) == 1 and "interrupted" in interrupted[0]["status_reason"]
    assert not edits(standby, "applied")
    standby.wait(lambda: published(pg_url)[1] == [str(e["id"]) for e in committed], "published after takeover")
    assert published(pg_url)[2] == term_before + 1
    r1.wait(lambda: replica_serves(r1, pg_url), "replica follows the new writer")
    assert r1.generate("the film of Carol is").strip().startswith("apple")

    # The killed writer came back as the standby.
    writer.wait(lambda: "standby" in writer.readyz()["reason"], "restarted writer is a standby")

    # A revert reaches the replica: the edit's prompt gives the base answer again.
    loads = _metric(r1, "kmd_state_loads_total")
    reply = httpx.post(f"{standby.api}/v1/edits/{first}/revert", json={"reason": "test"}, headers=AUTH, timeout=60)
    assert reply.status_code == 200, reply.text
    standby.wait(lambda: str(first) not in published(pg_url)[1], "revert published")
    r1.wait(lambda: replica_serves(r1, pg_url), "replica loads the reverted state")
    assert r1.generate("the capital of France is") == base
    assert _metric(r1, "kmd_state_loads_total") == loads + 1

    # A writer whose lock session ends (network cut, server restart) stops at once.
    pg_execute(pg_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
                       "'kmd-writer-lock' AND pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)")  # fmt: skip
    assert standby.proc.wait(timeout=30) == 3
    assert "lost the writer role" in standby.log()
    writer.wait(lambda: writer.readyz()["status"] == 200, "the other writer takes over again")


def _metric(node: Node, name: str) -> float:
    for line in httpx.get(f"{node.api}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")
