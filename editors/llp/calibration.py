"""Calibrate LLP's retrieval thresholds (similarity, vote fraction) for a model, from data.

    kmd calibrate --backend llp --data ../shared/data/zsre-train.json --limit 1000

1. The first records (all but a held-out share) get keys, built exactly as `apply` builds
   them (prefixed prompts, last subject token, InfoNCE against the keys before them), in
   order, without values: only retrieval is calibrated.
2. Every edited record's prompt and rephrases, every record's locality prompt and the
   held-out records' prompts (unrelated questions of the same style) are scored once:
   per retrieval layer, each key's max cosine over the prompt tokens.
3. Thresholds are per retrieval layer: for a per-layer false-positive rate r (a grid from
   0.05 % to 50 %), layer l's threshold is the (1 - r) quantile of the best key similarity
   of the unrelated prompts (locality + held-out) at l; one threshold for all layers
   wastes the layers whose similarities are all high (on SmolLM2 layer 0's best key
   similarity is ~0.98 for almost any prompt, layer 5's ~0.76). For every vote count k
   of |R| and rate r the voting rule is applied and scored:

       J = (right_prompt + right_rephrase) / 2 - miss_cost * (false_loc + false_held_out) / 2

   where `right_*` is the share of an edit's own prompts that retrieve that edit, and
   `false_*` the share of unrelated prompts that retrieve anything. A false retrieval
   breaks an answer that was right, a missed one only leaves a fact stale, so
   `miss_cost` (default 3) weighs the former more. The chosen rate is the middle of the
   best plateau (all rates within 0.002 of the best J for that vote count). The unrelated
   prompts both set and test the thresholds (in-sample); the edited prompts and rephrases
   do not take part in choosing them except through J.

Deterministic for a given model, data and configuration (seeded prefixes and sampling).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from kmd.editors.llp.editor import LlpEditor
from kmd.editors.protocol import EditRequest

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost

Progress = Callable[[str, int, int], None]


def _max_sims(editor: LlpEditor, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    """(|R|, P, N) max cosine of every key over each prompt's tokens."""
    out = [editor.prompt_similarities(list(prompts[start : start + batch_size]))
           for start in range(0, len(prompts), batch_size)]  # fmt: skip
    return torch.cat(out, dim=1)


def _decide(top: torch.Tensor, index: torch.Tensor, n: int, tau: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The voting rule of `LlpEditor.vote` (voting.vote_over_layers) on precomputed top-k: (best, hit) per prompt; tau (|R|,)."""
    nr, p, k = top.shape
    ok = (top > tau[:, None, None]).float()
    flat = index.permute(1, 0, 2).reshape(p, nr * k)
    votes = torch.zeros(p, n).scatter_add_(1, flat, ok.permute(1, 0, 2).reshape(p, -1))
    total = torch.zeros(p, n).scatter_add_(1, flat, (top.clamp(min=-1) * ok).permute(1, 0, 2).reshape(p, -1))
    best = (votes * 4 + total / nr).argmax(dim=1)
    return best, votes.gather(1, best[:, None]).squeeze(1) >= need


# Per-layer false-positive rates tried: each layer's threshold is the (1 - rate) quantile of
# the best key similarity of the unrelated prompts (locality + held-out) at that layer.
RATES = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


def calibrate(
    host: ModelHost,
    records: Sequence[Any],
    *,
    held_out: float = 0.25,
    miss_cost: float = 3.0,
    batch_size: int = 16,
    progress: Progress | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    notify = progress or (lambda phase, done, total: None)
    started = time.perf_counter()
    editor = LlpEditor(host, LlpEditor.default_config(host, **overrides))
    records = list(records)
    n_edit = max(1, round(len(records) * (1 - held_out)))
    edited, others = records[:n_edit], records[n_edit:]

    for index, record in enumerate(edited):
        edit_id = f"calibration-{index}"
        request = EditRequest(prompt=record.prompt, target=record.target, subject=record.subject)
        queries, context, _ = editor.key_queries(edit_id, request)
        editor.append_key(edit_id, editor.train_key(queries, context))
        notify("keys", index + 1, len(edited))

    groups: dict[str, tuple[list[str], list[int]]] = {
        "prompt": ([r.prompt for r in edited], list(range(len(edited)))),
        "rephrase": ([p for r in edited for p in r.rephrases], [i for i, r in enumerate(edited) for _ in r.rephrases]),
        "loc": ([r.loc_prompt for r in records], [-1] * len(records)),
        "held_out": ([r.prompt for r in others], [-1] * len(others)),
    }
    tops = {}
    for done, (name, (prompts, owners)) in enumerate(groups.items(), 1):
        if prompts:
            sims = _max_sims(editor, prompts, batch_size)
            k = min(editor.config.top_k, sims.shape[-1])
            top, index = sims.topk(k, dim=-1)
            tops[name] = (top.cpu(), index.cpu(), torch.tensor(owners))
        notify("scoring", done, len(groups))

    nr, n = len(editor.retrieval), len(editor.row_ids)
    unrelated = torch.cat([tops[g][0][:, :, 0] for g in ("loc", "held_out") if g in tops], dim=1)  # (|R|, U)
    table: dict[int, list[dict[str, Any]]] = {}
    for votes_needed in range(1, nr + 1):
        rows = []
        for rate in RATES:
            tau = torch.quantile(unrelated, 1 - rate, dim=1)
            rates = {}
            for name, (top, index, owners) in tops.items():
                best, hit = _decide(top, index, n, tau, votes_needed)
                if name in ("prompt", "rephrase"):
                    rates[f"right_{name}"] = float((hit & (best == owners)).float().mean())
                    rates[f"wrong_{name}"] = float((hit & (best != owners)).float().mean())
                else:
                    rates[f"false_{name}"] = float(hit.float().mean())
            right = (rates.get("right_prompt", 0.0) + rates.get("right_rephrase", rates.get("right_prompt", 0.0))) / 2
            false = (rates.get("false_loc", 0.0) + rates.get("false_held_out", rates.get("false_loc", 0.0))) / 2
            rows.append({"layer_rate": rate, "J": right - miss_cost * false, **rates, "tau": [round(float(t), 4) for t in tau]})
        table[votes_needed] = rows

    best_row, best_votes = None, 0
    for votes_needed, rows in table.items():
        top_j = max(r["J"] for r in rows)
        plateau = [r for r in rows if r["J"] >= top_j - 0.002]
        middle = plateau[len(plateau) // 2]  # the grid is sorted, the plateau usually contiguous
        if best_row is None or middle["J"] > best_row["J"] + 1e-9:
            best_row, best_votes = middle, votes_needed
    assert best_row is not None
    fraction = round(best_votes / nr, 4)
    if math.ceil(fraction * nr - 1e-9) != best_votes:  # guard against rounding changing the rule
        fraction = round((best_votes - 0.5) / nr, 4)
    summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in best_row.items()}
    return {
        "options": {"layer_similarity": best_row["tau"], "vote_fraction": fraction},
        "report": {
            "retrieval_layers": editor.retrieval,
            "injection_layer": editor.z,
            "keys": n,
            "held_out_prompts": len(others),
            "loc_prompts": len(records),
            "votes_needed": best_votes,
            "at_choice": summary,
            "miss_cost": miss_cost,
            "overrides": overrides,
            "seconds": round(time.perf_counter() - started, 1),
            "curves": {
                str(v): [{k: (round(x, 4) if isinstance(x, float) else x) for k, x in r.items() if k != "tau"} for r in rows]
                for v, rows in table.items()
            },
        },
    }
