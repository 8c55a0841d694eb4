"""Serving while the writer edits: one engine on committed snapshots, continuous batching,
budgets (429), operator actions ahead of a flood, and probes of what users read (tiny
random model, in process)."""

from __future__ import annotations

import threading
import time

import httpx
from fastapi.testclient import TestClient

from kmd.daemon.api import create_app
from kmd.daemon.serving import Budget, GenerationRequest, Scheduler, ServedState, ServingEngine
from kmd.editors.scoring import generate_ids, generate_text

from .ecosystem import TOKEN
from .flood import Flood
from .test_maintainer import make_daemon

PROMPT = "the capital of France is"
LONG = "who wrote the book ?"  # the tiny model's greedy answer runs 200 tokens without an end of sequence


def with_budgets(daemon, **budgets: dict) -> None:
    """Give the daemon's engine these budgets (before its first request)."""
    api = daemon.settings.api
    changed = api.budgets.model_copy(update={k: api.budgets.token.model_copy(update=v) for k, v in budgets.items()})
    daemon.settings = daemon.settings.model_copy(update={"api": api.model_copy(update={"budgets": changed})})


def test_a_request_during_an_edit_sees_the_old_state_and_does_not_wait_for_it(tmp_path, tiny_host, monkeypatch):
    monkeypatch.setenv("KMD_TEST_TOKEN", TOKEN)
    daemon, _ = make_daemon(tmp_path, tiny_host, [("France", "capital", "Berlin")])
    daemon.load()
    m = daemon.maintainer
    client = TestClient(create_app(daemon))
    body = {"model": "embedded", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}

    def complete() -> tuple[dict, float]:
        started = time.perf_counter()
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json(), time.perf_counter() - started

    base, _ = complete()
    idle = min(complete()[1] for _ in range(3))
    probing, release = threading.Event(), threading.Event()
    check = m.prober.check

    def held_check(*args, **kwargs):  # the writer stops after probing its candidate, holding its lock
        report = check(*args, **kwargs)
        probing.set()
        assert release.wait(120)
        return report

    m.prober.check = held_check
    writer = threading.Thread(target=daemon.cycle)
    writer.start()
    try:
        assert probing.wait(300)
        assert m.editor.edit_ids and m.serving.edit_ids == [], "the candidate is the working editor's only"
        assert daemon.readiness() == (True, "ok"), "ready while an edit is in flight"
        assert not m.lock.acquire(blocking=False), "the writer holds its lock"
        during, seconds = complete()
        assert daemon.generate(PROMPT, 4) == base["choices"][0]["text"]
    finally:
        release.set()
        writer.join(300)
    # the writer was held the whole time: a request that waited for it would never have answered
    assert during["choices"][0]["text"] == base["choices"][0]["text"], "a request during the edit saw the candidate"
    assert during["system_fingerprint"] == base["system_fingerprint"] == "kmd-base"
    assert seconds < max(10 * idle, 5.0), (seconds, idle)
    edited, _ = complete()
    assert m.serving.edit_ids == m.editor.edit_ids and len(m.editor.edit_ids) == 1
    assert edited["choices"][0]["text"] == generate_text(tiny_host, m.editor, [PROMPT], 4)[0] != base["choices"][0]["text"]
    assert edited["system_fingerprint"] == f"kmd-{m.served.version[:12]}"
    m.revert(int(m.editor.edit_ids[0]), reason="test", actor="test")
    assert complete()[0]["choices"][0]["text"] == base["choices"][0]["text"], "the reverted edit is gone for new requests"
    daemon.close()


def test_requests_join_the_running_batch_and_answer_as_alone(tiny_host):
    prompts = [PROMPT, "who wrote the book ?", "the dog and the cat", "Alice plays music",
               "the river of Japan", "Bob speaks the language of"]  # fmt: skip
    lengths = [12, 3, 9, 6, 12, 2]
    encoded = [tiny_host.encode(p) for p in prompts]
    alone = [generate_ids(tiny_host, None, [e], n)[0] for e, n in zip(encoded, lengths, strict=True)]
    engine = ServingEngine(tiny_host, lambda: ServedState(None, None), Scheduler({"token": Budget(8, 8, 64)}, max_batch=8))
    streams = []
    for e, n in zip(encoded, lengths, strict=True):  # one after another: each joins rows already decoding
        streams.append(engine.submit(GenerationRequest(e, n)))
        streams[-1].wait_started(60)
    got = [s.result(60) for s in streams]
    engine.close()
    assert got == alone, "joining a running batch changed an answer"
    assert sum(s.joined_running_batch for s in streams) >= 3 and engine.stats.largest_batch >= 3, engine.stats
    assert [s.finish_reason for s in streams] == ["length"] * len(prompts)


def test_ignore_eos_writes_max_tokens_through_the_end_of_sequence(tiny_host):
    """`ignore_eos` (benchmarks at equal work): the row goes on through a token that would end it."""
    encoded = tiny_host.encode(PROMPT)
    alone = generate_ids(tiny_host, None, [encoded], 4)[0]
    engine = ServingEngine(tiny_host, lambda: ServedState(None, None), Scheduler({"token": Budget(8, 8, 64)}, max_batch=8))
    engine._eos = frozenset({alone[0]})  # the first token written ends the sequence
    try:
        ended = engine.submit(GenerationRequest(encoded, 4))
        kept = engine.submit(GenerationRequest(encoded, 4, ignore_eos=True))
        assert ended.result(60) == alone[:1] and ended.finish_reason == "stop"
        assert kept.result(60) == alone and kept.finish_reason == "length"
    finally:
        engine.close()


