"""LLP's retrieval decision: key similarities per retrieval layer, then a vote over the layers.

At every layer l in R each key's similarity to a row is its maximum cosine over the row's
prompt tokens (`max_similarities`); the `top_k` keys above l's threshold get one vote each.
The key with the most votes (ties: the larger summed similarity) is the row's edit when it
has at least `ceil(vote_fraction * |R|)` of them (`vote_over_layers`). The question check
then gets it and the next keys with enough votes (`runners_up`, `LlpConfig.runners_up`;
the order: `LlpEditor.candidates`).

Against many keys the similarities cost more than the model's own forward (10,100 keys: 8
layers x 10,100 x 576 multiply-adds per prompt token). Only a key whose cosine exceeds its
layer's threshold can vote, and one below every threshold cannot push a voter out of the
top k either, so `shortlisted_max_similarities` computes the exact cosine only for keys an
upper bound cannot rule out: with P (D, p) orthonormal, for unit q and k

    q . k = (P^T q) . (P^T k) + r_q . r_k  <=  (P^T q) . (P^T k) + |r_q| |r_k|

(r: the parts outside P's span; P: the keys' top-p principal directions, `key_basis`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kmd.editors.llp.config import LlpConfig
from kmd.editors.protocol import runners_up_of


def max_similarities(standardized: torch.Tensor, prompt_mask: torch.Tensor, unit_keys: torch.Tensor) -> torch.Tensor:
    """(|R|, B, T, D) standardised states, (B, T) the tokens to read, (|R|, N, D) unit keys
    -> (|R|, B, N): each key's max cosine over each row's read tokens."""
    nr, batch, seq, d = standardized.shape
    unit = F.normalize(standardized, dim=-1)
    sims = torch.bmm(unit.view(nr, batch * seq, d), unit_keys.transpose(1, 2)).view(nr, batch, seq, -1)
    sims = sims.masked_fill(~prompt_mask[None, :, :, None], float("-inf"))
    return sims.amax(dim=2)


# Slack on the bound for float rounding (the cosines it rules out are below ~0.9 thresholds).
BOUND_MARGIN = 1e-3


def key_basis(unit_keys: torch.Tensor, rank: int) -> torch.Tensor:
    """(|R|, N, D) unit keys -> (|R|, D, p) orthonormal columns: each layer's top-p
    principal directions of its keys (uncentred). Any orthonormal basis keeps the bound
    exact; this one makes it tight."""
    gram = unit_keys.transpose(1, 2) @ unit_keys  # (|R|, D, D)
    _, vectors = torch.linalg.eigh(gram)  # eigenvalues ascending
    return vectors[..., -rank:].flip(-1).contiguous()


def key_bounds(unit_keys: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(|R|, N, D) unit keys, (|R|, D, p) basis -> (|R|, N, p + 2): per key [P^T k, |r_k|, 1]
    (the 1 carries a masked token's penalty in `shortlisted_max_similarities`)."""
    projected = unit_keys @ basis  # (|R|, N, p)
    residual = (unit_keys - projected @ basis.transpose(1, 2)).norm(dim=-1, keepdim=True)  # (|R|, N, 1)
    return torch.cat([projected, residual, torch.ones_like(residual)], dim=-1)


def shortlisted_max_similarities(standardized: torch.Tensor, prompt_mask: torch.Tensor, unit_keys: torch.Tensor,
                                 basis: torch.Tensor, bounds: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """`max_similarities` where only cosines above `floor` are needed: exact (up to float
    rounding) for every key whose max cosine over a row's read tokens exceeds floor[l] at
    layer l, -inf for keys the bound rules out. (|R|, B, T, D) states, (B, T) read tokens,
    (|R|, N, D) unit keys, (|R|, D, p) basis, (|R|, N, p + 2) `key_bounds`, (|R|,) floor
    -> (|R|, B, N). A layer where a quarter of the keys survive the bound is computed whole."""
    nr, batch, seq, d = standardized.shape
    n = unit_keys.shape[1]
    unit = F.normalize(standardized, dim=-1).view(nr, batch * seq, d)
    read = prompt_mask.reshape(1, batch * seq, 1).to(unit.dtype)  # (1, BT, 1)
    projected = unit @ basis  # (|R|, BT, p)
    residual = (unit - projected @ basis.transpose(1, 2)).norm(dim=-1, keepdim=True)  # (|R|, BT, 1)
    penalty = (read - 1.0).expand(nr, -1, -1) * 4.0  # unread tokens: -4, below any cosine
    query = torch.cat([projected * read, residual * read, penalty], dim=-1)  # (|R|, BT, p + 2)
    upper = torch.bmm(query, bounds.transpose(1, 2)).view(nr, batch, seq, n).amax(dim=2)  # (|R|, B, N)
    live = (upper > (floor.reshape(-1, 1, 1) - BOUND_MARGIN)).any(dim=1)  # (|R|, N): live in some row
    out = torch.full((nr, batch, n), float("-inf"), dtype=unit.dtype, device=unit.device)
    unread = ~prompt_mask.reshape(batch, seq, 1)
    for layer in range(nr):
        keys = live[layer].nonzero().flatten()  # (C,)
        if not len(keys):
            continue
        whole = len(keys) > n // 4
        chosen = unit_keys[layer] if whole else unit_keys[layer, keys]  # (C, D)
        sims = (unit[layer] @ chosen.T).view(batch, seq, -1).masked_fill(unread, float("-inf")).amax(dim=1)  # (B, C)
        if whole:
            out[layer] = sims
        else:
            out[layer][:, keys] = sims
    return out


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
    return runners_up_of(score[row], best, limit, votes[row] >= need)
