"""GRACE on a decoder's `mlp.down_proj` (see docs/methods.md).

Each edit owns one codebook row: key = the down_proj input at the last prompt token,
value = a learned down_proj output that replaces the real one at the positions that
predict the target (the last prompt token and the next len(target) - 1 tokens; after
that the model continues on its own instead of repeating the target). A query row uses
the nearest entry whose radius covers its key.

Radii are a pure function of the current entries: r_i = min(s_i * |k_i|, half the
distance to the nearest entry with a different target), where s_i is the radius fraction
the edit was made with. So GRACE's split/expand behaviour needs no history, and
reverting an edit leaves exactly the state the other edits alone would give. The halves
(N,) are kept up to date, not recomputed: an edit measures its key's distance to the N
others (O(N), not the O(N^2) of all pairs), a revert re-measures only the rows whose
nearest conflicting entry it was. Distances are taken pair by pair (`_distances`), so a
pair's distance has the same bits whenever and from whichever side it is measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from loguru import logger

from kmd.editors.answer_stop import RowPointer
from kmd.editors.batching import teacher_forced_batch
from kmd.editors.grace.config import GraceConfig
from kmd.editors.hooks import HookSpec, hooked, resolve_module
from kmd.editors.protocol import EditorError, EditRequest, Editor, Routing
from kmd.editors.regroup import Regroup, entries
from kmd.editors.rows import GrowingRows
from kmd.editors.scoring import module_input, prompt_inputs
from kmd.editors.upper import UpperStack


def _label(target: str) -> str:
    return " ".join(target.lower().split())


def _distances(keys: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(N,) Euclidean distance of `key` (d,) to each row of `keys` (N, d), pair by pair
    (not cdist's matrix-product form, whose bits depend on the other rows)."""
    return (keys - key).pow(2).sum(-1).sqrt()


