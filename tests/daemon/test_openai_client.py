"""The official `openai` client against a daemon process on loopback: the edited model
answers through /v1/chat/completions and /v1/completions, streamed and not; errors reach
the client as the exceptions it raises for OpenAI's own errors."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from intake.helpers import LoopbackServer, Route, atom

from .ecosystem import ENTRIES, JOINED, TOKEN, daemon_process, free_port, write_eco_setup

PROMPT = "the capital of France is"


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory) -> Path:
    """The tiny model, its tokenizer given a chat template (the turns joined by spaces)."""
    from tiny import build_tokenizer, save_tiny_model

    directory = save_tiny_model(tmp_path_factory.mktemp("tiny-chat"))
    tokenizer = build_tokenizer()
    tokenizer.chat_template = JOINED
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def daemon_url(tmp_path_factory, chat_model_dir):
    tmp = tmp_path_factory.mktemp("openai-daemon")
    server = LoopbackServer()
    server.routes["/feed.atom"] = Route(body=atom(ENTRIES[:1]))  # France capital Berlin
    server.thread.start()
    config = write_eco_setup(tmp, server.url("/feed.atom"), port=free_port(), poll="1s", model_dir=chat_model_dir,
                             protect_reads=True)  # fmt: skip
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def ready(url: str) -> bool:
        edits = httpx.get(f"{url}/v1/edits", params={"status": "committed"}, headers=auth, timeout=5).json()
        return bool(edits) and httpx.get(f"{url}/readyz", timeout=5).status_code == 200

    try:
        with daemon_process(tmp, config, ready) as url:
            yield url
    finally:
        server.httpd.shutdown()


@pytest.fixture(scope="module")
def client(daemon_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon_url}/v1", api_key=TOKEN, max_retries=0, timeout=60)


def test_the_official_client_lists_the_model_and_its_edit_state(client, chat_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [str(chat_model_dir)]
    state = models[0].model_extra["kmd"]
    assert state["edits"] == 1 and state["role"] == "writer" and len(state["state_version"]) == 64


def test_chat_and_completions_answer_through_the_edited_model(client, chat_model_dir):
    model = str(chat_model_dir)
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
                                          temperature=0)  # fmt: skip
    answer = chat.choices[0].message.content
    assert answer.strip().startswith("Berlin") and chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 4 and chat.usage.prompt_tokens > 0
    assert chat.system_fingerprint.startswith("kmd-")

    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
                                            temperature=0, stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == chat.usage.total_tokens

    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0)
    assert completion.choices[0].text == answer  # the template joins turns: the same prompt
    stop = answer.split()[1]
    cut = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, stop=stop, stream=True)
    pieces = list(cut)
    assert "".join(p.choices[0].text for p in pieces) == answer[: answer.index(stop)]
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_errors_reach_the_client_as_openai_exceptions(client, daemon_url, chat_model_dir):
    model = str(chat_model_dir)
    stranger = openai.OpenAI(base_url=f"{daemon_url}/v1", api_key="not-the-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):  # protect_reads is on in this daemon
        stranger.models.list()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=10_000)
    assert bad.value.param == "max_tokens" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="x")
    assert missing.value.code == "model_not_found"
