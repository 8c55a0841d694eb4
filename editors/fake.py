"""A fake backend for tests: an edit is a lookup table entry acting on the output logits.

Not an editing method. An edit is keyed on the token ids of its prompt: a row whose prompt
tokens end with them is made to predict the target, token by token, from the last prompt
token on (its logits become a one-hot vote for the target token there); every other row
is the base model's. Nothing is learned, so applying is instant and exact, and reverting
removes the entry. `fires_everywhere` makes an edit act on every row: a harmful edit, for
tests that the probes catch one (what GRACE needs an unbounded radius for).
`fires_on_subject` makes it act on every row whose prompt names its subject: an edit that
hijacks the other questions about its subject, for tests of the same-subject probe.
`weak` makes it act on no row at all: an edit that did not take, which the backend's
stronger retry (`stronger_overrides`, offered while `weak` is set) then makes act, for
tests of the maintainer's retry.

It obeys the editor protocol like every backend (the contract suite runs it too), so the
daemon's tests can run the whole loop on a tiny model without depending on one method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kmd.editors.hooks import HookSpec
from kmd.editors.protocol import EditorError, EditRequest, Editor
from kmd.editors.regroup import Regroup, entries

__all__ = ["FakeConfig", "FakeEditor"]

_VOTE = 30.0  # logit of the forced token; every other token gets -_VOTE


@dataclass(frozen=True)
class FakeConfig:
    """The fake backend's options (a relation's `editor_options` may set them too)."""

    fires_everywhere: bool = False  # the edits made with this set act on every row
    fires_on_subject: bool = False  # ... on every row whose prompt holds the edit's subject
    weak: bool = False  # ... on no row (they do not take); the stronger retry turns it off


class FakeEditor(Editor):
    name = "fake"
    config_class = FakeConfig

    def __init__(self, host, config: FakeConfig | None = None) -> None:
        super().__init__(host, config)
        self.lm_head = host.profile.layout.path("lm_head")
        self.row_ids: list[str] = []  # edit id of each entry, oldest first
        self.keys: list[tuple[int, ...]] = []  # prompt token ids of each entry
        self.targets: list[tuple[int, ...]] = []  # target token ids of each entry
        self.everywhere: list[bool] = []  # made with fires_everywhere
        self.subjects: list[tuple[tuple[int, ...], ...] | None] = []  # made with fires_on_subject: the subject's spellings
        self.weak: list[bool] = []  # made with weak: acts on no row

    def stronger_overrides(self) -> dict[str, Any]:
        """The one retry of an edit that did not take: while `weak` is set, without it."""
        return {"weak": False} if self.config.weak else {}

    # ----- the table ------------------------------------------------------------------------
    def _entry(self, request: EditRequest) -> tuple[tuple[int, ...], tuple[int, ...]]:
        prompt_ids, target_ids = self.host.encode_pair(request.prompt, request.target)
        key = tuple(self.host.encode(self.host.format_prompt(request.prompt), special=False)) or tuple(prompt_ids)
        if not target_ids:
            raise EditorError("fake: the target has no tokens")
        return key, tuple(target_ids)

    def _spellings(self, subject: str | None) -> tuple[tuple[int, ...], ...] | None:
        if not subject:
            return None
        return tuple(tuple(self.host.encode(text, special=False)) for text in (subject, " " + subject))

    def _add(self, edit_id: str, request: EditRequest, everywhere: bool, on_subject: bool, weak: bool) -> None:
        key, target = self._entry(request)
        self.row_ids.append(edit_id)
        self.keys.append(key)
        self.targets.append(target)
        self.everywhere.append(everywhere)
        self.subjects.append(self._spellings(request.subject) if on_subject else None)
        self.weak.append(weak)

    def _apply(self, edit_id: str, request: EditRequest) -> None:
        c = self.config
        self._add(edit_id, request, bool(c.fires_everywhere), bool(c.fires_on_subject), bool(c.weak))

    def _revert(self, edit_id: str) -> None:
        row = self.row_ids.index(edit_id)
        for column in (self.row_ids, self.keys, self.targets, self.everywhere, self.subjects, self.weak):
            del column[row]

    def _match(self, prompt: Sequence[int]) -> int | None:
        """The newest entry this prompt reaches (None: none)."""
        prompt = tuple(prompt)
        for row in range(len(self.row_ids) - 1, -1, -1):
            if self.weak[row]:
                continue
            key = self.keys[row]
            if self.everywhere[row] or (len(prompt) >= len(key) and prompt[len(prompt) - len(key) :] == key):
                return row
            if any(_contains(prompt, spelling) for spelling in self.subjects[row] or ()):
                return row
        return None

    # ----- serving ----------------------------------------------------------------------------
    def _hook_specs(self) -> list[HookSpec]:
        return [HookSpec("", self._capture_ids, kind="forward_pre", with_kwargs=True), HookSpec(self.lm_head, self._serve)]

    def _capture_ids(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # The logits hook needs the token ids of each forward (prompt tokens at the prefill,
        # and how many tokens went in: with `logits_to_keep` fewer positions come out).
        self.routing().decisions[f"{self.name}:ids"] = kwargs.get("input_ids", args[0] if args else None)

    def _serve(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        routing = self.routing()
        batch, seq, _ = output.shape  # (B, T_out, V): the last T_out input positions
        ids = routing.decisions.pop(f"{self.name}:ids", None)  # (B, T_in)
        seq_in = ids.shape[1] if ids is not None else seq
        positions = seq_in - seq + torch.arange(seq, device=output.device)  # (T_out,) input positions
        decision = routing.decisions.get(self.name)
        if decision is None:  # prefill: decide per row from its prompt tokens
            if ids is None:
                return None  # a forward on embeddings: nothing to match
            mask = routing.mask_for(batch, seq_in, output.device)  # (B, T_in)
            last = routing.last_prompt_index(batch, seq_in, output.device)  # (B,)
            rows = [self._match(ids[b][mask[b].to(ids.device)].tolist()) for b in range(batch)]
            relative = positions[None, :] - last[:, None]  # (B, T_out): 0 at the last prompt token
            decision = routing.decisions[self.name] = {"rows": rows, "next": seq_in - last}
        else:  # decode step with the KV cache: continue counting after the prompt
            relative = decision["next"][:, None] + positions[None, :]
            decision["next"] = decision["next"] + seq_in
        rows = decision["rows"]
        if all(r is None for r in rows):
            return None
        forced = output.clone()
        for b, row in enumerate(rows):
            if row is None:
                continue
            target = self.targets[row]
            for t in range(seq):
                r = int(relative[b, t])
                if 0 <= r < len(target):
                    forced[b, t] = -_VOTE
                    forced[b, t, target[r]] = _VOTE
        return forced

    def _regroup(self, how: Regroup, decisions: list[dict[str, Any]]) -> dict[str, Any]:
        """A regrouped batch (continuous batching): each row keeps its entry and its count."""
        mine = entries(decisions, self.name)
        if mine is None:
            return {}
        return {self.name: {"rows": how.dense_list([m["rows"] for m in mine]), "next": how.dense([m["next"] for m in mine])}}

    # ----- persistence ------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"everywhere": torch.tensor(self.everywhere, dtype=torch.bool),
                   "on_subject": torch.tensor([s is not None for s in self.subjects], dtype=torch.bool)}  # fmt: skip
        if any(self.weak):  # only then: states without weak edits stay as they were saved before
            tensors["weak"] = torch.tensor(self.weak, dtype=torch.bool)
        return tensors

    def extra_state(self) -> dict[str, Any]:
        return {"row_ids": self.row_ids}

    def _restore(self, requests: Sequence[EditRequest], tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        by_id = {r.edit_id: r for r in requests}
        row_ids = list(extra.get("row_ids", []))
        everywhere = tensors["everywhere"].bool().tolist() if "everywhere" in tensors else []
        on_subject = tensors["on_subject"].bool().tolist() if "on_subject" in tensors else [False] * len(everywhere)
        weak = tensors["weak"].bool().tolist() if "weak" in tensors else [False] * len(everywhere)
        if sorted(row_ids) != sorted(by_id) or not len(everywhere) == len(on_subject) == len(weak) == len(row_ids):
            raise EditorError("fake: saved entries do not match the saved edits")
        self.row_ids, self.keys, self.targets, self.everywhere, self.subjects, self.weak = [], [], [], [], [], []
        for edit_id, fires, subject, inert in zip(row_ids, everywhere, on_subject, weak, strict=True):
            self._add(edit_id, by_id[edit_id], bool(fires), bool(subject), bool(inert))


def _contains(tokens: tuple[int, ...], needle: tuple[int, ...]) -> bool:
    n = len(needle)
    return n > 0 and any(tokens[i : i + n] == needle for i in range(len(tokens) - n + 1))
