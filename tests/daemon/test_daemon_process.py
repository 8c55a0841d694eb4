"""The daemon as a real process: feed on loopback -> edits -> answers through the API;
a harmful edit reverted automatically; SIGKILL mid-edit then restart -> consistent state."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from intake.helpers import LoopbackServer, Route, atom

from .helpers import LOCALITY

TOKEN = "test-token-123"

POLICY = """
version: proc-1
backend: grace
relations:
  capital:
    prompt: "the capital of {subject} is"
  language:
    prompt: "the language of {subject} is"
  slogan:
    prompt: "the song of {subject} is"
    # fault injection: an edit that fires on every prompt; the probes must catch it
    editor_options: {radius: 1.0e9, split_conflicts: false, question_check: false}
  slow:
    prompt: "the film of {subject} is"
    # an edit that keeps optimising for a while: something to kill mid-edit
    editor_options: {max_steps: 600, stop_loss: 0.0}
sources:
  - id: wire
    kind: feed
    location: FEED_URL
    trust: high
    relations: [capital, language]
    poll_interval: 1s
    network: {allow_networks: ["127.0.0.0/8"]}
  - id: api
    kind: api
    trust: high
    relations: [slogan, slow, capital]
    needs_approval: false  # the test injects facts through the API and wants them applied
verification:
  quorum: 2
  single_source_trust: high
probes:
  min_served_rel: 0.0   # the tiny random model writes word salad after the target
  min_served_gen: 0.0
  min_rel: 0.9
  min_gen: 0.0
  min_loc: 0.99
  earlier_edits_sample: 5
  default_locality_suite: false
  locality_suites: [locality.jsonl]
