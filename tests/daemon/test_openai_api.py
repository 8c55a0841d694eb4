"""The OpenAI-compatible endpoints in process (FastAPI's TestClient) on the tiny model:
what the edited model answers, stop strings, streaming, sampling, errors in OpenAI's shape.
The official `openai` client against a daemon process: test_openai_client.py."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from fastapi.testclient import TestClient

from kmd.daemon.api import create_app
from kmd.daemon.openai_api import StopText
from kmd.editors.scoring import generate_ids, generate_text
from tiny import chat_template

from .ecosystem import JOINED, TOKEN

EDITED = "the capital of France is"  # the committed edit's prompt: answers "Berlin"
UNRELATED = "the dog and the cat"
LONG = "who wrote the book ?"  # the tiny model's greedy answer runs 200 tokens without an end of sequence


@pytest.fixture(scope="module")
def client(eco):
    return TestClient(create_app(eco))


def complete(client, prompt: str, **kw) -> dict:
    body = {"model": "embedded", "prompt": prompt, "max_tokens": 6, "temperature": 0} | kw
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def events(client, path: str, body: dict) -> list:
    """The server-sent events of a streamed response, parsed; '[DONE]' kept as a string."""
    out = []
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_models_name_the_base_model_and_the_edit_state(client, eco):
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list" and len(listing["data"]) == 1
    card = listing["data"][0]
    assert card["id"] == eco.maintainer.host.identity.name and card["object"] == "model"
    manifest = eco.maintainer.editor_dir / "manifest.json"
    assert card["kmd"]["state_version"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert card["kmd"]["edits"] == 1 and card["kmd"]["backend"] == "fake" and card["kmd"]["role"] == "writer"
    assert client.get(f"/v1/models/{card['id']}").json()["id"] == card["id"]
    missing = client.get("/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_greedy_completion_is_the_edited_model_routed_per_prompt(client, eco):
    m = eco.maintainer
    edited = complete(client, EDITED)
    assert edited["object"] == "text_completion" and edited["choices"][0]["text"].strip().startswith("Berlin")
    assert edited["choices"][0]["text"] == eco.generate(EDITED, 6)  # the same path as /v1/generate
    assert edited["system_fingerprint"] == "kmd-" + hashlib.sha256((m.editor_dir / "manifest.json").read_bytes()).hexdigest()[:12]
    usage = edited["usage"]
    assert usage["prompt_tokens"] == len(m.host.encode(EDITED)) and usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6 and edited["choices"][0]["finish_reason"] == "length"
    # the edit fires on its own prompt only: an unrelated prompt gets the base model's answer
    with m.editor.suspended():
        base_edited, base_unrelated = generate_text(m.host, None, [EDITED, UNRELATED], 6)
    assert not base_edited.strip().startswith("Berlin")
    assert complete(client, UNRELATED)["choices"][0]["text"] == base_unrelated


def test_stop_strings_cut_the_text_and_end_the_generation(client):
    full = complete(client, EDITED, max_tokens=8)["choices"][0]["text"]
    words = full.split()
    stop = words[2]
    cut = complete(client, EDITED, max_tokens=8, stop=[stop, "never-produced"])
    choice = cut["choices"][0]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < 8


def test_streaming_sends_the_same_text_in_chunks_then_usage_and_done(client):
    full = complete(client, EDITED, max_tokens=8)["choices"][0]["text"]
    got = events(client, "/v1/completions", {"model": "embedded", "prompt": EDITED, "max_tokens": 8, "temperature": 0,
                                             "stream": True, "stream_options": {"include_usage": True}})  # fmt: skip
    assert got[-1] == "[DONE]"
    chunks, usage = got[:-2], got[-2]
    assert len(chunks) > 2 and all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8


def test_a_streamed_stop_string_never_shows_even_split_across_tokens(client):
    full = complete(client, EDITED, max_tokens=8)["choices"][0]["text"]
    words = full.split()
    stop = f"{words[1]} {words[2][:2]}"  # starts in one token, ends inside the next
    got = events(client, "/v1/completions", {"model": "embedded", "prompt": EDITED, "max_tokens": 8, "temperature": 0,
                                             "stop": stop, "stream": True})  # fmt: skip
    texts = [c["choices"][0]["text"] for c in got[:-1]]
    assert "".join(texts) == full[: full.index(stop)]
    assert not any(words[1] in t for t in texts)  # held back until the stop was certain, then dropped
    assert got[-2]["choices"][0]["finish_reason"] == "stop"


def test_chat_goes_through_the_chat_template(client, eco):
    host = eco.maintainer.host
    body = {"model": "embedded", "messages": [{"role": "user", "content": EDITED}], "max_tokens": 5, "temperature": 0}
    refused = client.post("/v1/chat/completions", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "no_chat_template"
    with chat_template(host, JOINED):
        reply = client.post("/v1/chat/completions", json=body).json()
        assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["choices"][0]["message"]["content"] == complete(client, EDITED, max_tokens=5)["choices"][0]["text"]
        assert reply["choices"][0]["message"]["content"].strip().startswith("Berlin")
        # a system turn goes through the template too (and changes the prompt)
        with_system = body | {"messages": [{"role": "system", "content": "the sun"}, *body["messages"]]}
        assert client.post("/v1/chat/completions", json=with_system).json()["usage"]["prompt_tokens"] == \
            reply["usage"]["prompt_tokens"] + 2
        got = events(client, "/v1/chat/completions", body | {"stream": True})
        assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in got[:-1]) == reply["choices"][0]["message"]["content"]
        assert got[-2]["choices"][0]["finish_reason"] == "length" and got[-1] == "[DONE]"


def test_sampling_follows_temperature_and_seed(client):
    def sample(seed: int) -> str:
        return complete(client, UNRELATED, max_tokens=12, temperature=1.5, seed=seed)["choices"][0]["text"]

    assert sample(1) == sample(1)  # a seed makes sampling repeatable
    assert len({sample(s) for s in range(2, 7)}) > 1  # and different seeds differ
    assert complete(client, UNRELATED)["choices"][0]["text"] == complete(client, UNRELATED)["choices"][0]["text"]


@pytest.mark.parametrize(
    ("body", "status", "param", "says"),
    [
        ({"max_tokens": 257}, 400, "max_tokens", "less than or equal to 256"),
        ({"n": 2}, 400, "n", "only n=1"),
        ({"frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
        ({"tools": []}, 400, "tools", "unsupported parameter: tools"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
        ({"temperature": 3}, 400, "temperature", "less than or equal to 2"),
        ({"model": "gpt-4"}, 404, "model", "not served here"),
        ({"prompt": "the " * 300}, 400, "prompt", "context of 256 tokens"),
        ({"prompt": ["a", "b"]}, 400, "prompt", "exactly one prompt"),
        ({"echo": True}, 400, None, "echo is not supported"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(client, body, status, param, says):
    response = client.post("/v1/completions", json={"model": "embedded", "prompt": "the sun"} | body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and says in error["message"]
    assert error["param"] == param and error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_body_limits_and_malformed_bodies(client):
    huge = client.post("/v1/chat/completions", content=b"{" + b" " * (1 << 20) + b"}", headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    broken = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    empty = client.post("/v1/chat/completions", json={"model": "embedded", "messages": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages"
    tool = client.post("/v1/chat/completions", json={"model": "embedded", "messages": [{"role": "tool", "content": "x"}]})
    assert tool.status_code == 400 and tool.json()["error"]["param"] == "messages"


def test_protected_reads_need_the_token_in_openai_shape(client, eco):
    saved = eco.settings
    eco.settings = saved.model_copy(update={"api": saved.api.model_copy(update={"protect_reads": True})})
    try:
        denied = client.get("/v1/models")
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        assert denied.headers["www-authenticate"] == "Bearer"
        body = {"model": "embedded", "prompt": EDITED, "max_tokens": 2}
        assert client.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
    finally:
        eco.settings = saved


def test_stop_text_holds_back_what_may_start_a_stop(eco):
    tok = eco.maintainer.host.tokenizer
    ids = tok("Berlin capital speaks two", add_special_tokens=False).input_ids
    text = StopText(tok, ["speaks two"])
    assert text.push(ids[0]) == "Berlin" and text.push(ids[1]) == " capital"
    assert text.push(ids[2]) == " " and not text.stopped  # "speaks" may start the stop: held back
    assert text.push(ids[3]) == "" and text.stopped  # it did: dropped, and nothing follows
    assert text.finish() == ""
    plain = StopText(tok, [])
    assert "".join(plain.push(i) for i in ids) + plain.finish() == tok.decode(ids)


def test_a_client_that_goes_away_stops_its_generation(client, eco):
    """A streamed request whose client disconnects after the first chunk leaves the running
    batch at the next step: the engine does not write the 200 tokens asked for."""
    engine, host = eco.engine(), eco.maintainer.host
    assert len(generate_ids(host, eco.maintainer.serving, [host.encode(LONG)], 200)[0]) == 200, "pick a long answer"
    before = engine.stats.tokens
    body = {"model": "embedded", "prompt": LONG, "max_tokens": 200, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status_code == 200
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert json.loads(first[len("data: "):])["object"] == "text_completion"
    deadline = time.monotonic() + 30
    while engine.rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.rows == 0, "the row kept decoding after its client left"
    assert engine.stats.tokens - before < 100  # a few steps: far from the 200 asked for


def test_a_consumer_that_stops_reading_cancels_its_row(eco):
    from kmd.daemon.serving import GenerationRequest

    engine = eco.engine()
    stream = engine.submit(GenerationRequest(eco.maintainer.host.encode(LONG), 200))
    tokens = iter(stream)
    assert isinstance(next(tokens), int)
    tokens.close()  # what a consumer that stops early does
    assert stream.cancelled
    stream.result(30)
    assert stream.finish_reason == "cancelled" and len(stream.tokens) < 100


def test_before_the_model_loads_models_answer_and_generation_is_503(tmp_path, monkeypatch):
    from kmd.daemon.service import Daemon
    from kmd.daemon.settings import load_settings

    from .ecosystem import write_eco_setup

    monkeypatch.setenv("KMD_TEST_TOKEN", TOKEN)
    starting = Daemon(load_settings(write_eco_setup(tmp_path, "http://127.0.0.1:9/feed.atom")))
    try:
        client = TestClient(create_app(starting))
        card = client.get("/v1/models").json()["data"][0]
        assert card["id"] == "SmolLM2-135M-Instruct" and card["kmd"]["edits"] is None and card["kmd"]["ready"] is False
        for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            response = client.post(path, json={"model": "embedded"} | body)
            assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable_error"
        overview = client.get("/ui")  # the console reads the ledger meanwhile
        assert overview.status_code == 200 and "starting: loading the model" in overview.text
    finally:
        starting.close()
