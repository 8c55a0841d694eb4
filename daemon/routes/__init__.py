"""The API's own routes, one router per concern (`kmd.daemon.api` assembles them):

    health.py    GET /healthz, /readyz, /metrics          (health_router)
    generate.py  POST /v1/generate                        (generate_router)
    ledger.py    the edit ledger, fact submission, revert (ledger_router)

They see the daemon through `kmd.daemon.surface.Service` and share `kmd.daemon.auth` and
`kmd.daemon.web` with the OpenAI-compatible endpoints and the console.
"""

from kmd.daemon.routes.generate import generate_router
from kmd.daemon.routes.health import health_router
from kmd.daemon.routes.ledger import ledger_router

__all__ = ["generate_router", "health_router", "ledger_router"]
