"""`kmd <backend> train`: train what a backend needs before it can edit (RECIPE's networks).

The commands are discovered, not hard-wired: every backend the editor registry lists with a
trainer (`kmd.editors.registry.trainer_backends`) gets a `<name> train` command here. The
trainer module is imported only when its command runs, so `kmd --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kmd.daemon.commands.common import ChatOpt, DeviceOpt, DtypeOpt, ModelOpt, ProfileOpt, fail, load_host


def register(app: typer.Typer) -> None:
    from kmd.editors.registry import trainer_backends

    for name in trainer_backends():
        group = typer.Typer(help=f"{name.upper()}: train the editor a base model needs before it can be edited.",
                            no_args_is_help=True)  # fmt: skip
        group.command("train", help=f"Train {name.upper()} for a base model; resumes when --out holds an interrupted run.")(
            _train_command(name)
        )
        app.add_typer(group, name=name)


def _train_command(backend: str):  # noqa: ANN202 - a typer command function
    def train(
        data: Annotated[Path, typer.Option(help="Training records (ZsRE or CounterFact JSON).")],
        out: Annotated[Path, typer.Option(help="Output folder: best.safetensors, last.safetensors, progress.json.")],
        val: Annotated[Path | None, typer.Option(help="Validation records (default: hold out --val-size training records).")] = None,
        limit: Annotated[int | None, typer.Option(min=2, help="Use the first N training records.")] = None,
        val_limit: Annotated[int, typer.Option(min=1, help="Validate on at most N records.")] = 200,
        format: Annotated[str | None, typer.Option("--format", help="zsre or counterfact (default: detect).")] = None,
        steps: Annotated[int, typer.Option(min=1, help="Optimisation steps.")] = 3000,
        max_minutes: Annotated[float | None, typer.Option(help="Stop (saving everything) after this much wall time.")] = None,
        val_every: Annotated[int, typer.Option(min=1, help="Validate and save every N steps.")] = 100,
        config: Annotated[list[str] | None, typer.Option("--set", help="Training option KEY=VALUE (see TrainOptions), repeatable.")] = None,
        model: ModelOpt = "embedded",
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = "auto",
        profile: ProfileOpt = None,
        chat_template: ChatOpt = False,
    ) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from kmd.daemon.commands.bench import parse_overrides
        from kmd.editors.bench.data import DatasetError, load_records
        from kmd.editors.profiles import ProfileError, build_config
        from kmd.editors.registry import get_trainer

        trainer_module = get_trainer(backend)
        try:
            _, records = load_records(data, format, limit)
            overrides = parse_overrides(config or []) | {"steps": steps, "max_minutes": max_minutes, "val_every": val_every}
            options = build_config(trainer_module.TrainOptions, overrides, f"{backend} train options")
            if val is not None:
                _, val_records = load_records(val, format, val_limit)
            else:
                records, val_records = trainer_module.split_validation(records, min(options.val_size, val_limit), options.seed)
        except (DatasetError, ProfileError, ValueError) as exc:
            raise fail(str(exc)) from exc
        host = load_host(model, device, dtype, profile, chat_template)
        trainer = trainer_module.Trainer(host, records, val_records, out, options)
        columns = [TextColumn(f"{backend} train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task("train", total=options.steps, info="")

            def progress(step: int, total: int, figures: dict[str, float]) -> None:
                shown = {k: figures[k] for k in ("loss", "val_score") if k in figures}
                bar.update(task, completed=step, info=" ".join(f"{k} {v:.3f}" for k, v in shown.items()))

            try:
                result = trainer.run(progress)
            except ValueError as exc:
                raise fail(str(exc)) from exc
        typer.echo(json.dumps(result, indent=1))
        typer.echo(f"use it with: --set checkpoint={result['best']} (or backends: {backend}: checkpoint: ... in the profile)")

    train.__name__ = f"{backend}_train"
    return train
