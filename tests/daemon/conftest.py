from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from intake.helpers import LoopbackServer, Route, atom

from .ecosystem import ENTRIES, TOKEN, write_eco_setup


@pytest.fixture(scope="module")
def eco(tmp_path_factory, tiny_model_dir) -> Iterator:
    """A loaded daemon (in process, tiny model) after one cycle over the ecosystem feed:
    edit 'France capital Berlin' committed, the harmful edit reverted, two facts quarantined.
    Module-scoped (edits on CPU take seconds): tests that write go last in their module."""
    from kmd.daemon.service import Daemon
    from kmd.daemon.settings import load_settings
    from kmd.editors.model import ModelHost, ModelSettings

    tmp: Path = tmp_path_factory.mktemp("eco")
    server = LoopbackServer()
    server.routes["/feed.atom"] = Route(body=atom(ENTRIES))
    server.thread.start()
    saved = os.environ.get("KMD_TEST_TOKEN")
    os.environ["KMD_TEST_TOKEN"] = TOKEN
    host = ModelHost.load(ModelSettings(model=str(tiny_model_dir), device="cpu"))
    daemon = Daemon(load_settings(write_eco_setup(tmp, server.url("/feed.atom"))), host=host)
    daemon.load()
    daemon.cycle()
    try:
        yield daemon
    finally:
        daemon.close()
        server.httpd.shutdown()
        if saved is None:
            os.environ.pop("KMD_TEST_TOKEN", None)
        else:
            os.environ["KMD_TEST_TOKEN"] = saved
