"""Batched greedy generation for the HTTP API: concurrent requests share one forward.

    engine = BatchingEngine(host, snapshot)       # snapshot(): context yielding the editor to serve
    tokens = engine.submit(input_ids, 16)         # blocks until answered; QueueFull when saturated
    text = engine.generate_text("The capital of France is", 16)

One worker thread takes the first waiting request, waits up to `window_s` for more (at
most `max_batch` in all), and answers them in one left-padded batch through
`scoring.generate_ids` (greedy, KV cache; each row is routed on its own prompt tokens, so
batching changes no decision). The editor is taken once per batch from `snapshot()`: on
the writer that is the committed edits' snapshot (`Maintainer.serving`), so a batch never
waits for an edit and never sees a candidate. At most `max_queue` requests wait; one more
is refused at once with `QueueFull` (the API answers 429 with Retry-After).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loguru import logger

from kmd.editors.scoring import generate_ids

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import Editor


class QueueFull(RuntimeError):
    """Too many requests are waiting; try again after `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"{waiting} generation requests are waiting; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Generated:
    tokens: list[int]  # the new token ids (EOS included when produced)
    edits: int  # committed edits in the state that answered
    batch: int  # how many requests shared the forward


@dataclass
class _Job:
    input_ids: list[int]
    max_new_tokens: int
    future: Future = field(default_factory=Future)


@dataclass
class EngineStats:
    requests: int = 0
    batches: int = 0
    rejected: int = 0
    largest_batch: int = 0
    last_batch_seconds: float = 0.0


class BatchingEngine:
    def __init__(
        self,
        host: ModelHost,
        snapshot: Callable[[], AbstractContextManager[Editor | None]],
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        window_s: float = 0.005,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1, window_s >= 0")
        self.host, self.snapshot = host, snapshot
        self.max_batch, self.window_s = max_batch, window_s
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=max_queue)
        self.stats = EngineStats()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="kmd-generate", daemon=True)
        self._worker.start()

    # ----- callers ----------------------------------------------------------------------------
    def submit(self, input_ids: Sequence[int], max_new_tokens: int, timeout: float | None = None) -> Generated:
        """Greedy continuation of `input_ids` (blocks); raises QueueFull when saturated."""
        if self._stop.is_set():
            raise RuntimeError("the generation engine is stopped")
        job = _Job(list(input_ids), int(max_new_tokens))
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.stats.rejected += 1
            waiting = self._queue.qsize()
            batches = waiting / self.max_batch + 1
            raise QueueFull(waiting, max(1, math.ceil(batches * max(self.stats.last_batch_seconds, 0.1)))) from None
        return job.future.result(timeout)

    def generate_text(self, prompt: str, max_new_tokens: int) -> str:
        """`prompt` formatted as the host serves it; the continuation's text."""
        return self.generate(prompt, max_new_tokens)[0]

    def generate(self, prompt: str, max_new_tokens: int) -> tuple[str, Generated]:
        host = self.host
        got = self.submit(host.encode(host.format_prompt(prompt)), max_new_tokens)
        return host.tokenizer.decode(got.tokens, skip_special_tokens=True), got

    def close(self) -> None:
        self._stop.set()
        self._worker.join(timeout=30)
        while True:  # nothing will answer what is still queued
            try:
                self._queue.get_nowait().future.set_exception(RuntimeError("the generation engine stopped"))
            except queue.Empty:
                break

    # ----- the worker ---------------------------------------------------------------------------
    def _take(self) -> list[_Job]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        jobs, deadline = [first], time.monotonic() + self.window_s
        while len(jobs) < self.max_batch:
            try:
                remaining = deadline - time.monotonic()
                jobs.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs = self._take()
            if not jobs:
                continue
            started = time.perf_counter()
            try:
                with self.snapshot() as editor:
                    edits = len(editor.edit_ids) if editor is not None else 0
                    tokens = generate_ids(self.host, editor, [j.input_ids for j in jobs],
                                          [j.max_new_tokens for j in jobs], batch_size=len(jobs))  # fmt: skip
            except BaseException as exc:  # every waiting caller gets the error, the engine goes on
                logger.exception("batched generation of {} requests failed", len(jobs))
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            stats = self.stats
            stats.batches += 1
            stats.requests += len(jobs)
            stats.largest_batch = max(stats.largest_batch, len(jobs))
            stats.last_batch_seconds = time.perf_counter() - started
            for job, row in zip(jobs, tokens, strict=True):
                job.future.set_result(Generated(row, edits, len(jobs)))
