"""A RECIPE editor trained for the tiny random Llama (seconds), shared by the contract and unit tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_recipe_records() -> list[Any]:
    """A few facts in the tiny model's vocabulary; the contract suite's probes are locality prompts."""
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


def train_tiny_recipe(model_dir: Path, out: Path, **options: Any) -> dict[str, Any]:
    import torch

    from kmd.editors.model import ModelHost, ModelSettings
    from kmd.editors.recipe.train import Trainer, TrainOptions

    host = ModelHost.load(ModelSettings(model=str(model_dir), device="cpu"))
    records = tiny_recipe_records()
    settings = dict(steps=200, batch_size=4, llm_batch=4, lr=3e-3, val_every=50, hidden=128, rep_dim=64) | options
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Trainer(host, records, records, out, TrainOptions(**settings)).run()
    finally:
        torch.set_num_threads(threads)
