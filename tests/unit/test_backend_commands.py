"""Backend subcommands are discovered from the editor registry, not hard-wired in the CLI."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from kmd.daemon.commands import train
from kmd.editors import registry


def test_backends_with_a_trainer_get_a_train_command():
    assert "recipe" in registry.trainer_backends()
    result = CliRunner().invoke(_app(), ["recipe", "train", "--help"])
    assert result.exit_code == 0 and "--data" in result.output and "RECIPE" in result.output


def test_a_registered_trainer_shows_up_without_touching_the_cli(monkeypatch):
    monkeypatch.setitem(registry._TRAINERS, "toy", "kmd.editors.recipe.train")
    result = CliRunner().invoke(_app(), ["toy", "train", "--help"])
    assert result.exit_code == 0 and "Train TOY" in result.output
    assert "toy" not in [n for n in registry.backend_names()]  # a trainer alone is not a backend


def test_the_kmd_cli_offers_recipe_train():
    from kmd.daemon.cli import app

    result = CliRunner().invoke(app, ["recipe", "--help"])
    assert result.exit_code == 0 and "train" in result.output


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    train.register(app)
    return app
