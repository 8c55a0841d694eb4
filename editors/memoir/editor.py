"""MEMOIR on a decoder's `mlp.down_proj` (see docs/methods.md).

The edited down_proj's output becomes `W a + W_m (M ⊙ a)`: `W_m` is a residual memory of
W's shape, zero at the start, and `M` is a sparse mask of k of the d_ff input features.

TopHash: a prompt's feature vector is its down_proj input mean-pooled over the *prompt
tokens*, minus the background mean (the same statistic over generic text shipped with
the package, `background.txt`); the indices of its k largest entries by absolute value
are mapped through a fixed random permutation of 0..d_ff-1. Semantically close prompts
share many top features, so their masks overlap a lot; the permutation spreads the
columns that different edits train over the whole memory.

An edit trains only its mask's columns of `W_m` (the loss is the target NLL on the
prompt and on prefixed copies of it). Two deviations from the paper, both options (see
MemoirConfig): `center` feeds the memory M ⊙ (a - mu) instead of M ⊙ a, and `update:
min_norm` replaces the optimised change of the columns by the smallest change (in a norm
that, with `protect` > 0, weighs the directions that the live earlier edits read through
these columns, from their Gram matrix) with the same memory output on the edit's own
training tokens. Masks of 1000 ZsRE questions share most columns with each other, so
without this every later edit rewrites what earlier edits read.

A query row computes its own mask from its prompt tokens, finds the stored edit mask
with the largest overlap |m_q & m_e| / k and, when that is >= tau, adds `W_m` restricted
to *that edit's* mask to every position of the row (prefill and KV-cache decode steps
alike); otherwise the row's output is untouched.

Shards (deviation, `shard_edits`): one memory holds at most `shard_edits` live edits; the
next edit opens a new zero memory. A routed row reads its edit's shard, so an edit shares
its columns only with the edits of its own shard (10,100 edits in one memory on SmolLM2:
each column written by ~1000 of them, and the first 100 edits' prompts fell from 0.94 to
0.10). Edits go to the last shard only; the Gram matrix is kept for it alone.

Exact revert: every edit's change of its columns (`delta`, k x d_model) is recorded, and
each column of `W_m` is kept equal to the left-to-right float sum, from +0, of the deltas
of the live edits that own it, in application order. Reverting an edit rebuilds its
columns from the remaining edits' deltas in that order, so the memory is bit for bit what
the remaining deltas give; loading rebuilds the whole memory the same way (`W_m` itself is
not saved). What revert cannot undo: edits applied *after* the reverted one were trained
on a memory that contained it, so their own deltas keep that influence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from loguru import logger

from kmd.editors.answer_stop import RowPointer
from kmd.editors.augment import background_passages, generate_prefixes, with_prefix
from kmd.editors.batching import teacher_forced_batch
from kmd.editors.hooks import HookSpec, hooked, resolve_module
from kmd.editors.memoir.config import MemoirConfig
from kmd.editors.minnorm import min_norm_change
from kmd.editors.protocol import EditorError, EditRequest, Editor, late_layer, ranked_candidates
from kmd.editors.regroup import Regroup, entries
from kmd.editors.rows import GrowingRows
from kmd.editors.scoring import module_input, prompt_inputs
from kmd.editors.upper import stack_above

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost

class MemoirEditor(Editor):
    name = "memoir"
    config_class = MemoirConfig
    SERVING_ONLY = ("runners_up",)

    def __init__(self, host: ModelHost, config: MemoirConfig | None = None) -> None:
        super().__init__(host, config)
        cfg = self.config
        self.layer = late_layer(self.name, host.num_layers, cfg.layer)
        self.path = host.profile.layout.path("mlp_down", self.layer)
        down = resolve_module(host.model, self.path)
        self.d_ff, self.d_model = down.in_features, down.out_features
        self.k = int(round(cfg.k * self.d_ff)) if cfg.k < 1 else int(cfg.k)
        if not 1 <= self.k <= self.d_ff:
            raise EditorError(f"memoir: k={cfg.k} gives {self.k} features, outside 1..{self.d_ff}")
        if not 0.0 < cfg.tau <= 1.0:
            raise EditorError(f"memoir: tau={cfg.tau} outside (0, 1]")
        if cfg.protect < 0 or (cfg.protect > 0 and cfg.update != "min_norm"):
            raise EditorError("memoir: protect must be >= 0, and > 0 only with update 'min_norm'")
        device = host.device
        # Per-model statistics, made on first use and persisted (masks mean nothing without them).
        self.permutation: torch.Tensor | None = None  # (d_ff,) long
        self.bg_mean: torch.Tensor | None = None  # (d_ff,) float32
        self.bg_std: torch.Tensor | None = None  # (d_ff,) float32
        self.prefixes: list[str] | None = None  # augmentation texts generated by the model
        # The residual memories, one per shard, stored transposed (S, d_ff, d_model): a mask's
        # columns are rows here. New edits go to the last shard.
        self.memory = torch.zeros(1, self.d_ff, self.d_model, device=device)
        self.masks = torch.empty(0, self.k, dtype=torch.long, device=device)  # (N, k) sorted indices
        self.owners = torch.empty(0, self.d_ff, device=device)  # (N, d_ff) 0/1: mask membership
        self.shards = torch.empty(0, dtype=torch.long, device=device)  # (N,) each edit's shard
        self.deltas = torch.empty(0, self.k, self.d_model, device=device)  # (N, k, d_model): each edit's change of its columns
        self.grown = GrowingRows()  # masks, owners, shards and deltas: prefix views of its buffers
        self.row_ids: list[str] = []  # edit id of each row, in application order
        self.answer = RowPointer(self.name, host.tokenizer, self.config.answer)
        self.info: list[dict[str, Any]] = []  # per edit: optimisation steps, final loss
        # With protect > 0: (d_ff, d_ff) float64 sum over the last shard's live edits of A^T A, A
        # being an edit's masked memory inputs (n_tokens, d_ff, zero outside its mask). Made on
        # the shard's first edit (None while it has none).
        self.gram: torch.Tensor | None = None

    # ----- per-model statistics ----------------------------------------------------------------
    def ensure_statistics(self) -> None:
        """The per-model statistics masks are made with (the permutation, the background
        mean/std) and the augmentation texts: made once, on first use (kept when loaded)."""
        if self.permutation is not None:
            return
        gen = torch.Generator().manual_seed(self.config.seed)
        permutation = torch.randperm(self.d_ff, generator=gen).to(self.host.device)
        feats = self.prompt_features(background_passages())
        self.bg_mean = feats.mean(0)
        self.bg_std = feats.std(0).clamp_min(1e-6)
        # augmentation texts sampled once from the base model (seeded), persisted with the state
        self.prefixes = generate_prefixes(self.host, self.config.n_prefixes, self.config.prefix_tokens, self.config.seed + 1)
        self.permutation = permutation

    @torch.no_grad()
    def prompt_features(self, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(P, d_ff) the edited down_proj's input mean-pooled over each prompt's tokens (base model)."""
        # The input of the edited down_proj does not depend on the memory (which acts on its
        # output), so this is right whether or not the editor's hooks are installed.
        out = []
        for start in range(0, len(prompts), batch_size):
            a, attention = prompt_inputs(self.host, self.path, prompts[start : start + batch_size])  # (B, T, d_ff), (B, T)
            out.append(_pool(a, attention.bool()))
        return torch.cat(out)

    def tophash(self, features: torch.Tensor) -> torch.Tensor:
        """(B, k) sorted mask indices for (B, d_ff) pooled features."""
        centred = features.float() - self.bg_mean
        if self.config.background == "zscore":
            centred = centred / self.bg_std
        top = centred.abs().topk(self.k, dim=-1).indices
        return self.permutation[top].sort(dim=-1).values

    def memory_inputs(self, a: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """(..., k) what the memory reads from down_proj inputs `a` (..., d_ff) at `columns` (k,)."""
        picked = a[..., columns].float()
        return picked - self.bg_mean[columns] if self.config.center else picked

    def membership(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, k) mask indices -> (B, d_ff) 0/1, 1 at each mask's columns."""
        out = torch.zeros(masks.shape[0], self.d_ff, device=masks.device)
        return out.scatter_(1, masks, 1.0)

    def overlaps(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, N) |m_q & m_e| / k of query masks against every stored edit mask."""
        return self.membership(masks) @ self.owners.T / self.k

    # ----- computing an edit -----------------------------------------------------------------
    def _apply(self, edit_id: str, request: EditRequest) -> None:
        cfg, host = self.config, self.host
        self.ensure_statistics()
        batch = self._training_batch(request)
        # Layers 0..layer run once: the memory only adds A_S @ W_S to the residual stream
        # leaving the edited layer, so each step runs layers layer+1.. only.
        stack, a = stack_above(host, self.layer, self.path, batch.input_ids, batch.attention_mask)  # a: (B, T, d_ff)
        mask = self.tophash(_pool(a[:1], batch.prompt_mask[:1]))[0]  # (k,) from the bare prompt's tokens
        inputs = self.memory_inputs(a, mask)  # (B, T, k): what the memory reads, fixed during training
        keys = inputs[batch.attention_mask.bool()]  # (n_tokens, k)
        hidden = stack.hidden.float()
        opens = self._opens_shard()
        shard = len(self.memory) - 1 + opens  # the last shard, or a new one
        # (k, d_model): what the shard's other edits stored there
        before = torch.zeros(self.k, self.d_model, device=hidden.device) if opens else self.memory[shard, mask].clone()
        weight = torch.nn.Parameter(before.clone())
        if cfg.optimizer == "sgd":
            optimiser = torch.optim.SGD([weight], lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimiser = torch.optim.Adam([weight], lr=cfg.lr, weight_decay=cfg.weight_decay)
        dtype = stack.hidden.dtype
        best, stale, losses = math.inf, 0, []
        with torch.enable_grad():
            for step in range(cfg.max_steps + 1):
                h = (hidden + inputs @ weight).to(dtype)
                logits = stack.logits_at(stack.final_hidden(h), batch.rows, batch.positions)
                loss = F.cross_entropy(logits.float(), batch.labels)
                value = loss.item()
                losses.append(value)
                if value < cfg.stop_loss or step == cfg.max_steps:
                    break
                if cfg.patience:
                    stale = 0 if value < 0.99 * best else stale + 1
                    best = min(best, value)
                    if stale >= cfg.patience:
                        break
                optimiser.zero_grad()
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_([weight], cfg.grad_clip)
                optimiser.step()
        delta = (weight.detach() - before).contiguous()
        if cfg.update == "min_norm":
            delta = self._min_norm(keys, mask, delta, None if opens else self.gram)
        if not torch.isfinite(delta).all():
            raise EditorError("memoir: the optimisation diverged (non-finite update)")
        logger.bind(edit_id=edit_id).debug("memoir: {} steps, loss {:.4f} -> {:.4f}", len(losses) - 1, losses[0], losses[-1])
        # Commit (nothing above touched the editor's state).
        if opens:
            self.memory = torch.cat([self.memory, torch.zeros_like(self.memory[:1])])
            self.gram = None
        self.memory[shard, mask] = before + delta  # the left fold of the shard's owners' deltas, in order
        self.grown.append(self, "masks", mask[None])
        self.grown.append(self, "owners", self.membership(mask[None]))
        self.grown.append(self, "shards", torch.tensor([shard], device=mask.device))
        self.grown.append(self, "deltas", delta[None])
        self._add_gram(keys, mask, +1.0)
        self.row_ids.append(edit_id)
        self.info.append({"steps": len(losses) - 1, "loss_first": losses[0], "loss_last": losses[-1]})

    def _opens_shard(self) -> bool:
        """Does the next edit open a new shard (the last one holds `shard_edits` live edits)?"""
        limit = self.config.shard_edits
        return bool(limit) and int((self.shards == len(self.memory) - 1).sum()) >= limit

    def _training_batch(self, request: EditRequest):
        """The bare prompt and its prefixed copies, each followed by the target."""
        pairs = [(request.prompt, request.target)]
        pairs += [(with_prefix(prefix, request.prompt), request.target) for prefix in self.prefixes or []]
        return teacher_forced_batch(self.host, pairs)

    def _min_norm(self, keys: torch.Tensor, mask: torch.Tensor, delta: torch.Tensor, gram: torch.Tensor | None
                  ) -> torch.Tensor:  # fmt: skip
        """(k, d_model) the protected minimum-norm change with this edit's output
        (editors/minnorm.py); gram: the edit's shard's (d_ff, d_ff), None for a new shard."""
        keys = keys.double()
        gram = gram[mask][:, mask] if self.config.protect > 0 and gram is not None else None  # (k, k)
        return min_norm_change(keys, keys @ delta.double(), gram, self.config.protect)

    def _add_gram(self, keys: torch.Tensor, mask: torch.Tensor, sign: float) -> None:
        """Add (sign +1) or remove (-1) one edit's A^T A to the Gram matrix (protect > 0 only)."""
        if self.config.protect <= 0:
            return
        if self.gram is None:
            self.gram = torch.zeros(self.d_ff, self.d_ff, dtype=torch.float64, device=keys.device)
        block = keys.double().T @ keys.double()  # (k, k)
        self.gram[mask[:, None], mask[None, :]] += sign * block

    @torch.no_grad()
    def _edit_keys(self, request: EditRequest, mask: torch.Tensor) -> torch.Tensor:
        """(n_tokens, k) an applied edit's memory inputs, recomputed (layers <= L do not see the memory)."""
        batch = self._training_batch(request)
        seen: dict[str, torch.Tensor] = {}

        def grab(module, args, output):
            seen["a"] = args[0]

        with hooked(self.host.model, [HookSpec(self.path, grab)]):
            self.host.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return self.memory_inputs(seen["a"].float(), mask)[batch.attention_mask.bool()]

    def _revert(self, edit_id: str) -> None:
        row = self.row_ids.index(edit_id)
        columns, shard = self.masks[row], int(self.shards[row])
        last = shard == len(self.memory) - 1
        if self.gram is not None and last:  # earlier shards take no more edits: no Gram kept
            self._add_gram(self._edit_keys(self.request(edit_id), columns), columns, -1.0)
        keep = [i for i in range(len(self.row_ids)) if i != row]
        if row == len(self.row_ids) - 1:  # the usual revert (a failed probe): prefix views (the next append copies once)
            keep = slice(0, row)
        self.masks, self.owners, self.shards = self.masks[keep], self.owners[keep], self.shards[keep]
        self.deltas = self.deltas[keep]
        del self.row_ids[row], self.info[row]
        if last and not (self.shards == shard).any():
            self.gram = None  # as before the shard's first edit (not a float residue of it)
        self._rebuild(columns, shard)

    def _rebuild(self, columns: torch.Tensor | None = None, shard: int | None = None) -> None:
        """Recompute memory rows `columns` (all if None) of `shard` (every shard if None) as
        the in-order fold of its owners' deltas."""
        touched = torch.zeros(self.d_ff, dtype=torch.bool, device=self.memory.device)
        if columns is None:
            touched[:] = True
        else:
            touched[columns] = True
        if shard is None:
            self.memory[:, touched] = 0.0
        else:
            self.memory[shard, touched] = 0.0
        for owner, mask, delta in zip(self.shards.tolist(), self.masks, self.deltas, strict=True):
            hit = touched[mask]
            if (shard is None or owner == shard) and hit.any():
                index = mask[hit]
                self.memory[owner, index] = self.memory[owner, index] + delta[hit]

    # ----- serving ----------------------------------------------------------------------------
    def _hook_specs(self) -> list[HookSpec]:
        return [HookSpec(self.path, self._serve), *self.answer.specs(self.host.profile.layout, self.routing)]

    def _serve(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        routing = self.routing()
        a = args[0]
        batch, seq, _ = a.shape
        decision = routing.decisions.get(self.name)
        if decision is None:  # prefill: decide per row from its prompt tokens only
            ids, prompt = self.answer.prompt_ids(routing), routing.mask_for(batch, seq, a.device)
            questions = None if ids is None else (lambda rows: self.host.chat.questions(ids, prompt, rows))
            best, hit, score = self._routed(self._pooled(a, ids, prompt), questions)
            rows = hit.nonzero().flatten()
            decision = routing.decisions[self.name] = {"rows": rows, "edit": best[rows], "score": score}
            self.answer.start(routing, rows, [self.request(self.row_ids[e]).target for e in best[rows].tolist()])
        rows = decision["rows"]
        if rows.numel() == 0:
            return None  # no row matched: the output is exactly the base model's
        columns = self.masks[decision["edit"]]  # (H, k)
        picked = a[rows].gather(2, columns[:, None, :].expand(-1, seq, -1)).float()  # (H, T, k)
        if self.config.center:
            picked = picked - self.bg_mean[columns][:, None, :]
        memory = self.memory[self.shards[decision["edit"]][:, None], columns]  # (H, k, d_model): the edit's shard
        added = torch.bmm(picked, memory)  # (H, T, d_model)
        answering = self.answer.answering(routing, seq)  # (H, T) or None
        if answering is not None:  # positions past the stated answer run as the base model
            added = added * answering[..., None]
        out = output.clone()
        out[rows] = output[rows] + added.to(output.dtype)
        return out

    def _routed(self, pooled: torch.Tensor, questions: Callable[[list[int]], list[str]] | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """(B, d_ff) pooled rows -> per row (edit, hit, the best overlap), each (B,): the edit
        whose mask overlaps the row's most, at least `tau`, or the next `runners_up` of them
        in turn, the first the question check accepts (`Editor.first_answerable`; no check
        without the rows' `questions`, a raw model call)."""
        overlaps = self.overlaps(self.tophash(pooled))  # (B, N)
        score, winner = overlaps.max(dim=1)
        hit = score >= self.config.tau
        if questions is None:
            return winner, hit, score
        candidates = ranked_candidates(winner, overlaps, overlaps >= self.config.tau, self.config.runners_up)
        best, hit = self.first_answerable(hit, winner, self.row_ids, questions, candidates)
        return best, hit, score

    def _regroup(self, how: Regroup, decisions: list[dict[str, Any]]) -> dict[str, Any]:
        """A regrouped batch (continuous batching): each routed row keeps its edit and answer state."""
        mine = entries(decisions, self.name)
        if mine is None:
            return {}
        rows, picks = how.routed([m["rows"] for m in mine])
        merged = {"rows": rows, "edit": how.pick([m["edit"] for m in mine], picks),
                  "score": how.dense([m["score"] for m in mine])}  # fmt: skip
        return {self.name: merged, **self.answer.regroup(how, decisions)}

    # ----- routing-aware probing ----------------------------------------------------------
    def routing_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """{"pooled": (B, d_ff)} the down_proj input mean-pooled over each row's prompt tokens
        (base model); "questions": each row's question (the question check)."""
        a = module_input(self.host, self.path, input_ids, attention_mask)  # (B, T, d_ff)
        prompt = attention_mask.bool()
        return {"pooled": self._pooled(a, input_ids, prompt), "questions": self.host.chat.questions(input_ids, prompt)}

    def _pooled(self, a: torch.Tensor, ids: torch.Tensor | None, prompt_mask: torch.Tensor) -> torch.Tensor:
        """(B, d_ff) what a row is routed by: `a` (B, T, d_ff), the edited down_proj's input,
        pooled over its prompt tokens. A chat turn's are its user's message: its own tokens
        (`chat_retrieval: in_context`) or, by default, the message run alone as a bare prompt
        is when an edit's mask is made (one message at a time: a row's decision never depends
        on its batch). Serving and routing-aware probing read the same."""
        if ids is None:
            return _pool(a, prompt_mask)
        turns = self.host.chat.turns(ids, prompt_mask)
        pooled = _pool(a, turns.mask)
        if self.config.chat_retrieval == "alone":
            for row, message in turns.messages:
                pooled[row] = self.prompt_features([message])[0]
        return pooled

    def routes(self, features: dict[str, Any]) -> list[tuple[str, tuple[str, ...]] | None]:
        """Per row: the edit it retrieves, and every live edit of its shard owning one of that
        edit's columns, in order: the columns it reads are the in-order fold of their deltas."""
        pooled = features["pooled"]
        if not self.row_ids:
            return [None] * pooled.shape[0]
        best, hits, _ = self._routed(pooled, lambda rows: [features["questions"][r] for r in rows])
        out: list[tuple[str, tuple[str, ...]] | None] = []
        for b, hit in zip(best.tolist(), hits.tolist()):
            sharing = (((self.owners @ self.owners[b]) > 0) & (self.shards == self.shards[b])).nonzero().flatten().tolist()
            out.append((self.row_ids[b], tuple(self.row_ids[i] for i in sharing)) if hit else None)
        return out

    def _forked(self) -> None:
        # `_apply` and `_rebuild` write memory rows (and the Gram matrix) in place.
        self.memory = self.memory.clone()
        if self.gram is not None:
            self.gram = self.gram.clone()

    # ----- persistence ------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "masks": self.masks,
            "shards": self.shards,
            "deltas": self.deltas,
        }
        if self.permutation is not None:
            tensors |= {"permutation": self.permutation, "bg_mean": self.bg_mean, "bg_std": self.bg_std}
        if self.gram is not None:
            tensors["gram"] = self.gram
        return tensors

    def extra_state(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "k": self.k,
            "memory_shards": len(self.memory),
            "row_ids": self.row_ids,
            "prefixes": self.prefixes,
            "info": self.info,
        }

    def _restore(self, requests: Sequence[EditRequest], tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        ids = [r.edit_id for r in requests]
        if extra.get("layer") != self.layer or extra.get("k") != self.k or extra.get("row_ids") != ids:
            raise EditorError("memoir: saved rows do not match the saved edits (layer, k or order)")
        masks, deltas = tensors["masks"].long(), tensors["deltas"].float()
        if masks.shape != (len(ids), self.k) or deltas.shape != (len(ids), self.k, self.d_model):
            raise EditorError("memoir: saved tensors do not match the saved edits")
        # a state saved before shards: every edit in one memory
        shards = tensors["shards"].long() if "shards" in tensors else torch.zeros(len(ids), dtype=torch.long)
        count = int(extra.get("memory_shards", 1))
        if shards.shape != (len(ids),) or count < 1 or (len(ids) and not 0 <= int(shards.min()) <= int(shards.max()) < count):
            raise EditorError("memoir: saved shards do not match the saved edits")
        if "permutation" in tensors:
            permutation = tensors["permutation"].long()
            if sorted(permutation.tolist()) != list(range(self.d_ff)):
                raise EditorError("memoir: the saved permutation is not a permutation of the d_ff features")
            self.permutation = permutation
            self.bg_mean, self.bg_std = tensors["bg_mean"].float(), tensors["bg_std"].float()
            self.prefixes = list(extra.get("prefixes") or [])
        elif ids:
            raise EditorError("memoir: saved edits without their permutation and background statistics")
        device = self.memory.device
        self.masks, self.owners, self.shards = masks.to(device), self.membership(masks.to(device)), shards.to(device)
        self.deltas = deltas.to(device)
        self.row_ids, self.info = list(ids), list(extra.get("info") or [{} for _ in ids])
        self.memory = torch.zeros(count, self.d_ff, self.d_model, device=device)
        self._rebuild()
        self.gram = None
        last = self.shards == count - 1
        if self.config.protect > 0 and bool(last.any()):
            if "gram" in tensors:
                self.gram = tensors["gram"].to(torch.float64)
            else:  # saved without protection: recompute what the last shard's live edits read
                for request, mask, in_last in zip(requests, self.masks, last.tolist(), strict=True):
                    if in_last:
                        self._add_gram(self._edit_keys(request, mask), mask, +1.0)


def _pool(a: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """(B, d_ff) mean of `a` (B, T, d_ff) over each row's prompt tokens, in float32."""
    weights = prompt_mask.to(device=a.device, dtype=torch.float32)[..., None]
    return (a.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)
