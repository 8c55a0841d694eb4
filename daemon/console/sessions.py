"""Console sessions: a login with the API token, an HttpOnly cookie, CSRF tokens.

The browser never holds the API token: the login form posts it once, kmd checks it and
answers with a random session id in a cookie (`HttpOnly`: no script reads it;
`SameSite=Strict`: no other site's page sends it; `Secure` over HTTPS; path `/ui`).
Every form carries the session's CSRF token, checked on every write. Sessions live in
this process's memory: a restart, a logout, or a change of the API token ends them.

Before a session exists, the login form is protected by a double-submit token: a
random value in its own cookie and in the form, which must match. Failed logins are
throttled (`LoginThrottle`): a few a minute per address, then 429 with Retry-After.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
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


class LoginThrottle:
    """Failed logins, counted per client address and over all addresses: a token guessed
    by brute force gets a handful of tries a minute, not thousands.

    After `per_address` failures within `window` seconds an address is refused (the form
    answers 429 with Retry-After) until its oldest failure is older than the window; after
    `overall` failures from all addresses together (guessing spread over many), everyone is.
    A successful login clears its address's count."""

    def __init__(self, per_address: int = 5, overall: int = 50, window: float = 60.0) -> None:
        self.per_address, self.overall, self.window = per_address, overall, window
        self._failures: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> int | None:
        """Seconds this address must wait before it may try again (None: it may try now)."""
        now = time.monotonic()
        with self._lock:
            self._forget(now)
            waits = [times[0] + self.window - now for times, limit in ((self._failures.get(address, ()), self.per_address),
                                                                       (self._all, self.overall)) if len(times) >= limit]  # fmt: skip
        return max(1, math.ceil(max(waits))) if waits else None

    def failed(self, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._failures.setdefault(address, deque()).append(now)
            self._all.append(now)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)

    def _forget(self, now: float) -> None:
        horizon = now - self.window
        while self._all and self._all[0] < horizon:
            self._all.popleft()
        for address in [a for a, times in self._failures.items() if not times or times[-1] < horizon]:
            del self._failures[address]  # a quiet address is forgotten whole
        for times in self._failures.values():
            while times and times[0] < horizon:
                times.popleft()
