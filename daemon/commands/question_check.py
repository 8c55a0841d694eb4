"""`kmd question-check train`: train the question check the backends consult before an edit
answers a row (editors/question_check). It depends on the sentence encoder only, not on
the served model, so one trained file serves every base model; kmd ships one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kmd.daemon.commands.common import fail


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="The question check: does a question ask for the fact an edit changed?", no_args_is_help=True)
    group.command("train", help="Train the question check on edit datasets (ZsRE, KnowEdit) and kmd's relations file.")(train)
    app.add_typer(group, name="question-check")


def train(
    data: Annotated[list[Path], typer.Option(help="Training dataset (ZsRE or KnowEdit JSON), repeatable.")],
    out: Annotated[Path, typer.Option(help="Output folder: question-check.safetensors and the encoder cache.")],
    skip_first: Annotated[list[str] | None, typer.Option(help="FILE_NAME:N: leave out the first N records of that file "
                                                          "(the evaluated ones), repeatable.")] = None,
    config: Annotated[list[str] | None, typer.Option("--set", help="Training option KEY=VALUE (see CheckTrainOptions), repeatable.")] = None,
) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from kmd.daemon.commands.bench import parse_overrides
    from kmd.editors.bench.data import DatasetError
    from kmd.editors.profiles import ProfileError, build_config
    from kmd.editors.question_check.data import training_pairs
    from kmd.editors.question_check.train import CheckTrainOptions, train as run

    try:
        options = build_config(CheckTrainOptions, parse_overrides(config or []), "question-check train options")
        skip = {}
        for item in skip_first or []:
            name, sep, count = item.rpartition(":")
            if not sep or not name or not count.isdigit():
                raise ValueError(f"--skip-first expects FILE_NAME:N, got {item!r}")
            skip[name] = int(count)
        pairs = training_pairs(data, skip, options.relation_pairs, options.seed, options.cross_style)
    except (DatasetError, ProfileError, ValueError, OSError) as exc:
        raise fail(str(exc)) from exc
    columns = [TextColumn("question-check train"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn()]  # fmt: skip
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("train", total=options.epochs, info="")

        def progress(epoch: int, total: int, figures: dict[str, float]) -> None:
            bar.update(task, completed=epoch, info=f"validation balanced accuracy {figures['val_balanced_accuracy']:.4f}")

        try:
            result = run(pairs, out, options, progress, {"data": [str(p) for p in data], "skip_first": skip})
        except ValueError as exc:
            raise fail(str(exc)) from exc
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
