"""Per-backend set-up for the contract suite: options a backend needs before it can be built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from recipe_tiny import train_tiny_recipe


@pytest.fixture(scope="session")
def recipe_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    """A RECIPE editor trained for the tiny model on a few facts (seconds)."""
    result = train_tiny_recipe(tiny_model_dir, tmp_path_factory.mktemp("recipe"))
    assert result["last_validation"]["val_score"] == 1.0, result
    return Path(result["best"])


def backend_options(name: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """Options backend `name` cannot be built without (most need none)."""
    if name == "recipe":
        return {"checkpoint": str(request.getfixturevalue("recipe_checkpoint"))}
    return {}
