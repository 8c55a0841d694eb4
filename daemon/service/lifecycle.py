"""The daemon's lifetime: the API server, start-up by role, signals, systemd, shutdown.

Start-up order: the API comes up first (liveness answers, readiness says "starting"),
then the model loads and the saved editor state is restored and reconciled with the
ledger; only then is the service ready (and systemd told READY=1, with watchdog pings from
a health-gated loop). SIGTERM/SIGINT: stop taking new work, let the edit in flight finish
(commit or revert), stop the API, exit 0. A SIGKILL at any moment is recovered at the next
start. A writer that loses the writer role exits at once with `EXIT_NOT_WRITER` (3), like
a crash; a standby waits for the role; a replica serves the published states.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from loguru import logger

if TYPE_CHECKING:
    from kmd.daemon.leadership import Leadership
    from kmd.daemon.ledger import Ledger
    from kmd.daemon.maintainer import Maintainer
    from kmd.daemon.replication import Replica
    from kmd.daemon.service.app import CycleSummary
    from kmd.daemon.settings import DaemonSettings

__all__ = ["EXIT_NOT_WRITER", "DaemonLifecycle"]

EXIT_NOT_WRITER = 3  # the writer role was lost: exit at once and restart as a standby


class DaemonLifecycle:
    """The lifetime half of `kmd.daemon.service.Daemon` (its wiring is `app.py`, its jobs `jobs.py`)."""

    settings: DaemonSettings
    ledger: Ledger
    maintainer: Maintainer | None
    replica: Replica | None
    stopping: threading.Event
    _leadership: Leadership | None
    _scheduler: Any
    _server: Any
    _server_thread: threading.Thread | None

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
            while not self.stopping.is_set() and not self.try_become_writer():
                if not standby:
                    standby = True
                    notifier.notify("READY=1\nSTATUS=standby: another process is the writer")
                    logger.info("standby: another process is the writer; trying every {:g} s", cluster.poll_interval)
                self.stopping.wait(cluster.poll_interval)
                ping()
            if not self.stopping.is_set():
                self.load()
                self._schedule()
                notifier.notify("READY=1\nSTATUS=writer")
                logger.info("kmd ready (writer, term {}): {} edits applied, backend {}", self.ledger.writer_term,
                            len(self.maintainer.editor.edit_ids), self.maintainer.editor.name)  # fmt: skip
        while not self.stopping.wait(tick):
            if self.replica is not None:
                self._guarded("replica sync", self.replica.sync)
            elif not self._leadership.check():
                logger.error("lost the writer role (the PostgreSQL lock session ended); stopping at once")
                self.stopping.set()
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
        self.stopping.set()
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
