"""Who runs: the serving scheduler's budgets and order (no model), and the console's login throttle."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kmd.daemon.console.sessions import LoginThrottle
from kmd.daemon.serving import Budget, Refused, Scheduler


@dataclass
class Req:
    caller: str
    prompt_tokens: int = 10
    max_tokens: int = 16
    cancelled: bool = False


def scheduler(**kw) -> Scheduler:
    budgets = {"token": Budget(concurrent=3, queued=2, max_tokens=256), "anonymous": Budget(concurrent=2, queued=1, max_tokens=64)}
    return Scheduler(budgets, **({"max_batch": 4} | kw))


def test_token_holders_start_first_and_each_caller_keeps_to_its_concurrency():
    s = scheduler()
    anonymous = [Req("anonymous") for _ in range(3)]
    token = [Req("token") for _ in range(4)]
    for r in anonymous + token:  # the anonymous ones came first
        s.submit(r)
    started = s.admit()
    assert started == token[:3] + anonymous[:1], "token holders first, then anonymous up to the batch's room"
    assert s.running("token") == 3 and s.running("anonymous") == 1 and s.waiting() == 3
    assert s.admit() == [], "the batch is full"
    s.finished(token[0], 1.0)
    assert s.admit() == [token[3]], "a freed row goes to the waiting token holder"
    s.finished(token[1], 1.0)
    assert s.admit() == [anonymous[1]]
    s.finished(token[2], 1.0)
    assert s.admit() == [], "anonymous callers are at their concurrency (2) even with room in the batch"


def test_a_caller_beyond_concurrent_plus_queued_is_refused_at_once_with_retry_after():
    s = scheduler()
    for _ in range(3):  # concurrent 2 + queued 1
        s.submit(Req("anonymous"))
    with pytest.raises(Refused) as refused:
        s.submit(Req("anonymous"))
    assert refused.value.status == 429 and refused.value.retry_after >= 1 and s.rejected == 1
    s.submit(Req("token"))  # another caller's budget is untouched
    s.admit()
    with pytest.raises(Refused):  # admitted requests still count: 2 running + 1 waiting
        s.submit(Req("anonymous"))


def test_refusals_that_are_not_about_load():
    s = Scheduler({"token": Budget(4, 4, 256), "anonymous": Budget(0, 0, 64)})
    with pytest.raises(Refused) as off:
        s.submit(Req("anonymous"))
    assert off.value.status == 403
    with pytest.raises(Refused) as long:
        s.submit(Req("token", max_tokens=300))
    assert long.value.status == 400 and "256" in str(long.value)
    with pytest.raises(ValueError, match="no budget"):
        s.submit(Req("somebody"))


def test_a_step_starts_prompts_up_to_the_prefill_budget_but_always_one():
    s = scheduler(prefill_tokens=100)
    big, small, other = Req("token", prompt_tokens=300), Req("token", prompt_tokens=60), Req("token", prompt_tokens=60)
    for r in (big, small, other):
        s.submit(r)
    assert s.admit() == [big], "a prompt over the budget still starts, alone"
    assert s.admit() == [small], "the next two together would pass 100 prompt tokens"
    assert s.admit() == [other]


def test_requests_cancelled_while_waiting_never_start():
    s = scheduler()
    gone, staying = Req("token", cancelled=True), Req("token")
    s.submit(gone)
    s.submit(staying)
    assert s.admit() == [staying] and s.running() == 1 and s.waiting() == 0


def test_login_throttle_counts_per_address_and_over_all_addresses():
    throttle = LoginThrottle(per_address=2, overall=3, window=60)
    assert throttle.retry_after("a") is None
    throttle.failed("a")
    throttle.failed("a")
    assert 59 <= throttle.retry_after("a") <= 60 and throttle.retry_after("b") is None
    throttle.failed("b")  # the third failure overall: everyone waits
    assert throttle.retry_after("c") is not None
    throttle.succeeded("a")
    assert throttle.retry_after("a") is not None, "the overall limit still holds"
