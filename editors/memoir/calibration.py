"""Calibrating MEMOIR's retrieval threshold tau from data, for one model.

For N edit records (use a training split, not the set you benchmark on) every prompt
becomes a stored edit mask, exactly as `_apply` would compute it. Then:

- a rephrase is *retrieved* at tau when its own edit has the largest overlap among all N
  masks and that overlap is >= tau (what `gen` needs);
- a locality prompt *fires* at tau when its largest overlap with any of the N masks is
  >= tau (each firing can change an answer that must not change).

Both rates fall as tau grows. tau is the smallest value on a 0.01 grid whose firing rate
is at most `max_false` (default 1 %), so generalisation is as high as locality allows.
The masks depend only on the model, the layer, k, the background and the permutation
seed, so the result is deterministic for a given model, data file and config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from kmd.editors.memoir.editor import MemoirEditor

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost

__all__ = ["calibrate", "calibrate_tau"]


def calibrate(host: ModelHost, records: Sequence[Any], *, progress: Any = None, **overrides: Any) -> dict[str, Any]:
    """`kmd calibrate --backend memoir` (the calibrator contract: kmd.editors.registry): tau
    from data (`calibrate_tau`). Returns {"options": {"tau": ...}, "report": {...}} for
    the model's profile."""
    editor = MemoirEditor(host, MemoirEditor.default_config(host, **overrides))
    report = calibrate_tau(editor, records, progress=progress)
    return {"options": {"tau": report["tau"]}, "report": report}


def _fields(record: Any) -> tuple[str, list[str], list[str]]:
    """(prompt, rephrases, locality prompts) of an EditRecord (bench) or an EditRequest."""
    rephrases = list(getattr(record, "rephrases", ()) or ())
    loc = getattr(record, "loc_prompt", None)
    locality = [loc] if loc else list(getattr(record, "locality", ()) or ())
    return record.prompt, rephrases, locality


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    if values.numel() == 0:
        return {}
    qs = torch.tensor([0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99])
    return {f"q{int(q * 100):02d}": round(float(v), 4) for q, v in zip(qs, values.float().quantile(qs), strict=True)}


@torch.no_grad()
def calibrate_tau(
    editor: MemoirEditor, records: Sequence[Any], max_false: float = 0.01, progress: Any = None
) -> dict[str, Any]:
    notify = progress or (lambda phase, done, total: None)
    notify("statistics", 0, 1)
    editor.ensure_statistics()
    notify("statistics", 1, 1)
    fields = [_fields(r) for r in records]
    prompts = [p for p, _, _ in fields]
    rephrases = [(i, r) for i, (_, rs, _) in enumerate(fields) for r in rs]
    locality = [loc for _, _, locs in fields for loc in locs]
    if not prompts or not locality:
        raise ValueError("memoir calibration needs records with a prompt and locality prompts")

    notify("masks", 0, 3)
    masks = editor.tophash(editor.prompt_features(prompts))  # (N, k): the stored edit masks
    owners = editor.membership(masks)
    notify("masks", 1, 3)

    def overlaps(texts: list[str]) -> torch.Tensor:
        return editor.membership(editor.tophash(editor.prompt_features(texts))) @ owners.T / editor.k

    # Without rephrases (long-form sets) tau rests on locality alone; gen_retrieved is then 0.
    reph = overlaps([r for _, r in rephrases]) if rephrases else torch.empty(0, len(prompts))  # (R, N)
    notify("masks", 2, 3)
    owner = torch.tensor([i for i, _ in rephrases], dtype=torch.long)
    own = reph[torch.arange(len(rephrases)), owner]
    others = reph.clone()
    others[torch.arange(len(rephrases)), owner] = -1.0
    best_other = others.max(1).values if len(prompts) > 1 else torch.full_like(own, -1.0)
    loc_best = overlaps(locality).max(1).values  # (L,)
    notify("masks", 3, 3)
    prompt_other = owners @ owners.T / editor.k
    prompt_other.fill_diagonal_(-1.0)  # nearest *other* edit prompt (-1 with a single record)

    grid = [round(0.01 * t, 2) for t in range(1, 101)]
    sweep = []
    for tau in grid:
        sweep.append(
            {
                "tau": tau,
                "gen_retrieved": float(((own >= tau) & (own >= best_other)).float().mean()) if rephrases else 0.0,
                "loc_fired": float((loc_best >= tau).float().mean()),
            }
        )
    allowed = [s for s in sweep if s["loc_fired"] <= max_false]
    chosen = allowed[0] if allowed else sweep[-1]
    return {
        "tau": chosen["tau"],
        "rule": f"smallest tau (0.01 grid) with at most {max_false:.0%} of locality prompts firing",
        "n_records": len(prompts),
        "n_rephrases": len(rephrases),
        "n_locality": len(locality),
        "k": editor.k,
        "layer": editor.layer,
        "at_choice": chosen,
        "rephrase_own_overlap": _quantiles(own),
        "rephrase_best_other_overlap": _quantiles(best_other),
        "rephrase_own_is_best": float((own >= best_other).float().mean()) if rephrases else None,
        "locality_best_overlap": _quantiles(loc_best),
        "prompt_nearest_other_overlap": _quantiles(prompt_other.max(1).values),
        "sweep": [s for s in sweep if round(s["tau"] * 100) % 5 == 0],
    }
