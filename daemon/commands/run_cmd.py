"""`kmd run`: the maintenance daemon (or one cycle with --once)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from loguru import logger

from kmd.daemon.commands.common import fail


def register(app: typer.Typer) -> None:
    app.command("run", help="Run the maintenance daemon (poll, verify, edit, probe, revert, serve the API).")(run)


def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="Daemon settings YAML (see deploy/kmd.yaml).")],
    once: Annotated[bool, typer.Option(help="Run one full cycle (all sources) and exit; no API server.")] = False,
    role: Annotated[str | None, typer.Option(help="writer | replica: overrides cluster.role in the settings.")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow the API on a non-loopback address with no token.")] = False,
) -> None:
    from pydantic import ValidationError
    from rich.console import Console

    from kmd.daemon.policy import PolicyError
    from kmd.daemon.service import Daemon, InsecureConfigError
    from kmd.daemon.settings import ClusterSettings, load_settings
    from kmd.editors.model import ModelNotFoundError
    from kmd.editors.registry import UnknownBackendError
    from kmd.editors.state import StateError

    try:
        settings = load_settings(config)
        if role is not None:
            cluster = ClusterSettings.model_validate(settings.cluster.model_dump() | {"role": role})
            settings = settings.model_copy(update={"cluster": cluster})
        daemon = Daemon(settings, insecure=insecure)
    except (PolicyError, UnknownBackendError, OSError, ValidationError, InsecureConfigError) as exc:
        raise fail(str(exc)) from exc
    try:
        if once:
            summary = daemon.run_once()
            console = Console()
            console.print(
                f"cycle: {summary.polled} sources polled, {summary.new_claims} new claims, {summary.new_facts} new facts; "
                f"edits committed {list(summary.committed)}, reverted {list(summary.reverted)}, "
                f"skipped facts {list(summary.skipped)}, regression reverts {list(summary.regression_reverts)} "
                f"({summary.seconds:.1f} s)"
            )
        else:
            code = daemon.serve_forever()
            if code:  # the writer role was lost: stop at once, edit in flight or not (like a crash)
                logger.complete()
                os._exit(code)
    except (ModelNotFoundError, StateError, RuntimeError) as exc:
        raise fail(str(exc)) from exc
