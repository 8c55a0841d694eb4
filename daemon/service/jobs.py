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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loguru import logger

from kmd.common.values import utcnow

if TYPE_CHECKING:
    from kmd.daemon.maintainer import Maintainer
    from kmd.daemon.policy import Policy
    from kmd.daemon.settings import DaemonSettings
    from kmd.daemon.verify import Verifier
    from kmd.sources.intake import Intake

__all__ = ["EDIT_JOB", "POLL_JOB_PREFIX", "REGRESSION_JOB", "WRITER_NICE", "DaemonJobs", "poll_job_id", "yield_to_serving"]

POLL_JOB_PREFIX = "poll:"  # + the source id: one job per polled source
EDIT_JOB = "edit"  # verify, apply verified facts, publish
REGRESSION_JOB = "regression"  # the full locality probe; reverts the newest edits when degraded


def poll_job_id(source_id: str) -> str:
    return POLL_JOB_PREFIX + source_id


class DaemonJobs:
    """The jobs half of `kmd.daemon.service.Daemon`: what the scheduler runs, and the scheduler."""

    settings: DaemonSettings
    policy: Policy
    maintainer: Maintainer | None
    intake: Intake | None
    verifier: Verifier | None
    stopping: threading.Event
    _scheduler: Any

    def _guarded(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        if self.stopping.is_set():
            return
        try:
            fn(*args)
        except Exception:
            logger.exception("job {} failed", name)
            if self.maintainer is not None:
                self.maintainer.stats.errors += 1

    def _poll_job(self, source_id: str) -> None:
        assert self.intake is not None
        self.intake.poll(source_id)

    def _edit_job(self) -> None:
        assert self.verifier is not None and self.maintainer is not None
        yield_to_serving()
        self.verifier.run()
        self.maintainer.apply_ready(limit=self.settings.schedule.max_edits_per_cycle,
                                              batch=self.settings.schedule.edit_batch)
        self.maintainer.publish_pending()  # retries a publish that failed after an earlier change
        self.maintainer.stats.cycles += 1

    def _regression_job(self) -> None:
        assert self.maintainer is not None
        yield_to_serving()
        self.maintainer.regression_check()

    def _schedule(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        sched = self.settings.schedule
        scheduler = BackgroundScheduler(
            timezone="UTC",
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": int(sched.misfire_grace)},
        )
        now = utcnow()
        for source in self.policy.sources:
            if source.kind == "api":  # nothing to poll: submissions arrive through the API
                continue
            job = poll_job_id(source.id)
            scheduler.add_job(self._guarded, "interval", seconds=source.poll_interval, id=job,
                              args=[job, self._poll_job, source.id], next_run_time=now)  # fmt: skip
        scheduler.add_job(self._guarded, "interval", seconds=sched.edit_interval, id=EDIT_JOB,
                          args=[EDIT_JOB, self._edit_job], next_run_time=now)  # fmt: skip
        scheduler.add_job(self._guarded, "interval", seconds=sched.regression_interval, id=REGRESSION_JOB,
                          args=[REGRESSION_JOB, self._regression_job])  # fmt: skip
        # A run skipped because the previous one is still going is normal here (one writer).
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
        logging.getLogger("apscheduler.executors.default").setLevel(logging.ERROR)
        scheduler.start()
        self._scheduler = scheduler


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
