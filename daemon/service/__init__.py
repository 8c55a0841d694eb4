"""The daemon process, in three modules:

    app.py        wiring: the `Daemon` (settings, policy, ledger, model, maintainer or
                  replica, intake, verifier), start-up by role, generation, fact submission
    jobs.py       `Jobs`: the writer's scheduled jobs, and every APScheduler job id
    lifecycle.py  `ApiServer` (the API's server thread) and `Lifetime` (serving until a
                  signal, systemd notification, shutdown)

The `Daemon` owns its `ApiServer` and its `Jobs`, and hands itself to a `Lifetime` through
the narrow `lifecycle.Process` interface: jobs.py and lifecycle.py never import app.py.
The HTTP API depends only on `kmd.daemon.surface.Service`, which `Daemon` implements.
"""

from kmd.daemon.service.app import CycleSummary, Daemon, FlaggedLedgerError, InsecureConfigError, check_api_exposure
from kmd.daemon.service.lifecycle import EXIT_NOT_WRITER
from kmd.daemon.surface import NotServingError

__all__ = ["EXIT_NOT_WRITER", "CycleSummary", "Daemon", "FlaggedLedgerError", "InsecureConfigError", "NotServingError",
           "check_api_exposure"]
