"""What `kmd bench-serve` measures with: OpenAI clients against the daemon, and the plain
transformers `generate` of the unedited model as the reference.

The OpenAI clients run in a process of their own (`in_own_process`), as real clients do:
in the server's process their threads would compete with it for the interpreter lock.
Every figure is over requests: tokens/s (completion tokens over the phase's wall time),
time to first token (from sending the request to the first text chunk of a streamed
answer) and per-token latency (a streamed answer's time from its first to its last chunk
over its tokens after the first), p50 and p95.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Answer:
    prompt: str
    ok: bool
    seconds: float
    tokens: int = 0
    ttft: float | None = None  # streamed answers only
    per_token: float | None = None
    text: str = ""
    fingerprint: str | None = None
    error: str | None = None
    status: int | None = None


@dataclass
class Phase:
    name: str
    path: str  # what answered: the daemon's OpenAI endpoint, transformers' generate, the engine in process
    clients: int
    answers: list[Answer] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(not a.ok for a in self.answers)

    @property
    def tokens_per_s(self) -> float:
        return sum(a.tokens for a in self.answers if a.ok) / self.seconds if self.seconds else 0.0

    def pct(self, key: str, q: float) -> float | None:
        values = sorted(v for a in self.answers if a.ok and (v := getattr(a, key)) is not None)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    def summary(self) -> dict[str, Any]:
        ok = [a for a in self.answers if a.ok]
        return {"path": self.path, "clients": self.clients, "requests": len(self.answers), "failed": self.failed,
                "seconds": self.seconds, "tokens": sum(a.tokens for a in ok), "tokens_per_s": self.tokens_per_s,
                "requests_per_s": len(ok) / self.seconds if self.seconds else 0.0,
                "ttft_p50_s": self.pct("ttft", 0.5), "ttft_p95_s": self.pct("ttft", 0.95),
                "per_token_p50_s": self.pct("per_token", 0.5), "per_token_p95_s": self.pct("per_token", 0.95),
                "latency_p50_s": self.pct("seconds", 0.5), "latency_p95_s": self.pct("seconds", 0.95)}  # fmt: skip


def run_clients(phase: Phase, requests: int, prompts: Sequence[str], ask: Callable[[Any, str], Answer],
                make_client: Callable[[], Any]) -> Phase:  # fmt: skip
    """`phase.clients` threads, each with its own client, ask `requests` prompts in all (round robin)."""
    lock, counter = threading.Lock(), iter(range(requests))

    def worker() -> None:
        client = make_client()
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            answer = ask(client, prompts[n % len(prompts)])
            with lock:
                phase.answers.append(answer)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, name=f"bench-client-{i}") for i in range(phase.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    phase.seconds = time.perf_counter() - started
    return phase


@dataclass(frozen=True)
class Endpoint:
    """Where and how the clients ask (picklable: it crosses to the clients' process)."""

    base_url: str
    api_key: str
    model: str
    chat: bool  # chat completions (else plain completions)
    max_tokens: int
    max_retries: int = 0  # the official client's own retries (they honour Retry-After)

    def client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=self.max_retries, timeout=600)


def openai_phase(endpoint: Endpoint, name: str, clients: int, requests: int, prompts: Sequence[str], stream: bool) -> Phase:
    """`clients` OpenAI clients ask `requests` prompts in all."""
    ask = openai_asker(endpoint.model, endpoint.max_tokens, chat=endpoint.chat, stream=stream)
    path = f"kmd OpenAI{' stream' if stream else ''}"
    return run_clients(Phase(name, path, clients), requests, prompts, ask, endpoint.client)


def flood(endpoint: Endpoint, clients: int, seconds: float, prompts: Sequence[str]) -> dict[str, int]:
    """`clients` clients ask (not streamed) without pause for `seconds`; how they were answered."""
    ask = openai_asker(endpoint.model, endpoint.max_tokens, chat=endpoint.chat, stream=False)
    stop, answers, lock = threading.Event(), [], threading.Lock()

    def worker(k: int) -> None:
        client = endpoint.client()
        n = k
        while not stop.is_set():
            answer = ask(client, prompts[n % len(prompts)])
            n += clients
            with lock:
                answers.append(answer)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=600)
    return {"answered": sum(a.ok for a in answers), "refused_429": sum(a.status == 429 for a in answers),
            "other_errors": sum(not a.ok and a.status != 429 for a in answers)}  # fmt: skip


def in_own_process(fn: Callable[..., Any], *args: Any) -> Any:
    """Start `fn(*args)` in a fresh process (its clients then never take this process's
    interpreter lock); returns a handle whose `.get()` is the result."""
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(1)
    return _Started(pool, pool.apply_async(fn, args))


class _Started:
    def __init__(self, pool: Any, result: Any) -> None:
        self.pool, self.result = pool, result

    def get(self, timeout: float | None = None) -> Any:
        try:
            return self.result.get(timeout)
        finally:
            self.pool.close()
            self.pool.join()


