"""LLP's serving hooks: the retrieval decision on the prefill, the prefix merged at layers >= z.

Per forward (one `Routing` context, its entry `decisions["llp"]`):

- before the model runs (`_ids_hook`): the token ids; on the prefill, the tokens retrieval
  reads (a chat turn's user message) and those messages' states run alone; on a decode
  step, the new tokens for the routed rows' answer tracking;
- after each retrieval layer (`_retrieval_hook`): its output; after the last one the rows
  are routed (`RoutedEditor.routed_edits`) and the routed rows get their edit's prefix (`_decide`);
- at layers >= z (`PrefixInjector`): the routed rows' prefix merged into attention; at the
  LM head: the answer pointer.

Decode steps reuse the prefill's decision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch

from kmd.editors.answer_stop import RoutedAnswers, TokenTexts, pointer_hook
from kmd.editors.chat import Turns
from kmd.editors.hooks import HookSpec
from kmd.editors.llp.config import LlpConfig
from kmd.editors.llp.statistics import RetrievalReader
from kmd.editors.prefix import Injection, PrefixInjector, answers_of
from kmd.editors.protocol import Routing

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost

Questions = Callable[[list[int]], list[str]]  # rows of the batch -> their questions (the question check)


class RoutedEditor(Protocol):
    """What the serving hooks need from the LLP editor (kmd.editors.llp.editor)."""

    name: str
    config: LlpConfig

    def routing(self) -> Routing:
        """The routing context of the forward in progress."""

    def user_turns_alone(self, turns: Turns, device: torch.device) -> dict[str, torch.Tensor] | None:
        """The chat-turn rows' states with their messages run alone (None: read in context)."""

    def routed_edits(self, states: torch.Tensor, read_mask: torch.Tensor, alone: dict[str, torch.Tensor] | None,
              questions: Questions | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(|R|, B, T, D) retrieval-layer states -> per row (edit row, hit), each (B,)."""

    def prefix_of(self, edits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M,) edit rows -> their prefix keys (pre-RoPE) and values, each (M, |z..|, b, n_kv, hd)."""

    def targets_of(self, edits: torch.Tensor) -> list[str]:
        """(M,) edit rows -> each edit's target ("" for an edit being applied)."""


class ServingHooks:
    """The hooks that make the stored edits act. Built each time the editor installs its
    hooks, for that editor (a fork builds its own); everything per forward lives in the
    routing context."""

    def __init__(self, owner: RoutedEditor, host: ModelHost, reader: RetrievalReader, injector: PrefixInjector,
                 answer_texts: TokenTexts) -> None:  # fmt: skip
        self.owner = owner
        self.host = host
        self.reader = reader
        self.injector = injector
        self.answer_texts = answer_texts

    def specs(self) -> list[HookSpec]:
        """Token ids first, then the retrieval layers, the prefix merge at layers >= z, the pointer."""
        last = len(self.reader.retrieval) - 1
        retrieval = [
            HookSpec(self.reader.layer_paths[layer], self._retrieval_hook(i, i == last), "forward", with_kwargs=True)
            for i, layer in enumerate(self.reader.retrieval)
        ]
        pointer = HookSpec(self.host.profile.layout.lm_head, pointer_hook(lambda: answers_of(self.current())))
        return [HookSpec("", self._ids_hook, "forward_pre", with_kwargs=True), *retrieval,
                *self.injector.specs(self.current), pointer]  # fmt: skip

    def current(self) -> Injection | None:
        """The routed rows' prefixes in the forward in progress (None: no row routed yet)."""
        decision = self.owner.routing().decisions.get(self.owner.name)
        return decision["injection"] if decision else None

    def _decision(self) -> dict[str, Any]:
        routing = self.owner.routing()
        decision = routing.decisions.get(self.owner.name)
        if decision is None:
            decision = routing.decisions[self.owner.name] = {"states": {}, "injection": None, "done": False, "ids": None}
        return decision

    def _ids_hook(self, module, args, kwargs):
        """The token ids of each forward: retrieval reads a chat turn's user tokens only, and
        what a routed row has written so far decides where its edit stops acting."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        decision = self._decision()
        if not decision["done"]:
            decision["ids"] = ids  # the prefill (or a full forward): read in _decide
            if ids is not None:  # before the forward: what retrieval reads; chat turns' messages run alone
                mask = self.owner.routing().mask_for(*ids.shape, ids.device)
                turns = self.host.chat.turns(ids, mask)
                decision["users"] = turns.mask
                decision["alone"] = self.owner.user_turns_alone(turns, ids.device)
        elif decision["injection"] is not None and ids is not None:
            decision["injection"].decode_step(ids)
        return None

    def _retrieval_hook(self, index: int, last: bool):
        def hook(module, args, kwargs, output):
            routing = self.owner.routing()
            decision = self._decision()
            if decision["done"]:
                return None  # a decode step: the prefill decided
            hidden = output[0] if isinstance(output, tuple) else output
            decision["states"][index] = hidden
            if last:
                self._decide(routing, decision, kwargs.get("position_ids"))
            return None

        return hook

    @torch.no_grad()
    def _decide(self, routing: Routing, decision: dict[str, Any], position_ids: torch.Tensor | None) -> None:
        states = self.reader.stacked(decision.pop("states"))  # (|R|, B, T, D)
        _, batch, seq, _ = states.shape
        device = states.device
        mask = routing.mask_for(batch, seq, device)
        ids = decision.pop("ids", None)
        retrieval_mask = decision.pop("users", None)
        retrieval_mask = mask if retrieval_mask is None else retrieval_mask  # (B, T): a chat turn's user tokens
        questions = None if ids is None else (lambda rows: self.host.chat.questions(ids, mask, rows))
        best, hit = self.owner.routed_edits(states, retrieval_mask, decision.pop("alone", None), questions)
        decision["done"] = True
        rows = hit.nonzero().squeeze(1)
        if not len(rows):
            return
        if position_ids is None:
            position_ids = torch.arange(seq, device=device)[None]
        position_ids = position_ids.expand(batch, seq)
        first = mask.int().argmax(dim=1)  # first prompt token of each row
        p_first = position_ids[torch.arange(batch, device=device), first]
        edits = best[rows]
        keys, values = self.owner.prefix_of(edits)
        injection = decision["injection"] = Injection(rows=rows, keys=keys, values=values, p_first=p_first[rows])
        if ids is not None:
            last = routing.last_prompt_index(batch, seq, device)[rows]
            injection.answers = RoutedAnswers.start(self.answer_texts, self.owner.config.answer, rows,
                                                    self.owner.targets_of(edits), ids, last)  # fmt: skip
