"""LLP's retrieval decision: key similarities per retrieval layer, then a vote over the layers.

At every layer l in R each key's similarity to a row is its maximum cosine over the row's
prompt tokens (`max_similarities`); the `top_k` keys above l's threshold get one vote each.
The key with the most votes (ties: the larger summed similarity) is the row's edit when it
has at least `ceil(vote_fraction * |R|)` of them (`vote_over_layers`). When the question
check refuses that edit, the next keys with enough votes are offered to it in turn
(`runners_up`, `LlpConfig.runners_up`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kmd.editors.llp.config import LlpConfig


def max_similarities(standardized: torch.Tensor, prompt_mask: torch.Tensor, unit_keys: torch.Tensor) -> torch.Tensor:
    """(|R|, B, T, D) standardised states, (B, T) the tokens to read, (|R|, N, D) unit keys
    -> (|R|, B, N): each key's max cosine over each row's read tokens."""
    nr, batch, seq, d = standardized.shape
    unit = F.normalize(standardized, dim=-1)
    sims = torch.bmm(unit.view(nr, batch * seq, d), unit_keys.transpose(1, 2)).view(nr, batch, seq, -1)
    sims = sims.masked_fill(~prompt_mask[None, :, :, None], float("-inf"))
    return sims.amax(dim=2)


def layer_thresholds(config: LlpConfig, layers: int, device: torch.device) -> torch.Tensor:
    """(|R|,) similarity threshold per retrieval layer: `layer_similarity`, else `similarity` for all."""
    values = config.layer_similarity if config.layer_similarity is not None else [config.similarity] * layers
    return torch.tensor([float(v) for v in values], device=device)


def layer_votes(maxsims: torch.Tensor, tau: torch.Tensor, top_k: int, key_shifts: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(|R|, B, N) max similarities -> per row and key (votes, score), each (B, N): a key's
    votes are the layers where it is among the `top_k` and above the threshold; score ranks
    keys by votes, then by their summed similarity over those layers.
    tau: (|R|,) per layer or a scalar; key_shifts: (N,) added to the thresholds of each key."""
    nr, batch, n = maxsims.shape
    k = min(top_k, n)
    top, index = maxsims.topk(k, dim=-1)  # (|R|, B, k)
    tau = tau.reshape(-1, 1, 1) if tau.dim() else tau
    if key_shifts is not None:
        tau = tau + key_shifts[index]
    ok = (top > tau).float()
    flat_index = index.permute(1, 0, 2).reshape(batch, nr * k)
    votes = torch.zeros(batch, n, device=maxsims.device).scatter_add_(1, flat_index, ok.permute(1, 0, 2).reshape(batch, -1))
    total = torch.zeros(batch, n, device=maxsims.device).scatter_add_(
        1, flat_index, (top.clamp(min=-1) * ok).permute(1, 0, 2).reshape(batch, -1)
    )
    return votes, votes * 4 + total / nr  # most votes, then the highest similarity


def votes_needed(vote_fraction: float, layers: int) -> int:
    return max(1, math.ceil(vote_fraction * layers - 1e-9))


def vote_over_layers(maxsims: torch.Tensor, tau: torch.Tensor, top_k: int, vote_fraction: float,
         key_shifts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(|R|, B, N) max similarities -> per row (best key, its votes, hit), each (B,)."""
    votes, score = layer_votes(maxsims, tau, top_k, key_shifts)
    return decide(votes, score, votes_needed(vote_fraction, maxsims.shape[0]))


def decide(votes: torch.Tensor, score: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N) votes and score (`layer_votes`) -> per row (best key, its votes, hit), each (B,)."""
    best = score.argmax(dim=1)
    best_votes = votes.gather(1, best[:, None]).squeeze(1)
    return best, best_votes, best_votes >= need


def runners_up(votes: torch.Tensor, score: torch.Tensor, row: int, best: int, need: int, limit: int) -> list[int]:
    """The `limit` keys ranked next after `best` in row (by score), those of them that also
    have `need` votes. votes, score: (B, N) from `layer_votes`."""
    if limit < 1:
        return []
    top = score[row].topk(min(limit + 1, score.shape[1])).indices.tolist()  # not a sort of all N keys
    ranked = [key for key in top if key != best]
    return [key for key in ranked[:limit] if votes[row, key] >= need]
