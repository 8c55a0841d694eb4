"""TIES merging of task vectors (Yadav et al., 2023), as WISE merges its knowledge shards."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def trim(task: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries of largest magnitude, zero the rest.

    Over the whole tensor, as in the original: a shard that trains a fraction r < density
    of the elements keeps all of them.
    """
    keep = int(round(density * task.numel()))
    if keep >= task.numel():
        return task
    if keep <= 0:
        return torch.zeros_like(task)
    flat = task.abs().flatten()
    cutoff = flat.kthvalue(flat.numel() - keep + 1).values  # the keep-th largest magnitude
    return torch.where(task.abs() >= cutoff, task, torch.zeros_like(task))


def ties_merge(tasks: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """Trim each task vector, elect one sign per element (sign of the summed trimmed
    values), and average the nonzero entries that agree with it (disjoint mean)."""
    if len(tasks) == 1:
        return tasks[0].clone()
    trimmed = torch.stack([trim(t, density) for t in tasks])  # (S, ...)
    sign = torch.sign(trimmed.sum(0))  # (...)
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(0)
    count = agree.sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
