"""The daemon's scheduled jobs, and every APScheduler job id (this module is the only place).

APScheduler 3.x runs one poll job per source at its own interval (`poll:<source id>`), one
edit job (`edit`: verify, then apply verified facts, then publish) and a periodic
regression probe (`regression`). Every job has `max_instances=1` and `coalesce=True`, so
after downtime missed runs collapse into one instead of a burst; a job that fails is
logged and counted, and the next run happens on schedule. Jobs that change the model run
at a lower CPU priority than request threads (`yield_to_serving`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from loguru import logger

from kmd.common.values import utcnow

if TYPE_CHECKING:
    from kmd.daemon.maintainer import Maintainer
    from kmd.sources.config import SourcePolicy
    from kmd.daemon.settings import ScheduleSettings
    from kmd.daemon.verify import Verifier
    from kmd.sources.intake import Intake

__all__ = ["EDIT_JOB", "POLL_JOB_PREFIX", "REGRESSION_JOB", "WRITER_NICE", "Jobs", "poll_job_id", "run_logged",
           "yield_to_serving"]

POLL_JOB_PREFIX = "poll:"  # + the source id: one job per polled source
EDIT_JOB = "edit"  # verify, apply verified facts, publish
REGRESSION_JOB = "regression"  # the full locality probe; reverts the newest edits when degraded


def poll_job_id(source_id: str) -> str:
    return POLL_JOB_PREFIX + source_id


def run_logged(name: str, fn: Callable[..., Any], *args: Any) -> bool:
    """Run a job: a failure is logged, not raised (the next run comes on schedule). True when it succeeded."""
    try:
        fn(*args)
    except Exception:
        logger.exception("job {} failed", name)
        return False
    return True


class Jobs:
    """The writer's jobs and their scheduler, over what a loaded writer has (its maintainer,
    intake and verifier). `run` does one job now, as the scheduler does; `start` schedules them."""

    def __init__(self, schedule: ScheduleSettings, sources: Sequence[SourcePolicy], maintainer: Maintainer,
                 intake: Intake, verifier: Verifier, stopping: threading.Event) -> None:  # fmt: skip
        self.schedule, self.sources = schedule, sources
        self.maintainer, self.intake, self.verifier = maintainer, intake, verifier
        self.stopping = stopping  # set: no job starts any more
        self._scheduler: Any = None

    def run(self, job_id: str) -> None:
        """Run one job now (`poll:<source id>`, `edit` or `regression`); a failure is logged and counted."""
        if job_id.startswith(POLL_JOB_PREFIX):
            job, args = self.intake.poll, (job_id.removeprefix(POLL_JOB_PREFIX),)
        else:
            job, args = {EDIT_JOB: self._edit, REGRESSION_JOB: self._regression}[job_id], ()
        if self.stopping.is_set():
            return
        if not run_logged(job_id, job, *args):
            self.maintainer.stats.errors += 1

    def _edit(self) -> None:
        yield_to_serving()
        self.verifier.run()
        self.maintainer.apply_ready(limit=self.schedule.max_edits_per_cycle, batch=self.schedule.edit_batch)
        self.maintainer.publish_pending()  # retries a publish that failed after an earlier change
        self.maintainer.stats.cycles += 1

    def _regression(self) -> None:
        yield_to_serving()
        self.maintainer.regression_check()

    def start(self) -> None:
        """Schedule every job (the polls and the edit job at once, the regression probe after its interval)."""
        from apscheduler.schedulers.background import BackgroundScheduler

        sched = self.schedule
        scheduler = BackgroundScheduler(
            timezone="UTC",
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": int(sched.misfire_grace)},
        )
        now = utcnow()
        for source in self.sources:
            if source.kind == "api":  # nothing to poll: submissions arrive through the API
                continue
            job = poll_job_id(source.id)
            scheduler.add_job(self.run, "interval", seconds=source.poll_interval, id=job, args=[job], next_run_time=now)
        scheduler.add_job(self.run, "interval", seconds=sched.edit_interval, id=EDIT_JOB, args=[EDIT_JOB],
                          next_run_time=now)  # fmt: skip
        scheduler.add_job(self.run, "interval", seconds=sched.regression_interval, id=REGRESSION_JOB,
                          args=[REGRESSION_JOB])  # fmt: skip
        # A run skipped because the previous one is still going is normal here (one writer).
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
        logging.getLogger("apscheduler.executors.default").setLevel(logging.ERROR)
        scheduler.start()
        self._scheduler = scheduler

    @property
    def scheduled(self) -> bool:
        """`start` has run (a standby or a replica never schedules)."""
        return self._scheduler is not None

    @property
    def running(self) -> bool:
        return self._scheduler is not None and self._scheduler.running

    def shutdown(self) -> None:
        """Stop scheduling; the job in flight finishes first (an edit commits or reverts)."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)


WRITER_NICE = 10  # scheduler threads that edit run at this niceness: requests come first


def yield_to_serving() -> None:
    """Lower this thread's CPU priority (Linux: per thread) so generation requests are not
    slowed by an edit computed at the same time. Best effort; a thread keeps it."""
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < WRITER_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, WRITER_NICE)
    except (AttributeError, OSError):
        pass
