"""Stop an edit acting once its answer has been written.

An edit's memory is trained to make the prompt continue with the target. Left acting on
every later position it keeps pushing the target: "Fredville villevilleville...". So a
row routed to an edit gets the edit only at positions whose continuation has not yet
stated the target: the prompt, and each generated (or teacher-forced) token up to the
one that completes the target's words. Past that point the row runs as the base model
(over a context whose earlier positions carry the edit), and writes on as the unedited
model would once the fact is stated.

The rule is a pure function of a row's token ids, so a full forward at every step and
KV-cache decode steps (which see one new token at a time) agree on every position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kmd.editors.answers import normalise


def _contains(words: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(words[i : i + n] == needle for i in range(len(words) - n + 1))


class AnswerTracker:
    """Per hit row: the tokens written after the prompt, and whether they state the target."""

    def __init__(self, tokenizer: Any, targets: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.needles = [normalise(t) for t in targets]  # per row: the target's words
        self.written: list[list[int]] = [[] for _ in targets]
        self.done = [False] * len(targets)

    def _push(self, row: int, token: int) -> bool:
        """Add one written token; True while the row is still answering (edit acts here)."""
        if not self.done[row]:
            self.written[row].append(token)
            needle = self.needles[row]
            if needle:
                text = self.tokenizer.decode(self.written[row], skip_special_tokens=True)
                self.done[row] = _contains(normalise(text), needle)
        return not self.done[row]

    def full(self, ids: torch.Tensor, last_prompt: torch.Tensor) -> torch.Tensor:
        """ids (Bh, T), last_prompt (Bh,) index of each row's last prompt token ->
        (Bh, T) bool: the positions where the edit acts (the prompt, then each written
        token up to and excluding the one that completes the target)."""
        active = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        rows = ids.tolist()
        for row, (tokens, last) in enumerate(zip(rows, last_prompt.tolist(), strict=True)):
            self.written[row], self.done[row] = [], False
            for position in range(last + 1, len(tokens)):
                active[row, position] = self._push(row, tokens[position])
        return active

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """A decode step: ids (Bh, t) new tokens -> (Bh, t) bool, as `full` would give."""
        active = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        for row, tokens in enumerate(ids.tolist()):
            for offset, token in enumerate(tokens):
                active[row, offset] = self._push(row, token)
        return active