"""



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def setup(tmp_path, tiny_model_dir):
    server = LoopbackServer()
    server.routes["/feed.atom"] = Route(
        body=atom([
            {"id": "e1", "subject": "France", "relation": "capital", "object": "Berlin"},
            {"id": "e2", "subject": "Spain", "relation": "language", "object": "banana"},
        ])
    )  # fmt: skip
    server.thread.start()
    policy = POLICY.replace("FEED_URL", server.url("/feed.atom"))
    (tmp_path / "policy.yaml").write_text(policy)
    (tmp_path / "locality.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in LOCALITY))
    port = free_port()
    (tmp_path / "kmd.yaml").write_text(
        "policy: policy.yaml\nstate_dir: state\n"
        f"model: {{model: {tiny_model_dir}, device: cpu}}\n"
        f"api: {{host: 127.0.0.1, port: {port}, token_env: KMD_TEST_TOKEN}}\n"
        "schedule: {edit_interval: 1s, regression_interval: 1h}\n"
    )
    yield tmp_path, f"http://127.0.0.1:{port}"
    server.httpd.shutdown()


def start(tmp_path: Path) -> subprocess.Popen:
    env = os.environ | {"KMD_TEST_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "daemon.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "kmd.daemon.cli", "run", "--config", str(tmp_path / "kmd.yaml")],
                            stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip


def wait_for(predicate, timeout: float = 240.0, what: str = "condition", proc=None, tmp=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}:\n{(tmp / 'daemon.log').read_text()[-3000:]}")
        try:
            value = predicate()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def generate(api: str, prompt: str) -> str:
    return httpx.post(f"{api}/v1/generate", json={"prompt": prompt, "max_new_tokens": 3}, timeout=60).json()["text"]


def committed(api: str) -> list[dict]:
    return httpx.get(f"{api}/v1/edits", params={"status": "committed"}, timeout=30).json()


def test_feed_to_edits_harmful_revert_and_kill_mid_edit(setup):
    tmp, api = setup
    proc = start(tmp)
    try:
        assert wait_for(lambda: httpx.get(f"{api}/healthz", timeout=5).status_code == 200, what="healthz", proc=proc, tmp=tmp)
        wait_for(lambda: len(committed(api)) == 2, what="two committed edits", proc=proc, tmp=tmp)
        assert generate(api, "the capital of France is").strip().startswith("Berlin")
        assert generate(api, "the language of Spain is").strip().startswith("banana")
        metrics = httpx.get(f"{api}/metrics", timeout=10).text
        assert "kmd_edits_committed_total 2.0" in metrics and "kmd_edits_active 2.0" in metrics
        assert "kmd_feed_entries_unmatched_total 0.0" in metrics  # every entry of its feed states a fact
        before = {p: generate(api, p) for p in LOCALITY}

        # bad requests and missing credentials get clear 4xx answers
        fact = {"subject": "Eve", "relation": "slogan", "object": "apple", "source_id": "api"}
        assert httpx.post(f"{api}/v1/facts", json=fact, timeout=10).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        wrong = httpx.post(f"{api}/v1/facts", json={"subject": "x"}, headers=auth, timeout=10)
        assert wrong.status_code == 422 and any("object" in p for p in wrong.json()["problems"])
        assert httpx.post(f"{api}/v1/generate", json={"prompt": ""}, timeout=10).status_code == 422
        bad = httpx.post(f"{api}/v1/facts", json=fact | {"relation": "nope"}, headers=auth, timeout=10)
        assert bad.status_code == 422 and "may not assert" in bad.json()["detail"]

        # an injected harmful edit is caught by the probes and reverted
        assert httpx.post(f"{api}/v1/facts", json=fact, headers=auth, timeout=10).status_code == 202
        reverts = wait_for(lambda: httpx.get(f"{api}/v1/reverts", timeout=10).json(), what="a revert", proc=proc, tmp=tmp)
        assert "locality" in reverts[0]["reason"]
        wait_for(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 200, what="ready", proc=proc, tmp=tmp)
        assert {p: generate(api, p) for p in LOCALITY} == before
        assert len(committed(api)) == 2

        # SIGKILL in the middle of an edit
        slow = {"subject": "Carol", "relation": "slow", "object": "apple", "source_id": "api"}
        assert httpx.post(f"{api}/v1/facts", json=slow, headers=auth, timeout=10).status_code == 202
        wait_for(lambda: httpx.get(f"{api}/v1/edits", params={"status": "applied"}, timeout=10).json(),
                 what="an edit in flight", proc=proc, tmp=tmp)  # fmt: skip
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

        proc = start(tmp)
        wait_for(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 200, what="ready after restart", proc=proc, tmp=tmp)
        edits = httpx.get(f"{api}/v1/edits", timeout=10).json()
        # the interrupted fact is retried (nothing lost); wait until that retry settles
        wait_for(lambda: len([e for e in httpx.get(f"{api}/v1/edits", timeout=10).json()
                              if e["request"]["prompt"] == "the film of Carol is" and e["status"] != "applied"]) == 2,
                 timeout=600, what="the retried edit to settle", proc=proc, tmp=tmp)  # fmt: skip
        wait_for(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 200, what="ready", proc=proc, tmp=tmp)
        interrupted = min((e for e in edits if e["request"]["prompt"] == "the film of Carol is"), key=lambda e: e["id"])
        assert interrupted["status"] == "reverted" and "interrupted" in interrupted["status_reason"]
        assert not httpx.get(f"{api}/v1/edits", params={"status": "applied"}, timeout=10).json()
        manifest = json.loads((tmp / "state" / "editor" / "manifest.json").read_text())
        assert [e["edit_id"] for e in manifest["edits"]] == [str(e["id"]) for e in committed(api)]
        assert generate(api, "the capital of France is").strip().startswith("Berlin")
        assert generate(api, "the language of Spain is").strip().startswith("banana")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)


def test_sigterm_stops_cleanly(setup):
    tmp, api = setup
    proc = start(tmp)
    try:
        wait_for(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 200, what="ready", proc=proc, tmp=tmp)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert "stopped cleanly" in (tmp / "daemon.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
