"""One request to the serving engine, and the stream of its tokens.

    stream = engine.submit(GenerationRequest(prompt_ids, max_tokens=16))
    for token in stream: ...          # a thread blocks between tokens
    async for token in stream: ...    # a coroutine awaits them (the HTTP routes: no thread held)
    stream.cancel()                   # the client went away: the row leaves at the next step

The engine's thread writes (`_start`, `_push`, `_end`, `_fail`); any thread or event loop
reads. A consumer that stops early (a stop string, a disconnect) cancels the row.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kmd.daemon.serving.sampling import Sampling

if TYPE_CHECKING:
    from kmd.daemon.serving.state import ServedState


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    caller: str = "token"  # whose budget it spends (`Scheduler.budgets`)
    sampling: Sampling = field(default_factory=Sampling)
    base: bool = False  # the base model: no edit acts on this row (the console's "before" answers)
    # write max_tokens whatever comes (the end of sequence does not end the row), as vLLM's
    # `ignore_eos`: benchmarks compare the cost of equal work (kmd bench-serve)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", tuple(int(i) for i in self.prompt_ids))
        if not self.prompt_ids or self.max_tokens < 1:
            raise ValueError("a generation request needs prompt tokens and max_tokens >= 1")


class TokenStream:
    """The new tokens of one request, as the engine produces them."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.tokens: list[int] = []
        self.state: ServedState | None = None  # the state that answers, once the prefill ran
        self.finish_reason: str | None = None  # "stop" (end of sequence), "length", "cancelled", "error"
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self.started_at: float | None = None  # prefill
        self.joined_running_batch = False  # it joined rows that were already decoding
        self._cond = threading.Condition()
        self._cancelled = threading.Event()
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # ----- what the scheduler reads -------------------------------------------------------
    @property
    def caller(self) -> str:
        return self.request.caller

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def max_tokens(self) -> int:
        return self.request.max_tokens

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    # ----- consumers ----------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop generating this request (nothing happens once it ended)."""
        self._cancelled.set()

    def wait_started(self, timeout: float | None = None) -> ServedState | None:
        """Block until the prefill ran (or the request ended); the state that answers."""
        with self._cond:
            self._cond.wait_for(lambda: self.state is not None or self.done, timeout)
            self._raise()
            return self.state

    async def started(self) -> ServedState | None:
        """The same for a coroutine."""
        async for _ in self._changes():
            if self.state is not None or self.done:
                self._raise()
                return self.state
        return self.state  # pragma: no cover - _changes ends only when done

    def __iter__(self) -> Iterator[int]:
        sent = 0
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: len(self.tokens) > sent or self.done)
                    new, finished = self.tokens[sent:], self.done
                sent += len(new)
                yield from new
                if finished:
                    self._raise()
                    return
        finally:
            if not self.done:
                self.cancel()  # the consumer stopped early

    async def __aiter__(self) -> AsyncIterator[int]:
        sent = 0
        try:
            async for _ in self._changes():
                with self._cond:
                    new, finished = self.tokens[sent:], self.done
                sent += len(new)
                for token in new:
                    yield token
                if finished:
                    self._raise()
                    return
        finally:
            if not self.done:
                self.cancel()

    def result(self, timeout: float | None = None) -> list[int]:
        """All the tokens, once the request ended (blocking)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError("generation did not finish in time")
        self._raise()
        return list(self.tokens)

    async def _changes(self) -> AsyncIterator[None]:
        """Yields now and after every change the engine makes, until the request ended."""
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._wakers.append((loop, event))
        try:
            while True:
                event.clear()
                yield
                if self.done:
                    return
                await event.wait()
        finally:
            with self._cond:
                self._wakers.remove((loop, event))

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    # ----- the engine ---------------------------------------------------------------------
    def _changed(self) -> None:
        self._cond.notify_all()
        for loop, event in self._wakers:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that event loop is closed: nobody reads there any more
                pass

    def _start(self, state: ServedState, *, joined: bool) -> None:
        with self._cond:
            self.state, self.started_at, self.joined_running_batch = state, time.perf_counter(), joined
            self._changed()

    def _push(self, token: int) -> None:
        with self._cond:
            self.tokens.append(token)
            self._changed()

    def _end(self, reason: str) -> None:
        with self._cond:
            self.finish_reason = reason
            self._changed()

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self.error, self.finish_reason = error, "error"
            self._changed()
