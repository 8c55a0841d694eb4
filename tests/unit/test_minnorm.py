"""The protected minimum-norm change shared by MEMOIR and WISE (editors/minnorm.py)."""

from __future__ import annotations

import torch

from kmd.editors.minnorm import min_norm_change


def _problem(seed: int = 0, n: int = 5, k: int = 12, d: int = 3):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, k, generator=gen, dtype=torch.float64)
    delta = torch.randn(k, d, generator=gen, dtype=torch.float64)
    earlier = torch.randn(7, k, generator=gen, dtype=torch.float64)  # inputs earlier edits read
    return keys, delta, earlier


def test_same_output_on_the_edits_own_inputs_and_least_norm():
    keys, delta, _ = _problem()
    change = min_norm_change(keys, keys @ delta).double()
    assert torch.allclose(keys @ change, keys @ delta, atol=1e-3 * float((keys @ delta).abs().max()))  # up to the ridge
    # It lies in the span of the keys, so it is no larger than the optimiser's change.
    projector = keys.T @ torch.linalg.pinv(keys @ keys.T) @ keys
    assert torch.allclose(projector @ change, change, atol=1e-4)
    assert change.norm() <= delta.norm()


def test_protection_moves_the_change_away_from_earlier_inputs():
    keys, delta, earlier = _problem()
    gram = earlier.T @ earlier
    free = min_norm_change(keys, keys @ delta).double()
    protected = min_norm_change(keys, keys @ delta, gram, protect=100.0).double()
    assert torch.allclose(keys @ protected, keys @ delta, atol=1e-2)  # still the edit's output
    assert (earlier @ protected).norm() < 0.5 * (earlier @ free).norm()  # far less on earlier edits


def test_batched_equals_one_by_one():
    problems = [_problem(seed) for seed in range(3)]
    keys = torch.stack([p[0] for p in problems])
    outputs = torch.stack([p[0] @ p[1] for p in problems])
    grams = torch.stack([p[2].T @ p[2] for p in problems])
    batched = min_norm_change(keys, outputs, grams, protect=10.0)
    for i, (k, delta, earlier) in enumerate(problems):
        single = min_norm_change(k, k @ delta, earlier.T @ earlier, protect=10.0)
        assert torch.allclose(batched[i], single, atol=1e-5)
