"""`kmd calibrate`: derive a backend's thresholds for a model from data.

A backend takes part by registering a calibrator module, as a trainer is registered
(`kmd.editors.registry`: `_CALIBRATORS`, or `register_backend(..., calibrator="module")`),
whose function

    def calibrate(host, records, *, progress=None, **overrides) -> dict

gets `kmd.editors.bench.data.EditRecord`s, reports progress as `progress(phase, done,
total)` and calibrates with the backend options `overrides` (`--set KEY=VALUE`). It
returns `{"options": {...}, "report": {...}}`: `options` are the backend options to put
under `backends: <name>:` in the model's profile, `report` is free-form evidence (rates
at the choice, curves). The command writes both to `--out` as YAML (the report as
comments), so a profile can say which command produced its values.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Annotated

import typer

from kmd.daemon.commands.common import ChatOpt, DeviceOpt, DtypeOpt, ModelOpt, ProfileOpt, fail, load_host


def register(app: typer.Typer) -> None:
    app.command("calibrate", help="Calibrate a backend's thresholds for the model from an edit dataset.")(calibrate)


def calibrate(
    backend: Annotated[str, typer.Option(help="Editing backend (see `kmd backends`).")],
    data: Annotated[Path, typer.Option(help="Dataset file (ZsRE, CounterFact, hallucination or temporal JSON).")],
    limit: Annotated[int | None, typer.Option(min=2, help="Use the first N records.")] = None,
    format: Annotated[str | None, typer.Option("--format", help="zsre, counterfact, hallucination or temporal (default: detect).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the options (and the report as comments) as YAML here.")] = None,
    config: Annotated[list[str] | None, typer.Option("--set", help="Backend option to calibrate with, KEY=VALUE (JSON value), repeatable.")] = None,
    seed: Annotated[int, typer.Option(help="torch seed.")] = 0,
    model: ModelOpt = "embedded",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    profile: ProfileOpt = None,
    chat_template: ChatOpt = False,
) -> None:
    import torch
    import yaml
    from loguru import logger

    from kmd.daemon.commands.bench import parse_overrides
    from kmd.editors.bench.data import DatasetError, load_records
    from kmd.editors.registry import UnknownBackendError, get_backend, get_calibrator

    try:
        get_backend(backend)  # an unknown name gets the registry's suggestions
        calibrator = get_calibrator(backend)
        _, records = load_records(data, format, limit)
        overrides = parse_overrides(config or [])
    except (UnknownBackendError, DatasetError, ValueError) as exc:
        raise fail(str(exc)) from exc
    host = load_host(model, device, dtype, profile, chat_template)
    torch.manual_seed(seed)

    def progress(phase: str, done: int, total: int) -> None:
        if done == total or done % max(total // 10, 1) == 0:
            logger.info("calibrate {}: {}/{}", phase, done, total)

    try:
        result = calibrator.calibrate(host, records, progress=progress, **overrides)
    except (ValueError, TypeError) as exc:
        raise fail(str(exc)) from exc
    options, report = result["options"], result.get("report", {})
    command = (
        f"kmd calibrate --backend {backend} --data {data}"
        + (f" --limit {limit}" if limit else "")
        + (f" --model {model}" if model != "embedded" else "")
        + "".join(f" --set {item}" for item in config or [])
    )
    header = [
        f"Produced by: {command}",
        f"Model: {host.identity.name} (fingerprint {host.identity.fingerprint[:16]}), date {datetime.date.today()}",
        "Report:",
        *json.dumps(report, indent=1, sort_keys=True).splitlines(),
    ]
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump({"backends": {backend: options}}, sort_keys=False)
    typer.echo(yaml.safe_dump({"backends": {backend: options}}, sort_keys=False).rstrip())
    summary = report.get("at_choice")
    if summary:
        typer.echo("at the choice: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        typer.echo(f"wrote {out}")
