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
from typing import TYPE_CHECKING, Any, Protocol

from loguru import logger

if TYPE_CHECKING:
    from kmd.daemon.settings import ApiSettings, DaemonSettings

__all__ = ["EXIT_NOT_WRITER", "ApiServer", "Lifetime", "Process"]

EXIT_NOT_WRITER = 3  # the writer role was lost: exit at once and restart as a standby


class ApiServer:
    """The API's uvicorn server, in a thread of its own."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self, app: Any) -> None:
        """Listen with `app` (an ASGI app); returns once it accepts connections."""
        import uvicorn

        api = self.settings
        config = uvicorn.Config(app, host=api.host, port=api.port, log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="kmd-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        if not self._server.started:
            raise RuntimeError(f"the API could not listen on {api.host}:{api.port}")
        logger.info("API listening on http://{}:{}", api.host, api.port)

    @property
    def url(self) -> str | None:
        """The base URL once it listens (the real port when the settings say 0)."""
        if self._server is None or not self._server.started:
            return None
        sockets = [s for server in self._server.servers for s in server.sockets]
        host, port = sockets[0].getsockname()[:2] if sockets else (self.settings.host, self.settings.port)
        return f"http://{host}:{port}"

    @property
    def alive(self) -> bool:
        """Not started, or its thread still runs."""
        return self._thread is None or self._thread.is_alive()

    def stop(self) -> None:
        """Stop the server (a no-op when none runs); waits up to 10 s for its thread."""
        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=10)


class Process(Protocol):
    """What a lifetime drives (`kmd.daemon.service.Daemon`): start-up by role, the work
    between ticks, and the way out."""

    settings: DaemonSettings
    stopping: threading.Event  # set on SIGTERM/SIGINT or a lost writer role

    def start_api(self) -> None: ...

    def load_model(self) -> Any: ...

    def try_become_writer(self) -> bool: ...

    def start_writer(self) -> None:
        """Load (restore, reconcile) and start the jobs: the writer is serving."""
        ...

    def load_replica(self) -> Any: ...

    def keep_serving(self) -> bool:
        """One tick's work (a replica syncs); False when this writer lost the writer role."""
        ...

    def healthy(self) -> bool: ...

    def stop_work(self) -> None:
        """Let the edit in flight finish; start no other."""
        ...

    def shutdown(self) -> None: ...


class Lifetime:
    """One run of the process until a signal or a lost writer role (see the module docstring)."""

    def __init__(self, process: Process) -> None:
        self.process = process

    def serve_forever(self) -> int:
        """Run until SIGTERM/SIGINT (returns 0 after a clean shutdown), or until this process
        loses the writer role (returns EXIT_NOT_WRITER at once: the caller must exit)."""
        process, stopping = self.process, self.process.stopping
        notifier = SystemdNotifier()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.request_stop(signum))
        if process.settings.api.enabled:
            process.start_api()
        cluster = process.settings.cluster
        watchdog = notifier.watchdog_interval() if process.settings.schedule.watchdog else None
        tick = min(watchdog or 1.0, cluster.poll_interval, cluster.keepalive)

        def ping() -> None:
            if watchdog and process.healthy():
                notifier.notify("WATCHDOG=1")

        if cluster.role == "replica":
            process.load_replica()
            notifier.notify("READY=1\nSTATUS=replica")
            logger.info("kmd replica up: serving the states published in {}", process.settings.publish_path)
        else:
            process.load_model()  # a standby is ready to take over quickly
            standby = False
            while not stopping.is_set() and not process.try_become_writer():
                if not standby:
                    standby = True
                    notifier.notify("READY=1\nSTATUS=standby: another process is the writer")
                    logger.info("standby: another process is the writer; trying every {:g} s", cluster.poll_interval)
                stopping.wait(cluster.poll_interval)
                ping()
            if not stopping.is_set():
                process.start_writer()
                notifier.notify("READY=1\nSTATUS=writer")
        while not stopping.wait(tick):
            if not process.keep_serving():
                logger.error("lost the writer role (the PostgreSQL lock session ended); stopping at once")
                stopping.set()
                process.stop_work()
                notifier.notify("STOPPING=1")
                return EXIT_NOT_WRITER
            ping()
        notifier.notify("STOPPING=1")
        process.shutdown()
        return 0

    def request_stop(self, signum: int) -> None:
        logger.info("signal {} received: finishing the edit in flight, then stopping", signal.Signals(signum).name)
        self.process.stopping.set()
        self.process.stop_work()


class SystemdNotifier:
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
