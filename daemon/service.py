"""The daemon: scheduler, maintenance jobs, HTTP API, signals and systemd notification.

Start-up order: the API comes up first (liveness answers, readiness says "starting"),
then the model loads and the saved editor state is restored and reconciled with the
ledger; only then is the service ready (and systemd told READY=1). APScheduler 3.x runs
one poll job per source at its own interval, one edit job (verify, then apply verified
facts) and a periodic regression probe. Every job has `max_instances=1` and
`coalesce=True`, so after downtime missed runs collapse into one instead of a burst.
Model changes all go through the `Maintainer` lock: never two edits at once. Generation
does not take that lock: it runs in batches (`kmd.daemon.serving`) on the committed
edits' snapshot, so the service stays ready and answering while an edit is computed.

SIGTERM/SIGINT: stop taking new work, let the edit in flight finish (commit or revert),
stop the API, exit 0. A SIGKILL at any moment is recovered at the next start.

Scale-out (`cluster:` settings): a `writer` process first becomes the single writer
(`kmd.daemon.leadership`: always on SQLite, an advisory lock on PostgreSQL; until then it
waits as a standby, `/readyz` 503), then restores and runs the jobs, and publishes every
committed state to `cluster.publish_dir`. If it loses the writer role it exits at once
with status 3, like a crash. A `replica` process never edits: it serves the published
state (`kmd.daemon.replication`) and reloads it when the ledger names a new one.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from kmd.daemon.leadership import Leadership, holder_name, leadership_for
from kmd.daemon.ledger import Ledger
from kmd.daemon.policy import load_policy
from kmd.daemon.settings import DaemonSettings
from kmd.sources.claims import Claim, utcnow

if TYPE_CHECKING:
    from kmd.daemon.maintainer import Maintainer
    from kmd.daemon.replication import Replica
    from kmd.daemon.serving import BatchingEngine, Generated
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import Editor

EXIT_NOT_WRITER = 3  # the writer role was lost: exit at once and restart as a standby


class NotServingError(RuntimeError):
    """No model and state are loaded yet (or this process is a standby)."""


class InsecureConfigError(RuntimeError):
    """The API would listen beyond loopback with no token (and `--insecure` was not given)."""


def check_api_exposure(settings: DaemonSettings, token: str | None, *, insecure: bool = False) -> None:
    """Refuse an API reachable from other machines without a token; warn whenever there is none."""
    api = settings.api
    if not api.enabled or token:
        return
    where = f"{api.host}:{api.port}"
    if not _is_loopback(api.host) and not insecure:
        raise InsecureConfigError(
            f"the API would listen on {where} with no token configured: anyone who can reach it could generate "
            f"and read the ledger. Set ${api.token_env} (or api.token_file), listen on 127.0.0.1, or pass --insecure"
        )
    logger.warning("no API token is configured (${} or api.token_file): writes are refused and reads and generation "
                   "are open to anyone who can reach {}", api.token_env, where)  # fmt: skip


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or a wildcard address: assume it is reachable from elsewhere


@dataclass(frozen=True)
class CycleSummary:
    polled: int
    new_claims: int
    new_facts: int
    committed: tuple[int, ...]
    reverted: tuple[int, ...]
    skipped: tuple[int, ...]
    regression_reverts: tuple[int, ...]
    seconds: float


class Daemon:
    def __init__(self, settings: DaemonSettings, *, host: ModelHost | None = None, insecure: bool = False) -> None:
        from kmd.editors.registry import get_backend

        self.settings = settings
        self.api_token = settings.api_token()
        check_api_exposure(settings, self.api_token, insecure=insecure)
        self.policy = load_policy(settings.policy_path)
        get_backend(self.policy.backend)  # fail now, with a suggestion, on an unknown backend
        self.ledger = Ledger(settings.database_url)
        self.maintainer: Maintainer | None = None
        self.replica: Replica | None = None
        self.holder = holder_name()
        self._leadership: Leadership | None = None
        self._host = host
        self._intake = None
        self._verifier = None
        self._scheduler = None
        self._server = None
        self._server_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._started_at = time.monotonic()
        self._engine: BatchingEngine | None = None
        self._engine_lock = threading.Lock()

    # ----- readiness ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.readiness()[0]

    def readiness(self) -> tuple[bool, str]:
        if self._stopping.is_set():
            return False, "stopping"
        if self.settings.cluster.role == "replica":
            return self.replica.readiness() if self.replica else (False, "starting: loading the model")
        if self._leadership is not None and self.ledger.writer_term is None:
            return False, "standby: another process is the writer"
        if self.maintainer is None or not self.maintainer.ready:
            return False, "starting: loading the model and restoring state"
        # An edit in flight does not make the service unready: requests are answered by
        # the committed edits' snapshot meanwhile.
        return True, "ok"

    # ----- start-up -----------------------------------------------------------------------------
    def load_model(self) -> ModelHost:
        from kmd.editors.model import ModelHost, ModelSettings

        if self._host is None:
            m = self.settings.model
            self._host = ModelHost.load(
                ModelSettings(model=m.model, device=m.device, dtype=m.dtype, use_chat_template=m.use_chat_template,
                              profile=m.profile, offline=m.offline)  # fmt: skip
            )
        return self._host

    def try_become_writer(self) -> bool:
        """Take the writer role if it is free; then every ledger write checks we still hold it."""
        cluster = self.settings.cluster
        if cluster.role != "writer":
            raise RuntimeError("a replica never becomes the writer")
        if self._leadership is None:
            self._leadership = leadership_for(self.settings.database_url, key=cluster.lock_key, keepalive=cluster.keepalive)
        if not self._leadership.try_acquire():
            return False
        if self.ledger.writer_term is None:
            self.ledger.begin_writer_term(self.holder)
        return True

    def load(self) -> Maintainer:
        """Become the writer, load the model, restore and reconcile the editor state, build intake and verifier."""
        from kmd.daemon.maintainer import Maintainer
        from kmd.daemon.matching import MiniLMEncoder, ObjectMatcher
        from kmd.daemon.verify import Verifier
        from kmd.daemon.intake import intake_for

        if not self.try_become_writer():
            raise RuntimeError("another process is the writer (it holds the PostgreSQL writer lock)")
        maintainer = Maintainer(self.load_model(), self.ledger, self.policy, self.settings.state_path)
        publish_dir = self.settings.publish_path
        if publish_dir is not None:
            self._adopt_closest_state(maintainer.editor_dir, publish_dir)
            maintainer.publish = functools.partial(self._publish, maintainer.editor_dir)
        maintainer.restore()
        if publish_dir is not None:  # a new writer term: publish what it serves, once
            if not (maintainer.editor_dir / "manifest.json").is_file():
                maintainer.save()
            maintainer.publish_pending(force=True)
        self._intake = intake_for(self.policy, self.ledger)
        matcher = ObjectMatcher(MiniLMEncoder(), self.policy.verification.similarity_threshold)
        self._verifier = Verifier(self.policy, self.ledger, matcher)
        self.maintainer = maintainer
        return maintainer

    def _adopt_closest_state(self, editor_dir: Path, publish_dir: Path) -> None:
        """Taking over: start from the local or the published state, whichever is nearer the ledger."""
        from kmd.daemon.replication import adopt_state, closest_state, published_dir

        published = self.ledger.published_state()
        if published is None:
            return
        candidate = published_dir(publish_dir, published.version)
        committed = {str(e.id) for e in self.ledger.committed_edits()}
        if closest_state([candidate, editor_dir], committed) == candidate:
            logger.info("restoring from published state {} (nearer the ledger than {})", published.version[:12], editor_dir)
            adopt_state(candidate, editor_dir)

    def _publish(self, editor_dir: Path) -> None:
        from kmd.daemon.replication import publish_state

        version, edit_ids = publish_state(editor_dir, self.settings.publish_path, keep=self.settings.cluster.keep_published)
        self.ledger.publish_state(version, edit_ids, holder=self.holder)
        logger.info("published state {} ({} edits)", version[:12], len(edit_ids))

    def load_replica(self) -> Replica:
        """A serving replica: the model, then the published state (see `Replica.sync`)."""
        from kmd.daemon.replication import Replica

        cluster = self.settings.cluster
        self.replica = Replica(self.load_model(), self.ledger, self.policy, self.settings.publish_path,
                               smoke_edits=cluster.smoke_edits)  # fmt: skip
        self.replica.sync()
        return self.replica

    # ----- the work -----------------------------------------------------------------------------
    def ingest(self, *, all_sources: bool = False) -> tuple[int, int, int]:
        """Poll sources (all, or those due) and verify; returns (polled, new claims, new facts)."""
        assert self._intake is not None and self._verifier is not None
        reports = self._intake.poll_many(list(self._intake.sources)) if all_sources else self._intake.poll_due()
        for report in reports:
            for problem in report.problems:
                logger.warning("source {}: {}", report.source_id, problem)
        verified = self._verifier.run()
        return len(reports), sum(r.new_claims for r in reports), len(verified.new_facts)

    def cycle(self, *, all_sources: bool = True, regression: bool = True) -> CycleSummary:
        """One full cycle: poll, verify, apply verified facts, regression probe."""
        assert self.maintainer is not None
        started = time.perf_counter()
        polled, claims, facts = self.ingest(all_sources=all_sources)
        report = self.maintainer.apply_ready(limit=self.settings.schedule.max_edits_per_cycle)
        regressed = self.maintainer.regression_check() if regression else []
        self.maintainer.stats.cycles += 1
        self.maintainer.stats.last_cycle_seconds = time.perf_counter() - started
        return CycleSummary(polled, claims, facts, report.committed, report.reverted, report.skipped,
                            tuple(regressed), time.perf_counter() - started)  # fmt: skip

    def generate(self, prompt: str, max_new_tokens: int) -> str:
        """Greedy text through the edited model (the writer's committed edits, or the replica's loaded state)."""
        return self.generate_result(prompt, max_new_tokens)[0]

    def generate_result(self, prompt: str, max_new_tokens: int) -> tuple[str, Generated]:
        """The same, with how it was answered; raises `serving.QueueFull` when saturated."""
        return self.engine().generate(prompt, max_new_tokens)

    def engine(self) -> BatchingEngine:
        """The batching generation engine (made on first use)."""
        from kmd.daemon.serving import BatchingEngine

        if self.replica is None and (self.maintainer is None or self.maintainer.serving is None):
            raise NotServingError("starting: model and state are not loaded yet")
        with self._engine_lock:
            if self._engine is None:
                api = self.settings.api
                host = self.replica.host if self.replica is not None else self.maintainer.host
                self._engine = BatchingEngine(host, self._serving_snapshot, max_batch=api.max_batch,
                                              max_queue=api.max_queue, window_s=api.batch_window_ms / 1000)  # fmt: skip
            return self._engine

    @contextmanager
    def _serving_snapshot(self) -> Iterator[Editor | None]:
        if self.replica is not None:
            with self.replica.lock:  # a replica swaps its loaded state under this lock
                yield self.replica.editor
        else:
            yield self.maintainer.serving  # the committed edits: no lock, never a candidate

    def submit_fact(self, subject: str, relation: str, obj: str, source_id: str | None, url: str) -> dict[str, Any]:
        """Record a fact submitted through the API as a claim of the policy's `api` source;
        verified in the next cycle (and, by default, held for a person's approval).

        Raises PermissionError when the policy has no such source or `source_id` names a
        source of another kind; ValueError when the source may not assert the relation."""
        source = self.policy.api_source(source_id)
        if relation not in source.relations:
            raise ValueError(f"source {source.id!r} may not assert relation {relation!r} (allowed: {list(source.relations)})")
        claim = Claim(subject=subject, relation=relation, object=obj, source_id=source.id,
                      url=url or "api:", observed_at=utcnow(), ref=f"api:{uuid.uuid4().hex}")  # fmt: skip
        result = self.ledger.record_claims([claim], policy_version=self.policy.version_tag, channel="api", actor="api")
        note = "recorded; verified by the next edit cycle"
        note += ", then held for a person's approval (kmd approve)" if source.requires_approval else ", then applied"
        return {"claim_ids": list(result.new_ids), "duplicates": result.duplicates, "source_id": source.id, "note": note}

    # ----- scheduled jobs -------------------------------------------------------------------------
    def _guarded(self, name: str, fn, *args) -> None:
        if self._stopping.is_set():
            return
        try:
            fn(*args)
        except Exception:
            logger.exception("job {} failed", name)
            if self.maintainer is not None:
                self.maintainer.stats.errors += 1

    def _poll_job(self, source_id: str) -> None:
        assert self._intake is not None
        self._intake.poll(source_id)

    def _edit_job(self) -> None:
        assert self._verifier is not None and self.maintainer is not None
        _yield_to_serving()
        self._verifier.run()
        self.maintainer.apply_ready(limit=self.settings.schedule.max_edits_per_cycle)
        self.maintainer.publish_pending()  # retries a publish that failed after an earlier change
        self.maintainer.stats.cycles += 1

    def _regression_job(self) -> None:
        assert self.maintainer is not None
        _yield_to_serving()
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
            scheduler.add_job(self._guarded, "interval", seconds=source.poll_interval, id=f"poll:{source.id}",
                              args=[f"poll:{source.id}", self._poll_job, source.id], next_run_time=now)  # fmt: skip
        scheduler.add_job(self._guarded, "interval", seconds=sched.edit_interval, id="edit",
                          args=["edit", self._edit_job], next_run_time=now)  # fmt: skip
        scheduler.add_job(self._guarded, "interval", seconds=sched.regression_interval, id="regression",
                          args=["regression", self._regression_job])  # fmt: skip
        # A run skipped because the previous one is still going is normal here (one writer).
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
        logging.getLogger("apscheduler.executors.default").setLevel(logging.ERROR)
        scheduler.start()
        self._scheduler = scheduler

    # ----- the API server -------------------------------------------------------------------------
    def start_api(self) -> None:
        import uvicorn

        from kmd.daemon.api import create_app

        api = self.settings.api
        config = uvicorn.Config(create_app(self), host=api.host, port=api.port, log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._server_thread = threading.Thread(target=self._server.run, name="kmd-api", daemon=True)
        self._server_thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and time.monotonic() < deadline and self._server_thread.is_alive():
            time.sleep(0.05)
        if not self._server.started:
            raise RuntimeError(f"the API could not listen on {api.host}:{api.port}")
        logger.info("API listening on http://{}:{}", api.host, api.port)

    @property
    def api_url(self) -> str | None:
        """The API's base URL once it listens (the real port when the settings say 0)."""
        if self._server is None or not self._server.started:
            return None
        sockets = [s for server in self._server.servers for s in server.sockets]
        host, port = sockets[0].getsockname()[:2] if sockets else (self.settings.api.host, self.settings.api.port)
        return f"http://{host}:{port}"

    def stop_api(self) -> None:
        """Stop the API server started by `start_api` (a no-op when none runs)."""
        if self._server is not None:
            self._server.should_exit = True
            if self._server_thread is not None:
                self._server_thread.join(timeout=10)

    # ----- lifetimes ------------------------------------------------------------------------------
    def run_once(self) -> CycleSummary:
        if self.settings.cluster.role != "writer":
            raise RuntimeError("--once runs a maintenance cycle: only a writer does that")
        self.load()
        try:
            return self.cycle(all_sources=True)
        finally:
            self.close()

    def serve_forever(self) -> int:
        """Run until SIGTERM/SIGINT (returns 0 after a clean shutdown), or until this process
        loses the writer role (returns EXIT_NOT_WRITER at once: the caller must exit)."""
        notifier = _SystemdNotifier()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self._request_stop(signum))
        if self.settings.api.enabled:
            self.start_api()
        cluster = self.settings.cluster
        watchdog = notifier.watchdog_interval() if self.settings.schedule.watchdog else None
        tick = min(watchdog or 1.0, cluster.poll_interval, cluster.keepalive)

        def ping() -> None:
            if watchdog and self._healthy():
                notifier.notify("WATCHDOG=1")

        if cluster.role == "replica":
            self.load_replica()
            notifier.notify("READY=1\nSTATUS=replica")
            logger.info("kmd replica up: serving the states published in {}", self.settings.publish_path)
        else:
            self.load_model()  # a standby is ready to take over quickly
            standby = False
            while not self._stopping.is_set() and not self.try_become_writer():
                if not standby:
                    standby = True
                    notifier.notify("READY=1\nSTATUS=standby: another process is the writer")
                    logger.info("standby: another process is the writer; trying every {:g} s", cluster.poll_interval)
                self._stopping.wait(cluster.poll_interval)
                ping()
            if not self._stopping.is_set():
                self.load()
                self._schedule()
                notifier.notify("READY=1\nSTATUS=writer")
                logger.info("kmd ready (writer, term {}): {} edits applied, backend {}", self.ledger.writer_term,
                            len(self.maintainer.editor.edit_ids), self.maintainer.editor.name)  # fmt: skip
        while not self._stopping.wait(tick):
            if self.replica is not None:
                self._guarded("replica sync", self.replica.sync)
            elif not self._leadership.check():
                logger.error("lost the writer role (the PostgreSQL lock session ended); stopping at once")
                self._stopping.set()
                if self.maintainer is not None:
                    self.maintainer.stop()
                notifier.notify("STOPPING=1")
                return EXIT_NOT_WRITER
            ping()
        notifier.notify("STOPPING=1")
        self._shutdown()
        return 0

    def _request_stop(self, signum: int) -> None:
        logger.info("signal {} received: finishing the edit in flight, then stopping", signal.Signals(signum).name)
        self._stopping.set()
        if self.maintainer is not None:
            self.maintainer.stop()

    def _healthy(self) -> bool:
        api_ok = self._server_thread is None or self._server_thread.is_alive()
        if self._scheduler is None:  # a standby or a replica: this loop is its work
            return api_ok
        return api_ok and self._scheduler.running

    def _shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)  # the edit in flight finishes (commit or revert)
        if self._server is not None:
            self._server.should_exit = True
            if self._server_thread is not None:
                self._server_thread.join(timeout=10)
        if self._leadership is not None:
            self._leadership.release()
        self.close()
        logger.info("kmd stopped cleanly")

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        if self._intake is not None:
            self._intake.close()
        self.ledger.close()


WRITER_NICE = 10  # scheduler threads that edit run at this niceness: requests come first


def _yield_to_serving() -> None:
    """Lower this thread's CPU priority (Linux: per thread) so generation requests are not
    slowed by an edit computed at the same time. Best effort; a thread keeps it."""
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < WRITER_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, WRITER_NICE)
    except (AttributeError, OSError):
        pass


class _SystemdNotifier:
    """sd_notify when run under systemd (NOTIFY_SOCKET set); a no-op otherwise."""

    def __init__(self) -> None:
        self._notifier = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()

    def notify(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def watchdog_interval(self) -> float | None:
        usec = os.environ.get("WATCHDOG_USEC")
        return int(usec) / 2e6 if usec and self._notifier is not None else None
