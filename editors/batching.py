"""Token batches for teacher forcing (right-padded) and generation (left-padded)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class TeacherForcedBatch:
    """`prompt + " " + target` rows, right-padded, with the target positions spelled out.

    The logit at position p predicts token p + 1, so target token t of a row is scored
    at position t - 1. K is the total number of target tokens in the batch.
    """

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    prompt_mask: torch.Tensor  # (B, T) bool: prompt tokens (what retrieval may look at)
    rows: torch.Tensor  # (K,) row of each target token
    positions: torch.Tensor  # (K,) position whose logits predict it
    labels: torch.Tensor  # (K,) the target token ids
    spans: list[tuple[int, int]]  # per row: [start, end) into the K axis

    def per_row(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Split a (K, ...) tensor into one piece per row."""
        return [values[a:b] for a, b in self.spans]


def teacher_forced_batch(host: ModelHost, pairs: Sequence[tuple[str, str]]) -> TeacherForcedBatch:
    return teacher_forced_batch_ids(host, [host.encode_pair(prompt, target) for prompt, target in pairs])


def teacher_forced_batch_ids(host: ModelHost, encoded: Sequence[tuple[list[int], list[int]]]) -> TeacherForcedBatch:
    """The same from token ids: (prompt ids, target ids) per row."""
    width = max(len(p) + len(t) for p, t in encoded)
    pad = host.tokenizer.pad_token_id
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    prompt_mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    rows, positions, labels, spans = [], [], [], []
    for row, (prompt_ids, target_ids) in enumerate(encoded):
        full = prompt_ids + target_ids
        ids[row, : len(full)] = torch.tensor(full)
        attention[row, : len(full)] = 1
        prompt_mask[row, : len(prompt_ids)] = True
        start = len(labels)
        for offset, token in enumerate(target_ids):
            rows.append(row)
            positions.append(len(prompt_ids) + offset - 1)
            labels.append(token)
        spans.append((start, len(labels)))
    device = host.device
    return TeacherForcedBatch(
        input_ids=ids.to(device),
        attention_mask=attention.to(device),
        prompt_mask=prompt_mask.to(device),
        rows=torch.tensor(rows, device=device),
        positions=torch.tensor(positions, device=device),
        labels=torch.tensor(labels, device=device),
        spans=spans,
    )


def left_padded(host: ModelHost, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, left-padded so every row's prompt ends at T - 1."""
    return left_padded_ids(host, [host.encode(host.format_prompt(p)) for p in prompts])


def left_padded_ids(host: ModelHost, encoded: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from token ids."""
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), host.tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens) :] = torch.tensor(list(tokens), dtype=torch.long)
        attention[row, width - len(tokens) :] = 1
    return ids.to(host.device), attention.to(host.device)
