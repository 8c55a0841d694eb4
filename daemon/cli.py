"""The `kmd` command line.

Each group of subcommands lives in its own module under `kmd.daemon.commands` (the
benchmarks under `kmd.daemon.bench`) and is registered here in one line; backends'
own commands (`kmd recipe train`) are discovered from the editor registry
(`commands/train.py`). Command bodies import heavy libraries (torch, transformers)
lazily so that `kmd --help` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

from kmd.daemon.commands import bench, demo, editors_cmd
from kmd.daemon.commands import intake_cmd, ledger_cmd
from kmd.daemon.commands import calibrate
from kmd.daemon.commands import run_cmd
from kmd.daemon.commands import question_check, train
from kmd.daemon.bench import loop as loop_bench, serve as serve_bench
from kmd.daemon.logs import configure_logging

app = typer.Typer(
    name="kmd",
    help="kmd: keep a deployed LLM's facts current with reversible, probed edits.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _global(
    log_level: Annotated[str, typer.Option(envvar="KMD_LOG_LEVEL", help="DEBUG, INFO, WARNING...")] = "INFO",
    log_json: Annotated[bool, typer.Option(envvar="KMD_LOG_JSON", help="One JSON object per log line.")] = False,
) -> None:
    configure_logging(log_level.upper(), log_json)


demo.register(app)
bench.register(app)
editors_cmd.register(app)
ledger_cmd.register(app)
intake_cmd.register(app)
calibrate.register(app)
run_cmd.register(app)
train.register(app)  # `kmd <backend> train` for every backend with a trainer
question_check.register(app)
loop_bench.register(app)
serve_bench.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