def openai_asker(model: str, max_tokens: int, *, chat: bool, stream: bool) -> Callable[[Any, str], Answer]:
    """One request through the official client: a chat turn (or a plain completion), streamed or not."""
    import openai

    def ask(client: openai.OpenAI, prompt: str) -> Answer:
        started = time.perf_counter()
        first = last = None
        parts: list[str] = []
        tokens, fingerprint = 0, None
        args: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0}
        try:
            if chat:
                reply = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], stream=stream,
                                                       **({"stream_options": {"include_usage": True}} if stream else {}), **args)  # fmt: skip
            else:
                reply = client.completions.create(prompt=prompt, stream=stream,
                                                  **({"stream_options": {"include_usage": True}} if stream else {}), **args)  # fmt: skip
            if not stream:
                choice = reply.choices[0]
                text = choice.message.content if chat else choice.text
                return Answer(prompt, True, time.perf_counter() - started, reply.usage.completion_tokens, text=text or "",
                              fingerprint=reply.system_fingerprint)  # fmt: skip
            for chunk in reply:
                fingerprint = chunk.system_fingerprint or fingerprint
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                if chunk.choices:
                    delta = chunk.choices[0].delta.content if chat else chunk.choices[0].text
                    if delta:
                        last = time.perf_counter()
                        first = first or last
                        parts.append(delta)
        except openai.APIError as exc:
            return Answer(prompt, False, time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}"[:200],
                          status=getattr(exc, "status_code", None))  # fmt: skip
        seconds = time.perf_counter() - started
        per_token = (last - first) / (tokens - 1) if first is not None and last is not None and tokens > 1 else None
        return Answer(prompt, True, seconds, tokens, first - started if first else None, per_token, "".join(parts),
                      fingerprint)  # fmt: skip

    return ask


class _Clock:
    """A transformers streamer that notes when each step's tokens come out (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def reference_phase(name: str, host: Any, prompts: Sequence[str], requests: int, batch: int, max_tokens: int,
                    *, chat: bool, ignore_eos: bool = False) -> Phase:  # fmt: skip
    """The unedited model through plain transformers `generate` (greedy, KV cache): `requests`
    prompts in left-padded batches of `batch` (1: one at a time, as a serial client).
    `ignore_eos`: every row writes `max_tokens` (`min_new_tokens`), for equal work."""
    import torch

    from kmd.editors.batching import left_padded_ids
    from kmd.editors.protocol import base_model

    encode = (lambda p: host.chat.encode([{"role": "user", "content": p}])) if chat else host.encode
    phase = Phase(name, "transformers generate", batch)
    eos = host.tokenizer.eos_token_id
    started = time.perf_counter()
    for start in range(0, requests, batch):
        chunk = [prompts[n % len(prompts)] for n in range(start, min(start + batch, requests))]
        ids, attention = left_padded_ids(host, [encode(p) for p in chunk])
        clock = _Clock()
        t0 = time.perf_counter()
        with torch.no_grad(), base_model():  # no editor acts (none has edits yet: no hook is even installed)
            out = host.model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_tokens, do_sample=False,
                                      use_cache=True, pad_token_id=host.tokenizer.pad_token_id, streamer=clock,
                                      min_new_tokens=max_tokens if ignore_eos else None,
                                      temperature=None, top_p=None, top_k=None)  # fmt: skip
        steps = clock.times[1:]  # (one per new token of the batch)
        for row, prompt in enumerate(chunk):
            new = out[row, ids.shape[1] :].tolist()
            tokens = new.index(eos) + 1 if eos in new and not ignore_eos else len(new)
            end = steps[tokens - 1] if tokens else t0
            per_token = (end - steps[0]) / (tokens - 1) if tokens > 1 else None
            phase.answers.append(Answer(prompt, True, end - t0, tokens, steps[0] - t0 if steps else None, per_token))
    phase.seconds = time.perf_counter() - started
    return phase


def engine_phase(name: str, engine: Any, prompts: Sequence[str], requests: int, clients: int, max_tokens: int,
                 *, chat: bool, ignore_eos: bool = False) -> Phase:  # fmt: skip
    """The serving engine in process (no HTTP), as it serves: `clients` callers each submit
    their next request when their last one ends (rows join and leave the running batch).
    `ignore_eos`: every request writes `max_tokens`, for equal work."""
    from kmd.daemon.serving import GenerationRequest

    host = engine.host
    encode = (lambda p: host.chat.encode([{"role": "user", "content": p}])) if chat else host.encode

    def ask(_: Any, prompt: str) -> Answer:
        started = time.perf_counter()
        first = last = None
        stream = engine.submit(GenerationRequest(encode(prompt), max_tokens, ignore_eos=ignore_eos))
        for _token in stream:
            last = time.perf_counter()
            first = first or last
        tokens = len(stream.tokens)
        per_token = (last - first) / (tokens - 1) if first is not None and last is not None and tokens > 1 else None
        return Answer(prompt, True, time.perf_counter() - started, tokens, first - started if first else None, per_token,
                      host.tokenizer.decode(stream.tokens, skip_special_tokens=True))  # fmt: skip

    return run_clients(Phase(name, "kmd engine (in process)", clients), requests, prompts, ask, lambda: None)