def test_a_full_queue_gets_429_with_retry_after_and_token_holders_have_their_own_budget(tmp_path, tiny_host, monkeypatch):
    monkeypatch.setenv("KMD_TEST_TOKEN", TOKEN)
    daemon, _ = make_daemon(tmp_path, tiny_host, [])
    daemon.load()
    with_budgets(daemon, anonymous={"concurrent": 1, "queued": 1, "max_tokens": 64})
    gate, prefill = threading.Event(), threading.Event()
    served = daemon.served_state

    def held() -> ServedState:  # the engine thread stops at its first prefill until the gate opens
        if threading.current_thread().name == "kmd-serving":
            prefill.set()
            assert gate.wait(120)
        return served()

    monkeypatch.setattr(daemon, "served_state", held)
    engine = daemon.engine()
    host = daemon.maintainer.host
    running = engine.submit(GenerationRequest(host.encode(PROMPT), 2, caller="anonymous"))
    assert prefill.wait(60)  # admitted: it holds the one anonymous slot
    waiting = engine.submit(GenerationRequest(host.encode(PROMPT), 2, caller="anonymous"))  # the one queue place
    client = TestClient(create_app(daemon))
    refused = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2})
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    openai = client.post("/v1/completions", json={"model": "embedded", "prompt": PROMPT, "max_tokens": 2})
    assert openai.status_code == 429 and int(openai.headers["Retry-After"]) >= 1
    assert openai.json()["error"]["type"] == "rate_limit_error" and openai.json()["error"]["code"] == "rate_limit_exceeded"
    over = client.post("/v1/completions", json={"model": "embedded", "prompt": PROMPT, "max_tokens": 65})
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
    token = engine.submit(GenerationRequest(host.encode(PROMPT), 2, caller="token"))  # not the anonymous budget
    gate.set()
    for stream in (running, waiting, token):
        assert len(stream.result(60)) == 2
    assert engine.scheduler.rejected == 2
    ok = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2})
    assert ok.status_code == 200 and ok.json()["edits"] == 0
    daemon.close()


def test_an_operator_revert_is_served_ahead_of_an_anonymous_flood(tmp_path, tiny_host, monkeypatch):
    """Issue 25: 80 anonymous completions delayed a revert by 28.6 s (generation held the
    writer's lock and every worker thread). Now generation holds neither."""
    monkeypatch.setenv("KMD_TEST_TOKEN", TOKEN)
    daemon, _ = make_daemon(tmp_path, tiny_host, [("France", "capital", "Berlin")])
    daemon.load()
    assert daemon.cycle().committed
    edit_id = int(daemon.maintainer.editor.edit_ids[0])
    daemon.start_api()
    base = daemon.api_url
    body = {"model": "embedded", "prompt": LONG, "max_tokens": 64, "temperature": 0}
    try:
        with Flood(f"{base}/v1/completions", body, 80, tmp_path) as flood:
            flood.wait_until_budget_spent()
            with httpx.Client(timeout=60) as client:
                started = time.perf_counter()
                health = client.get(f"{base}/healthz")
                healthz = time.perf_counter() - started
                started = time.perf_counter()
                revert = client.post(f"{base}/v1/edits/{edit_id}/revert", json={"reason": "flood test"},
                                     headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
                seconds = time.perf_counter() - started
                reverted_at = time.time()
            time.sleep(0.5)
    finally:
        daemon.stop_api()
    assert revert.status_code == 200, revert.text
    assert health.status_code == 200 and healthz < 1.0, healthz
    assert seconds < 5.0, f"the revert took {seconds:.1f} s under the flood"
    assert any(t > reverted_at for _, t in flood.served()), "the flood was still being served when the revert was done"
    assert daemon.maintainer.serving.edit_ids == []
    daemon.close()


def test_an_edit_whose_answers_are_wrong_is_reverted_naming_the_prompt_and_answer(tmp_path, tiny_host):
    # The fake backend keys on the whole prompt: the paraphrase does not reach the edit, so its answer misses.
    daemon, _ = make_daemon(tmp_path, tiny_host, [("France", "capital", "Berlin")], min_served_gen=1.0)
    daemon.load()
    summary = daemon.cycle()
    assert summary.reverted and not summary.committed, summary
    revert = daemon.ledger.reverts()[0]
    assert "answers wrong" in revert.reason and "'France has the capital' ->" in revert.reason, revert.reason
    answers = revert.probes_before["answers"]
    assert {a["prompt"] for a in answers} == {"the capital of France is", "France has the capital"}
    assert revert.probes_before["rel"] == 1.0, "teacher-forced figures stay in the report"
    assert daemon.maintainer.serving.edit_ids == [] and daemon.maintainer.editor.edit_ids == []
    daemon.close()
