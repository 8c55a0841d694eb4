"""Who is calling the HTTP API: the bearer token check, the read and write dependencies, and
the caller whose generation budget a request spends.

Writes need `Authorization: Bearer <token>` (the token from the daemon config; with no
token configured, writes are refused). Reads are open unless `api.protect_reads` is set.
Generation budgets (`kmd.daemon.serving.Scheduler`) are per caller: `token` (the bearer
token, or a console session opened with it) and `anonymous` (everyone else).

The dependencies are coroutines: they touch no model, lock or database, so they run on the
event loop and never wait for a worker thread (generation can keep many requests open).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request

TOKEN_CALLER, ANONYMOUS_CALLER = "token", "anonymous"


def token_ok(request: Request) -> bool:
    """Does the request carry the API token as its bearer token?"""
    token = request.app.state.daemon.api_token
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if not token or scheme.lower() != "bearer":
        return False
    # Compare bytes: compare_digest refuses non-ASCII str (a 500 before). Header text is
    # the raw bytes decoded as latin-1, so this gets the bytes the client sent back.
    return hmac.compare_digest(given.strip().encode("latin-1", "replace"), token.encode("utf-8"))


def caller(request: Request) -> str:
    """The budget a generation request spends."""
    return TOKEN_CALLER if token_ok(request) else ANONYMOUS_CALLER


async def _writer(request: Request) -> None:
    if not request.app.state.daemon.api_token:
        raise HTTPException(403, "writes are disabled: no API token is configured")
    if not token_ok(request):
        raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})


async def _reader(request: Request) -> None:
    if request.app.state.daemon.settings.api.protect_reads and not token_ok(request):
        raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})


# Module level: with postponed annotations FastAPI resolves these names in module globals.
Read = Annotated[None, Depends(_reader)]
Write = Annotated[None, Depends(_writer)]
