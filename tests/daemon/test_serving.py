"""Serving while the writer edits: committed snapshots, batched answers, back-pressure,
and probes of what users read (tiny random model, in process)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager, nullcontext

from fastapi.testclient import TestClient

from kmd.daemon.api import create_app
from kmd.daemon.serving import BatchingEngine, QueueFull
from kmd.editors.scoring import generate_text

from .test_maintainer import make_daemon

PROMPT = "the capital of France is"


def test_generate_during_an_edit_sees_the_old_state_then_the_commit_then_the_revert(tmp_path, tiny_host):
    daemon, _ = make_daemon(tmp_path, tiny_host, [("France", "capital", "Berlin")])
    daemon.load()
    m = daemon.maintainer
    base = daemon.generate(PROMPT, 4)
    probing, release = threading.Event(), threading.Event()
    check = m.prober.check

    def held_check(*args, **kwargs):  # the writer stops after probing its candidate
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
        assert daemon.generate_result(PROMPT, 4)[1].edits == 0
        during = daemon.generate(PROMPT, 4)
    finally:
        release.set()
        writer.join(300)
    edited = daemon.generate(PROMPT, 4)
    assert m.serving.edit_ids == m.editor.edit_ids and len(m.editor.edit_ids) == 1
    assert edited == generate_text(tiny_host, m.editor, [PROMPT], 4)[0] != base
    assert during == base, "a request during the edit saw the candidate"
    m.revert(int(m.editor.edit_ids[0]), reason="test", actor="test")
    assert daemon.generate(PROMPT, 4) == base, "the reverted edit is gone for new requests"
    daemon.close()


def test_concurrent_requests_share_one_batched_forward(tiny_host):
    prompts = ["the capital of France is", "who wrote the book ?", "the dog and the cat", "Alice plays music",
               "the river of Japan", "Bob speaks the language of"]  # fmt: skip
    alone = [generate_text(tiny_host, None, [p], 6)[0] for p in prompts]
    engine = BatchingEngine(tiny_host, lambda: nullcontext(None), max_batch=8, window_s=0.5)
    got: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, engine.generate_text(prompts[i], 6)))
               for i in range(len(prompts))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    engine.close()
    assert engine.stats.largest_batch > 1 and engine.stats.batches < len(prompts)
    assert [got[i] for i in range(len(prompts))] == alone, "batching changed an answer"


def test_a_full_queue_gets_429_with_retry_after(tmp_path, tiny_host):
    daemon, _ = make_daemon(tmp_path, tiny_host, [])
    daemon.load()
    taken, gate = threading.Event(), threading.Event()

    @contextmanager
    def held():  # the worker holds its batch until the gate opens
        taken.set()
        assert gate.wait(120)
        yield daemon.maintainer.serving

    daemon._engine = BatchingEngine(tiny_host, held, max_batch=1, max_queue=1, window_s=0)
    engine = daemon._engine
    results: list[object] = []
    waiting = [threading.Thread(target=lambda: results.append(engine.submit([2, 5, 6], 2))) for _ in range(2)]
    waiting[0].start()
    assert taken.wait(60)  # request 1 is in the worker
    waiting[1].start()
    deadline = time.monotonic() + 60
    while engine._queue.qsize() < 1 and time.monotonic() < deadline:  # request 2 waits in the queue
        time.sleep(0.01)
    client = TestClient(create_app(daemon))
    response = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2})
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    gate.set()
    for t in waiting:
        t.join(120)
    assert len(results) == 2 and engine.stats.rejected == 1
    ok = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2})
    assert ok.status_code == 200 and ok.json()["edits"] == 0
    try:
        engine.submit([2, 5], 1)
    except QueueFull:  # pragma: no cover - the queue is empty again
        raise AssertionError("the queue did not drain") from None
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
