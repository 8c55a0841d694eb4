"""The review console: server-rendered pages at /ui, in the API process (see routes.py)."""

from kmd.daemon.console.routes import console_router

__all__ = ["console_router"]
