"""Who runs: the one place that decides which requests decode (vLLM's scheduler, small).

Every caller has a budget (`Budget`): how many of its requests may decode at once, how
many may wait to start, and how many tokens one may ask for. A request beyond its
caller's queue is refused at once (`Refused`, the API's 429 with Retry-After) instead of
queueing forever. At every step the engine asks `admit` which waiting requests start now:
callers in priority order (the order of `budgets`: token holders before anonymous callers),
first come first served within a caller, while the caller has a free slot, the running
batch has room (`max_batch` rows in all) and the step's prefill stays under
`prefill_tokens` (a long prefill stalls every running row for its duration; one request
is always let through). Running rows never wait for each other: a finished one leaves at
once (`finished`) and its slot goes to the next waiting request at the next step.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Budget:
    concurrent: int  # requests decoding at once (0: this caller may not generate)
    queued: int  # requests waiting to start; one more is refused
    max_tokens: int  # new tokens one request may ask for


class Refused(RuntimeError):
    """The caller's budget is spent: HTTP `status` (429: try again after `retry_after` s)."""

    def __init__(self, message: str, *, status: int = 429, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class Waiting(Protocol):
    """What the scheduler knows of a request."""

    caller: str
    prompt_tokens: int
    max_tokens: int

    @property
    def cancelled(self) -> bool: ...


class Scheduler:
    def __init__(self, budgets: Mapping[str, Budget], *, max_batch: int = 16, prefill_tokens: int = 512) -> None:
        if max_batch < 1 or prefill_tokens < 1:
            raise ValueError("max_batch and prefill_tokens must be >= 1")
        self.budgets = dict(budgets)  # in priority order
        self.max_batch, self.prefill_tokens = max_batch, prefill_tokens
        self._waiting: dict[str, deque[Waiting]] = {caller: deque() for caller in budgets}
        self._running: dict[str, int] = dict.fromkeys(budgets, 0)
        self._lock = threading.Lock()  # callers submit from request threads; the engine admits
        self._seconds = 2.0  # a finished request's time from start to end (moving average): Retry-After
        self.rejected = 0

    def budget(self, caller: str) -> Budget:
        try:
            return self.budgets[caller]
        except KeyError:
            raise ValueError(f"no budget for caller {caller!r}") from None

    def check(self, caller: str, max_tokens: int) -> None:
        """Refuse now (`Refused`) a request `submit` would refuse: callers check before they
        spend work on a request (tokenizing it); `submit` checks again."""
        self._refuse_when_too_long(caller, max_tokens)
        with self._lock:
            self._refuse_when_full(caller)

    def submit(self, request: Waiting) -> None:
        """Queue a request, or refuse it now (`Refused`) when its caller's budget is spent."""
        self._refuse_when_too_long(request.caller, request.max_tokens)
        with self._lock:
            self._refuse_when_full(request.caller)
            self._waiting[request.caller].append(request)

    def _refuse_when_too_long(self, caller: str, max_tokens: int) -> None:
        budget = self.budget(caller)
        if max_tokens > budget.max_tokens:
            raise Refused(f"at most {budget.max_tokens} new tokens per request for {caller} callers", status=400)

    def _refuse_when_full(self, caller: str) -> None:
        budget = self.budget(caller)
        if budget.concurrent == 0:
            raise Refused(f"{caller} callers may not generate here", status=403)
        waiting = len(self._waiting[caller])
        if waiting + self._running[caller] >= budget.concurrent + budget.queued:
            self.rejected += 1
            raise Refused(f"{waiting} {caller} requests are waiting already; retry later",
                          retry_after=self._retry_after(caller))  # fmt: skip

    def admit(self) -> list[Waiting]:
        """The waiting requests that start at this step (they count as running from now)."""
        started: list[Waiting] = []
        with self._lock:
            room = self.max_batch - sum(self._running.values())
            tokens = 0
            for caller, queue in self._waiting.items():
                budget = self.budgets[caller]
                while queue and room > 0 and self._running[caller] < budget.concurrent:
                    request = queue[0]
                    if request.cancelled:  # the client went away while it waited
                        queue.popleft()
                        continue
                    if started and tokens + request.prompt_tokens > self.prefill_tokens:
                        return started
                    queue.popleft()
                    started.append(request)
                    tokens += request.prompt_tokens
                    self._running[caller] += 1
                    room -= 1
        return started

    def finished(self, request: Waiting, seconds: float | None = None) -> None:
        """A running request left (ended, cancelled or failed): its slot is free."""
        with self._lock:
            self._running[request.caller] -= 1
            if seconds is not None:
                self._seconds = 0.8 * self._seconds + 0.2 * seconds

    def waiting(self, caller: str | None = None) -> int:
        with self._lock:
            return sum(len(q) for c, q in self._waiting.items() if caller in (None, c))

    def running(self, caller: str | None = None) -> int:
        with self._lock:
            return sum(n for c, n in self._running.items() if caller in (None, c))

    def _retry_after(self, caller: str) -> int:
        """Seconds until the caller's queue has room, about (its slots turn over once per request time)."""
        budget = self.budgets[caller]
        turns = (len(self._waiting[caller]) + 1) / max(budget.concurrent, 1)
        return max(1, math.ceil(turns * self._seconds))
