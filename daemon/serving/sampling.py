"""Per-row sampling: every request keeps its own temperature, top_p and random generator.

Greedy rows (temperature 0) take the arg max, exactly what `generate` does (so batching
never changes their tokens); sampled rows go through transformers' own temperature and
top-p warpers and draw from their own `torch.Generator`, seeded by the request's `seed`
(repeatable) or at random, so no row's draws depend on the others in its batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # repeatable sampling


class RowSampler:
    """One request's sampler (its generator lives as long as the request)."""

    def __init__(self, sampling: Sampling, device: torch.device) -> None:
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        self.greedy = sampling.temperature <= 0
        self.warpers = LogitsProcessorList()
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(sampling.top_p))
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))

    def draw(self, logits: torch.Tensor) -> int:
        """logits (V,) float32 -> the next token."""
        scores = self.warpers(None, logits[None])  # (1, V)
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator))


def choose(logits: torch.Tensor, samplers: Sequence[RowSampler]) -> torch.Tensor:
    """logits (B, V) -> (B,) each row's next token by its own sampler."""
    tokens = logits.argmax(dim=-1)
    for row, sampler in enumerate(samplers):
        if not sampler.greedy:
            tokens[row] = sampler.draw(logits[row])
    return tokens
