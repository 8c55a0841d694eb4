"""The protected minimum-norm change of a linear memory (MEMOIR's and WISE's `update: min_norm`).

A memory read as `out = A @ X` (A: inputs, one row per token; X: the memory) is edited by
optimising X; the optimised change `delta` is then replaced, in closed form, by the change D
of least tr(D^T K D) that gives the same output on the edit's own tokens (A D = A delta),
with K = I + protect * G / e: G is the Gram matrix of the inputs that earlier edits read
through the same memory entries, e the mean squared norm of one row of A. D lies in the
span of A, and with protect > 0 it avoids the directions earlier edits read, so it changes
their outputs far less than the optimiser's own change would (docs/editors.md, MEMOIR,
"Interference between edits").

Everything here is batched over leading dimensions (WISE solves one system per output row,
each over that row's own masked entries).
"""

from __future__ import annotations

import torch


def span_basis(keys: torch.Tensor, gram: torch.Tensor | None, protect: float) -> torch.Tensor:
    """(..., n, k) rows B = A (I + protect * G / e)^-1, scaled so that mean diag(A B^T) = 1.

    keys A (..., n, k) and gram G (..., k, k), float64.
    """
    if protect > 0 and gram is not None:
        energy = keys.pow(2).sum(-1).mean(-1).clamp_min(1e-12)[..., None, None]
        eye = torch.eye(keys.shape[-1], dtype=keys.dtype, device=keys.device)
        system = eye + protect * gram.to(keys.dtype) / energy  # symmetric
        basis = torch.linalg.solve(system, keys.mT).mT  # A K^-1
    else:
        basis = keys
    gain = (keys * basis).sum(-1).mean(-1).clamp_min(1e-12)[..., None, None]
    return basis / gain


def min_norm_change(
    keys: torch.Tensor, outputs: torch.Tensor, gram: torch.Tensor | None = None, protect: float = 0.0
) -> torch.Tensor:
    """(..., k, d) the change D = B^T C of least tr(D^T K D) with A D = `outputs` (..., n, d).

    `outputs` is normally A @ delta, delta being the optimiser's change. A small ridge keeps
    the n x n system well posed (with long targets n exceeds k and it is singular but for it).
    """
    keys = keys.double()  # float64 for the same reason
    basis = span_basis(keys, gram, protect)  # (..., n, k)
    system = keys @ basis.mT  # (..., n, n)
    eye = torch.eye(system.shape[-1], dtype=system.dtype, device=system.device)
    ridge = 1e-4 * system.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * eye
    coefficients = torch.linalg.solve(system + ridge, outputs.double())  # (..., n, d)
    return (basis.mT @ coefficients).float()
