"""`kmd backends`: what editing backends exist."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("backends", help="List the registered editing backends.")(backends)


def backends() -> None:
    from kmd.editors.registry import backend_names

    for name in backend_names():
        typer.echo(name)
