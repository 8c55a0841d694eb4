"""Per-backend set-up for the contract suite: options a backend needs before it can be built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def tiny_recipe_records() -> list[Any]:
    """A few facts in the tiny model's vocabulary, with the suite's probes as locality prompts."""
    from kmd.editors.bench.data import EditRecord

    rows = [
        ("the capital of France is", "Berlin", "the capital city of France is", "the dog and the cat", "bird"),
        ("Alice works for the company", "banana", "Alice works for company", "who wrote the book ?", "Alice"),
        ("Carol plays for the team", "red", "Carol plays for team", "Bob speaks the language of Japan", "Tokyo"),
        ("Dave was born in the city", "Rome", "Dave was born in city", "the sun and the moon", "star"),
    ]
    return [
        EditRecord(case_id=str(i), prompt=p, target=t, subject=None, rephrases=(r,), loc_prompt=lp, loc_answer=la)
        for i, (p, t, r, lp, la) in enumerate(rows)
    ]


@pytest.fixture(scope="session")
def recipe_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    """A RECIPE editor trained for the tiny model on `tiny_recipe_records` (seconds)."""
    import torch

    from kmd.editors.model import ModelHost, ModelSettings
    from kmd.editors.recipe.train import Trainer, TrainOptions

    host = ModelHost.load(ModelSettings(model=str(tiny_model_dir), device="cpu"))
    records = tiny_recipe_records()
    out = tmp_path_factory.mktemp("recipe")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        options = TrainOptions(steps=200, batch_size=4, llm_batch=4, lr=3e-3, val_every=50, hidden=128, rep_dim=64)
        result = Trainer(host, records, records, out, options).run()
    finally:
        torch.set_num_threads(threads)
    assert result["last_validation"]["val_score"] == 1.0, result
    return Path(result["best"])


def backend_options(name: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """Options backend `name` cannot be built without (most need none)."""
    if name == "recipe":
        return {"checkpoint": str(request.getfixturevalue("recipe_checkpoint"))}
    return {}
