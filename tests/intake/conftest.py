"""Fixtures for the intake tests: a real HTTP server on loopback and a fake clock."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from intake.helpers import Clock, LoopbackServer


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    srv = LoopbackServer()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()


@pytest.fixture
def clock() -> Clock:
    return Clock()
