"""Console sessions: a login with the API token, an HttpOnly cookie, CSRF tokens.

The browser never holds the API token: the login form posts it once, kmd checks it and
answers with a random session id in a cookie (`HttpOnly`: no script reads it;
`SameSite=Strict`: no other site's page sends it; `Secure` over HTTPS; path `/ui`).
Every form carries the session's CSRF token, checked on every write. Sessions live in
this process's memory: a restart, a logout, or a change of the API token ends them.

Before a session exists, the login form is protected by a double-submit token: a
random value in its own cookie and in the form, which must match.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

COOKIE = "kmd_session"
LOGIN_COOKIE = "kmd_login_csrf"
COOKIE_PATH = "/ui"
TTL_SECONDS = 8 * 3600
MAX_SESSIONS = 1000
NAME_RE = re.compile(r"^[\w.@-]{1,40}$")


def tokens_equal(given: str, expected: str) -> bool:
    """Constant-time comparison that also accepts non-ASCII input (it simply never matches)."""
    return bool(expected) and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass
class Session:
    id: str
    csrf: str
    actor: str  # recorded in the ledger for every write made in this session
    token_digest: str  # the API token it was opened with: a new token ends the session
    expires: float
    flash: list[tuple[str, str]] = field(default_factory=list)  # (kind, message) shown once

    def say(self, kind: str, message: str) -> None:
        self.flash.append((kind, message))

    def take_flash(self) -> list[tuple[str, str]]:
        out, self.flash = self.flash, []
        return out


class Sessions:
    def __init__(self, ttl: float = TTL_SECONDS, limit: int = MAX_SESSIONS) -> None:
        self.ttl, self.limit = ttl, limit
        self._by_id: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, token: str, name: str | None = None) -> Session:
        actor = f"console:{name}" if name else "console"
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), actor, _digest(token),
                          time.monotonic() + self.ttl)  # fmt: skip
        with self._lock:
            self._by_id[session.id] = session
            while len(self._by_id) > self.limit:  # the oldest session goes first
                self._by_id.popitem(last=False)
        return session

    def find(self, session_id: str | None, token: str | None) -> Session | None:
        """The live session for this cookie value, if the API token is still the same."""
        if not session_id or not token:
            return None
        with self._lock:
            session = self._by_id.get(session_id)
            if session is None:
                return None
            if session.expires < time.monotonic() or not hmac.compare_digest(session.token_digest, _digest(token)):
                del self._by_id[session_id]
                return None
            return session

    def close(self, session_id: str) -> None:
        with self._lock:
            self._by_id.pop(session_id, None)