class GraceEditor(Editor):
    name = "grace"
    config_class = GraceConfig

    def __init__(self, host, config: GraceConfig | None = None) -> None:
        super().__init__(host, config)
        n_layers = host.num_layers
        self.layer = self.config.layer if self.config.layer is not None else min(round(0.8 * n_layers), n_layers - 1)
        if not 0 <= self.layer < n_layers:
            raise EditorError(f"grace: layer {self.layer} outside 0..{n_layers - 1}")
        self.path = host.profile.layout.path("mlp_down", self.layer)
        down = resolve_module(host.model, self.path)
        device = host.device
        self.keys = torch.empty(0, down.in_features, device=device)  # (N, d_ff)
        self.values = torch.empty(0, down.out_features, device=device)  # (N, d_model)
        self.radii = torch.empty(0, device=device)  # (N,)
        self.halves = torch.empty(0, device=device)  # (N,) half the distance to the nearest entry with another target (inf: none)
        self.reach = torch.empty(0, device=device)  # (N,) s_i * |k_i|: the radius before any split
        self.spans = torch.empty(0, dtype=torch.long, device=device)  # (N,) target length in tokens
        self.scales = torch.empty(0, device=device)  # (N,) radius fraction each edit was made with
        self.splits = torch.empty(0, dtype=torch.bool, device=device)  # (N,) split on conflicts
        self.grown = GrowingRows()  # keys, values, spans, scales, splits, reach: prefix views of its buffers
        self.row_ids: list[str] = []  # edit id of each row
        self.answer = RowPointer(self.name, host.tokenizer, self.config.answer)
        self.labels: list[str] = []  # normalised target of each row

    def stronger_overrides(self) -> dict[str, Any]:
        return {"max_steps": self.config.max_steps * 2, "stop_loss": self.config.stop_loss / 10}

    # ----- computing an edit -----------------------------------------------------------------
    def _apply(self, edit_id: str, request: EditRequest) -> None:
        cfg, host = self.config, self.host
        batch = teacher_forced_batch(host, [(request.prompt, request.target)])
        last = int(batch.prompt_mask[0].sum()) - 1
        seen: dict[str, torch.Tensor] = {}

        def grab(module, args, output):  # key and the value's starting point
            seen["key"] = args[0][0, last].float()  # (d_ff,)
            seen["out"] = output[0, last].float()  # (d_model,)

        stack = UpperStack(
            host, self.layer, batch.input_ids, batch.attention_mask, extra_specs=[HookSpec(self.path, grab)]
        )
        value = torch.nn.Parameter(seen["out"].clone())
        span = len(batch.labels)
        relative = torch.arange(batch.input_ids.shape[1], device=host.device) - last  # (T,)
        predicts_target = ((relative >= 0) & (relative < span))[None, :, None]  # (1, T, 1)

        def replace(module, args, output):
            return torch.where(predicts_target, value.to(output.dtype), output)

        optimiser = torch.optim.Adam([value], lr=cfg.lr)
        loss = torch.tensor(float("inf"))
        with torch.enable_grad(), hooked(host.model, [HookSpec(self.path, replace)]):
            for step in range(cfg.max_steps):
                logits = stack.logits_at(stack.final_hidden(), batch.rows, batch.positions)
                loss = F.cross_entropy(logits.float(), batch.labels)
                if loss.item() < cfg.stop_loss:
                    break
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        logger.bind(edit_id=edit_id).debug("grace: value trained in {} steps, loss {:.4f}", step + 1, loss.item())
        key = seen["key"]
        self._add_radius(_label(request.target), key, cfg.radius)
        self.grown.append(self, "keys", key[None])
        self.grown.append(self, "values", value.detach()[None])
        self.grown.append(self, "spans", torch.tensor([span], device=self.spans.device))
        self.grown.append(self, "scales", torch.tensor([cfg.radius], device=self.scales.device))
        self.grown.append(self, "splits", torch.tensor([cfg.split_conflicts], device=self.splits.device))
        self.row_ids.append(edit_id)
        self.labels.append(_label(request.target))
        self._update_radii()

    def _revert(self, edit_id: str) -> None:
        row = self.row_ids.index(edit_id)
        # rows whose nearest conflicting entry this one may have been: measured again below
        half = self._halves_to(self.labels[row], self.keys[row])
        nearest = (half == self.halves) & torch.isfinite(half)
        keep = [i for i in range(len(self.row_ids)) if i != row]
        self.keys, self.values, self.spans = self.keys[keep], self.values[keep], self.spans[keep]
        self.scales, self.splits = self.scales[keep], self.splits[keep]
        self.halves, self.reach = self.halves[keep], self.reach[keep]
        del self.row_ids[row], self.labels[row]
        for i in nearest[keep].nonzero().flatten().tolist():
            self.halves[i] = self._half(i)
        self._update_radii()

    def _add_radius(self, label: str, key: torch.Tensor, radius: float) -> None:
        """The half distance and reach of an entry about to be appended (`key` (d_ff,), its
        target's `label`), and the others' halves it lowers: O(N), not all pairs."""
        half = self._halves_to(label, key)  # (N,)
        nearest = half.amin(0, keepdim=True) if len(half) else half.new_full((1,), torch.inf)
        self.halves = torch.cat([torch.minimum(self.halves, half), nearest])  # every row may change: a new tensor
        self.grown.append(self, "reach", radius * key[None].norm(dim=1))

    def _halves_to(self, label: str, key: torch.Tensor) -> torch.Tensor:
        """(N,) half the distance from `key` (d_ff,) to each entry whose target is not `label`
        (inf for those whose target is)."""
        conflicts = torch.tensor([other != label for other in self.labels], dtype=torch.bool, device=self.keys.device)
        return torch.where(conflicts, _distances(self.keys, key) / 2, torch.inf)

    def _half(self, row: int) -> torch.Tensor:
        """Half the distance from entry `row` to the nearest entry with another target (inf: none)."""
        return self._halves_to(self.labels[row], self.keys[row]).amin()

    def _update_radii(self) -> None:
        self.radii = torch.where(self.splits, torch.minimum(self.reach, self.halves), self.reach)  # (N,)

    # ----- serving ----------------------------------------------------------------------------
    def _hook_specs(self) -> list[HookSpec]:
        return [HookSpec(self.path, self._serve), *self.answer.specs(self.host.profile.layout, self.routing)]

    def _serve(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        routing = self.routing()
        batch, seq, _ = output.shape
        decision = routing.decisions.get(self.name)
        steps = torch.arange(seq, device=output.device)
        if decision is None:  # prefill: decide per row from its last prompt token
            last = routing.last_prompt_index(batch, seq, output.device)  # (B,)
            prompt = routing.mask_for(batch, seq, output.device)
            ids = self.answer.prompt_ids(routing)
            query = self._queries(args[0], ids, prompt, last)  # (B, d_ff)
            dist = torch.cdist(query, self.keys)  # (B, N)
            covering = torch.where(dist <= self.radii[None, :], dist, torch.inf)
            best_dist, best = covering.min(dim=1)  # the nearest entry whose radius covers the query
            hit = torch.isfinite(best_dist)
            if ids is not None:
                _, hit = self.first_answerable(hit, best, self.row_ids, lambda rows: self.host.chat.questions(ids, prompt, rows))
            relative = steps[None, :] - last[:, None]  # (B, T): 0 at the last prompt token
            decision = routing.decisions[self.name] = {"hit": hit, "best": best, "next": seq - last}
            rows = hit.nonzero().flatten()
            self.answer.start(routing, rows, [self.request(self.row_ids[e]).target for e in best[rows].tolist()])
        else:  # decode step with the KV cache: continue counting after the prompt
            relative = decision["next"][:, None] + steps[None, :]
            decision["next"] = decision["next"] + seq
        hit, best = decision["hit"], decision["best"]
        if not bool(hit.any()):
            return None
        span = self.spans[best][:, None]  # (B, 1)
        selected = hit[:, None] & (relative >= 0) & (relative < span)  # (B, T)
        answering = self.answer.answering(routing, seq)  # (Bh, T) or None
        if answering is not None:  # answer.stop_edit: positions past the stated answer run as the base model
            selected[self.answer.routed_rows(routing)] &= answering
        values = self.values[best].to(output.dtype)[:, None, :]  # (B, 1, d_model)
        return torch.where(selected[..., None], values, output)

    def _regroup(self, how: Regroup, decisions: list[dict[str, Any]]) -> dict[str, Any]:
        """A regrouped batch (continuous batching): each row keeps its entry and where it is in its answer."""
        mine = entries(decisions, self.name)
        if mine is None:
            return {}
        merged = {key: how.dense([m[key] for m in mine]) for key in ("hit", "best", "next")}  # all (B,)
        return {self.name: merged, **self.answer.regroup(how, decisions)}

    # ----- routing-aware probing ----------------------------------------------------------
    def routing_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """{"query": (B, d_ff)} the down_proj input at each row's last prompt token (base
        model); "questions": each row's question (the question check)."""
        a = module_input(self.host, self.path, input_ids, attention_mask)  # (B, T, d_ff)
        batch, seq = input_ids.shape
        prompt = attention_mask.bool()
        last = Routing(prompt).last_prompt_index(batch, seq, input_ids.device)  # (B,)
        return {"query": self._queries(a, input_ids, prompt, last), "questions": self.host.chat.questions(input_ids, prompt)}

    def _queries(self, a: torch.Tensor, ids: torch.Tensor | None, prompt_mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """(B, d_ff) each row's lookup key: `a` (B, T, d_ff), the down_proj input, at its last
        prompt token (last (B,)); a chat turn's, with `chat_retrieval: alone`, at the last
        token of its user's message run alone. Serving and routing-aware probing read the same."""
        query = a[torch.arange(a.shape[0], device=a.device), last].float()
        if ids is None or self.config.chat_retrieval != "alone":
            return query
        for row, message in self.host.chat.turns(ids, prompt_mask).messages:
            query[row] = self._message_query(message)
        return query

    @torch.no_grad()
    def _message_query(self, text: str) -> torch.Tensor:
        """(d_ff,) the down_proj input at the last token of `text` as a bare prompt (base model)."""
        a, _ = prompt_inputs(self.host, self.path, [text])  # (1, T, d_ff)
        return a[0, -1].float()

    def routes(self, features: dict[str, Any]) -> list[str | None]:
        """The codebook entry each row uses (as `_serve` decides), by edit id; entries never change."""
        query = features["query"]
        if not self.row_ids:
            return [None] * query.shape[0]
        dist = torch.cdist(query, self.keys)  # (B, N)
        best_dist, best = torch.where(dist <= self.radii[None, :], dist, torch.inf).min(dim=1)
        _, hit = self.first_answerable(torch.isfinite(best_dist), best, self.row_ids,
                                       lambda rows: [features["questions"][r] for r in rows])  # fmt: skip
        return [self.row_ids[b] if h else None for b, h in zip(best.tolist(), hit.tolist())]

    # ----- persistence ------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "spans": self.spans, "scales": self.scales, "splits": self.splits,
                "halves": self.halves}  # fmt: skip

    def extra_state(self) -> dict[str, Any]:
        return {"layer": self.layer, "row_ids": self.row_ids, "labels": self.labels}

    def _restore(self, requests: Sequence[EditRequest], tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        if extra.get("layer") != self.layer or sorted(extra.get("row_ids", [])) != sorted(r.edit_id for r in requests):
            raise EditorError("grace: saved rows do not match the saved edits")
        self.keys, self.values = tensors["keys"].float(), tensors["values"].float()
        self.spans = tensors["spans"].long()
        self.scales, self.splits = tensors["scales"].float(), tensors["splits"].bool()
        self.row_ids, self.labels = list(extra["row_ids"]), list(extra["labels"])
        if not len(self.row_ids) == self.keys.shape[0] == self.values.shape[0]:
            raise EditorError("grace: saved tensors do not match the saved rows")
        self.reach = self.scales * self.keys.norm(dim=1)
        halves = tensors.get("halves")
        if halves is not None and halves.shape == (len(self.row_ids),):
            self.halves = halves.float()
        else:  # a state saved before the halves were kept: measured once, O(N^2)
            self.halves = torch.full((len(self.row_ids),), torch.inf, device=self.keys.device)
            for i in range(len(self.row_ids)):
                self.halves[i] = self._half(i)
        self._update_radii()
