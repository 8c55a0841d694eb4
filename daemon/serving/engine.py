"""The serving engine: every generated token of the API, the OpenAI-compatible endpoints and
the console comes from here.

    engine = ServingEngine(host, served_state, Scheduler(budgets))
    stream = engine.submit(GenerationRequest(prompt_ids, max_tokens=16, caller="anonymous"))

One thread runs the model. At every step it (1) asks the scheduler which waiting requests
start, reads the served state once for them (the committed edits' snapshot: a candidate
edit is never visible, and nothing here waits for the writer) and runs their prefill
together; (2) for each snapshot picks every row's next token with the row's own sampler,
from the running rows' last decode step and the new rows' prefill, and streams it; (3)
regroups the rows that go on, old and new, into one batch (finished rows leave) and runs
one decode step for it. A request joins at the step after it is admitted and never waits
for a batch to drain. Rows on different snapshots (a commit happened while older rows
still ran: they finish on the state they started with) or on the base model (the console's
"before" answers: no edit acts on them) are separate batches, one forward each per step.
The model runner is `kmd.editors.decoding.DecodeBatch`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from loguru import logger

from kmd.daemon.serving.sampling import RowSampler, choose
from kmd.daemon.serving.scheduler import Scheduler
from kmd.daemon.serving.stream import GenerationRequest, TokenStream

if TYPE_CHECKING:
    from kmd.daemon.serving.state import ServedState
    from kmd.editors.decoding import DecodeBatch
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import Editor


@dataclass
class EngineStats:
    requests: int = 0  # started
    steps: int = 0  # decode steps (one forward of one running batch)
    prefills: int = 0
    joined: int = 0  # requests that joined a batch already decoding
    largest_batch: int = 0
    tokens: int = 0


@dataclass
class _Running:
    """One running batch: rows on one snapshot (or the base model), and their streams."""

    batch: DecodeBatch
    streams: list[TokenStream]
    samplers: list[RowSampler] = field(default_factory=list)


class ServingEngine:
    def __init__(self, host: ModelHost, served: Callable[[], ServedState], scheduler: Scheduler) -> None:
        self.host, self.served, self.scheduler = host, served, scheduler
        self.stats = EngineStats()
        self._eos = _eos_ids(host)
        self._running: dict[int, tuple[Editor | None, _Running]] = {}  # by id of the editor (0: the base model)
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kmd-serving", daemon=True)
        self._thread.start()

    # ----- callers ----------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> TokenStream:
        """Queue a request; its stream fills as it decodes. Raises `Refused` when the
        caller's budget is spent (nothing is queued then)."""
        if self._stop.is_set():
            raise RuntimeError("the serving engine is stopped")
        stream = TokenStream(request)
        self.scheduler.submit(stream)
        self._wake.set()
        return stream

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=60)
        stopped = RuntimeError("the serving engine stopped")
        self._fail_all(stopped)
        while waiting := self.scheduler.admit():  # nothing will answer what is still queued
            for stream in waiting:
                self._leave(stream, error=stopped)

    @property
    def rows(self) -> int:
        """Rows decoding now, all batches together."""
        return sum(len(r.streams) for _, r in tuple(self._running.values()))  # a copy: the model thread changes it

    # ----- the model thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self._step()
            except BaseException as exc:  # a bug: every running request gets the error, the engine goes on
                logger.exception("the serving engine's step failed")
                self._fail_all(exc)
                busy = False
            if not busy:
                self._wake.wait(0.5)
                self._wake.clear()

    def _step(self) -> bool:
        started = self.scheduler.admit()
        joining = self._prefill(started) if started else {}
        for key in [*self._running, *(k for k in joining if k not in self._running)]:
            self._advance(key, joining.get(key))
        return bool(started or self._running)

    def _prefill(self, streams: list[TokenStream]) -> dict[int, tuple[Editor | None, _Running]]:
        """The prompts of the requests that start now, one forward per snapshot (the base
        model counts as one); by snapshot, the batches that join its running rows."""
        from kmd.editors.decoding import DecodeBatch

        try:
            served = self.served()  # one read for all of them: the committed snapshot now
        except Exception as exc:
            for stream in streams:
                self._leave(stream, error=exc)
            return {}
        cohorts: dict[int, list[TokenStream]] = {}
        for stream in streams:
            cohorts.setdefault(0 if stream.request.base else id(served.editor), []).append(stream)
        joining = {}
        for key, cohort in cohorts.items():
            editor = None if key == 0 else served.editor
            try:
                batch = DecodeBatch.prefill(self.host, editor, [s.request.prompt_ids for s in cohort])
            except Exception as exc:
                logger.exception("prefill of {} requests failed", len(cohort))
                for stream in cohort:
                    self._leave(stream, error=exc)
                continue
            samplers = [RowSampler(s.request.sampling, self.host.device) for s in cohort]
            joining[key] = (editor, _Running(batch, cohort, samplers))
            joined = key in self._running
            for stream in cohort:
                stream._start(served, joined=joined)
            self.stats.prefills += 1
            self.stats.requests += len(cohort)
            self.stats.joined += len(cohort) if joined else 0
        return joining

    def _advance(self, key: int, joining: tuple[Editor | None, _Running] | None) -> None:
        """Every row's next token from its last forward (the running rows' decode step, the
        joining rows' prefill); finished rows leave, the others decode one step together."""
        from kmd.editors.decoding import DecodeBatch

        running = self._running.pop(key, None)
        editor = (running or joining)[0]
        parts = [entry[1] for entry in (running, joining) if entry is not None]  # the running rows first
        try:
            chosen = [(r, *self._emit(r)) for r in parts]  # (part, its tokens (B,), the rows that stay)
            batch = DecodeBatch.regroup([(r.batch, staying) for r, _, staying in chosen])
            if batch is None:
                return
            streams = [r.streams[i] for r, _, staying in chosen for i in staying]
            samplers = [r.samplers[i] for r, _, staying in chosen for i in staying]
            tokens = torch.cat([t[staying] for _, t, staying in chosen])
            self.stats.largest_batch = max(self.stats.largest_batch, len(streams))
            batch.step(tokens)
            self.stats.steps += 1
            self._running[key] = (editor, _Running(batch, streams, samplers))
        except Exception as exc:
            logger.exception("decoding a batch of {} requests failed", sum(len(r.streams) for r in parts))
            for r in parts:
                for stream in r.streams:
                    if not stream.done:
                        self._leave(stream, error=exc)

    def _emit(self, running: _Running) -> tuple[torch.Tensor, list[int]]:
        """Each row's next token by its own sampler, streamed; (the tokens (B,), the rows that go on)."""
        tokens = choose(running.batch.logits, running.samplers)  # (B,)
        staying = []
        for row, (stream, token) in enumerate(zip(running.streams, tokens.tolist(), strict=True)):
            if stream.cancelled:
                self._leave(stream, reason="cancelled")
                continue
            stream._push(token)
            self.stats.tokens += 1
            if token in self._eos and not stream.request.ignore_eos:
                self._leave(stream, reason="stop")
            elif len(stream.tokens) >= stream.max_tokens:
                self._leave(stream, reason="length")
            else:
                staying.append(row)
        return tokens, staying

    def _leave(self, stream: TokenStream, *, reason: str | None = None, error: BaseException | None = None) -> None:
        if error is not None:
            stream._fail(error)
        else:
            stream._end(reason or "stop")
        seconds = time.perf_counter() - stream.started_at if stream.started_at is not None else None
        self.scheduler.finished(stream, seconds if error is None else None)

    def _fail_all(self, error: BaseException) -> None:
        running, self._running = list(self._running.values()), {}
        for _, r in running:
            for stream in r.streams:
                if not stream.done:
                    self._leave(stream, error=error)


def _eos_ids(host: ModelHost) -> frozenset[int]:
    """The tokens that end a sequence: the tokenizer's and the generation config's."""
    ids = {host.tokenizer.eos_token_id}
    configured = getattr(getattr(host.model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list | tuple) else {configured}
    return frozenset(i for i in ids if i is not None)
