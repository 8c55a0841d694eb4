"""WISE on a decoder's `mlp.down_proj` (see docs/methods.md, "WISE").

The edited down_proj gets a side memory: W (the base weight) is never written, D
(d_model, d_ff) is the memory, and a routed row's output becomes W a + D (a - c), with c
the background mean of the down_proj input (see `ensure_center`; WISE itself uses
W' a = W a + D a, whose response is dominated by input features every text shares).
Edits are grouped into knowledge shards of `shard_size` consecutive edits; shard s trains
only a fixed random `mask_ratio` of D's elements (its mask is seeded by the shard's serial
number), one edit after the other, starting from zero. The memory served is the TIES
merge of the shards' task vectors (one shard: itself).

Training an edit: the target NLL on the bare prompt and prefixed copies of it, plus the
activation-margin loss. A prompt's activation is the mean over its prompt tokens of
|D (a_t - c)| (a_t the down_proj input); the margins make it large on the edit's prompts
and small on unrelated texts. With `update: min_norm` the optimised change is then
replaced by the least change with the same output on the edit's tokens
(editors/minnorm.py), so the edits of a shard overwrite each other less. Layers 0..layer
run once per edit (`UpperStack`): D only adds `a @ D^T` to the stream leaving the edited
layer.

Routing, per row and from prompt tokens only: a row uses the memory when its activation
reaches `act_ratio` times the smallest activation of a kept edit's prompt (measured when
the edit is made, and for every kept edit again when the set of shards changes or an edit
is reverted). Otherwise the hook returns nothing and the row is exactly the base model's.

Revert: a trained shard cannot forget one edit, so reverting retrains the edit's shard
from zero on its other edits, in their original order and with their original per-edit
randomness and options; the result is exactly the shard that would exist had the edit
never been applied. It costs one edit's training per kept edit of the shard
(`last_revert` records how many and how long). Reverting every edit leaves no memory
and no hooks: the model is bit for bit the base model.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from loguru import logger

from kmd.editors.batching import teacher_forced_batch
from kmd.editors.hooks import HookSpec, resolve_module
from kmd.editors.augment import background_passages, generate_prefixes, with_prefix
from kmd.editors.minnorm import min_norm_change
from kmd.editors.protocol import EditorError, EditRequest, Editor, late_layer
from kmd.editors.regroup import Regroup, entries
from kmd.editors.scoring import module_input, prompt_inputs
from kmd.editors.upper import stack_above
from kmd.editors.wise.config import WiseConfig
from kmd.editors.wise.merge import ties_merge

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost

# Options fixed when the memory is laid out: they cannot change between edits.
STRUCTURAL = ("layer", "mask_ratio", "shard_size", "density", "prefix_pool", "prefix_tokens", "seed")


@dataclass
class Shard:
    serial: int  # seeds the mask; never reused, so a shard's mask survives other shards' removal
    edit_ids: list[str] = field(default_factory=list)  # in training order
    delta: torch.Tensor | None = None  # (d_model, d_ff) float32, zero outside the mask
    # update min_norm with protect > 0: (d_ff, d_ff) float64 sum over the shard's edits of
    # A^T A, A (n_tokens, d_ff) the centred down_proj inputs an edit trained on.
    gram: torch.Tensor | None = None


def activation(extra: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean of |extra_t| over each row's masked tokens but the first, for extra (B, T, d_model).

    The first token is left out (unless it is the only one): its state depends on that one
    token alone, so every prompt opening with the same word ("What", "The") has the same
    activation there, which says nothing about which fact is asked for.
    """
    norms = (extra.float().pow(2).sum(-1) + 1e-12).sqrt()  # (B, T); eps: finite gradient at D = 0
    first = mask.int().argmax(dim=1)  # (B,) first masked token of each row
    later = mask.clone()
    later[torch.arange(mask.shape[0], device=mask.device), first] = False
    weights = torch.where(later.any(1, keepdim=True), later, mask).to(norms.dtype)
    return (norms * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class WiseEditor(Editor):
    name = "wise"
    config_class = WiseConfig

    def __init__(self, host: ModelHost, config: WiseConfig | None = None) -> None:
        super().__init__(host, config)
        cfg = self.config
        self.layer = late_layer(self.name, host.num_layers, cfg.layer)
        if not 0 < cfg.mask_ratio <= 1 or not 0 < cfg.density <= 1 or cfg.shard_size < 1:
            raise EditorError("wise: mask_ratio and density must be in (0, 1], shard_size >= 1")
        weights = (cfg.protect, cfg.protect_background)
        if min(weights) < 0 or (max(weights) > 0 and cfg.update != "min_norm"):
            raise EditorError("wise: protect and protect_background must be >= 0, and > 0 only with update 'min_norm'")
        self._structure = {k: getattr(cfg, k) for k in STRUCTURAL}
        self.path = host.profile.layout.path("mlp_down", self.layer)
        down = resolve_module(host.model, self.path)
        self.d_ff, self.d_model = down.in_features, down.out_features
        self.shards: list[Shard] = []
        self.next_serial = 0
        self.memory_t = torch.zeros(self.d_ff, self.d_model, device=host.device)  # merged D, transposed
        self.prefixes: list[str] = []  # generated once (lazily), persisted
        self.center: torch.Tensor | None = None  # (d_ff,) background mean of the down_proj input, persisted
        self.acts: dict[str, float] = {}  # edit id -> activation of its bare prompt under the served memory
        self.meta: dict[str, dict[str, Any]] = {}  # per edit: shard, options, steps, losses
        self.last_revert: dict[str, Any] | None = None  # what the last revert cost
        self._prompt_inputs: dict[str, torch.Tensor] = {}  # edit id -> (T, d_ff) down_proj input on its prompt
        self._background_gram: torch.Tensor | None = None  # see background_gram()

    def stronger_overrides(self) -> dict[str, Any]:
        return {"max_steps": self.config.max_steps * 2, "stop_loss": self.config.stop_loss / 2}

    @property
    def threshold(self) -> float:
        if not self.acts:
            return math.inf
        return self.config.act_ratio * min(self.acts.values())

    # ----- per-edit inputs ----------------------------------------------------------------
    def ensure_center(self) -> torch.Tensor:
        """The mean down_proj input over the packaged generic passages (first tokens excluded).

        Trained decoders have a few massive input features shared by every token (on
        SmolLM2-135M layer 25 one feature carries ~40 % of the norm), so raw inputs of any two
        prompts have cosine ~0.65 and a memory reacts to all text alike; centred, ~0.2.
        """
        if self.center is None:
            self.center = self._background_inputs().mean(0)
        return self.center

    def _background_inputs(self) -> torch.Tensor:
        """(n_tokens, d_ff) down_proj inputs of the packaged generic passages, first tokens excluded."""
        a, mask = self.layer_inputs(background_passages())
        mask[:, 0] = False
        return a[mask]

    def _protected(self, gram: torch.Tensor | None, cfg: WiseConfig) -> torch.Tensor | None:
        """(d_ff, d_ff) protect * (the shard's Gram) + protect_background * (the generic passages'), or None."""
        total = cfg.protect * gram if cfg.protect > 0 and gram is not None else None
        if cfg.protect_background > 0:
            background = cfg.protect_background * self.background_gram()
            total = background if total is None else total + background
        return total

    def background_gram(self) -> torch.Tensor:
        """(d_ff, d_ff) float64 Gram matrix of the centred generic passages' down_proj inputs
        (first tokens excluded). Recomputed from the model when needed, not persisted."""
        if self._background_gram is None:
            keys = (self._background_inputs() - self.ensure_center()).double()  # (n_tokens, d_ff)
            self._background_gram = keys.T @ keys
        return self._background_gram

    def ensure_prefixes(self) -> list[str]:
        cfg = self.config
        if not self.prefixes and cfg.n_prefixes > 0:
            self.prefixes = generate_prefixes(self.host, cfg.prefix_pool, cfg.prefix_tokens, cfg.seed)
        return self.prefixes

    def variants(self, request: EditRequest, cfg: WiseConfig) -> tuple[list[str], list[str]]:
        """(bare prompt + prefixed copies, unrelated texts), drawn by the edit's content.

        Prefixes come from the model's own short texts; the unrelated texts of the margin loss
        from the packaged generic passages (the request's locality prompts too, when given).
        Generated snippets are too short and odd to stand for the prompts a memory must ignore.
        """
        # Seeded by the request, not its random id: the same edit always trains the same way
        # (reproducible runs, and a shard retrained on revert matches a fresh build).
        rng = random.Random(f"{cfg.seed}/{request.prompt}\x00{request.target}")
        pool = self.ensure_prefixes()
        prefixes = rng.sample(pool, min(cfg.n_prefixes, len(pool))) if cfg.n_prefixes else []
        passages = background_passages()
        unrelated = rng.sample(passages, min(cfg.n_unrelated, len(passages))) + list(request.locality)
        return [request.prompt] + [with_prefix(p, request.prompt) for p in prefixes], unrelated

    def mask(self, serial: int) -> torch.Tensor:
        """(d_model, d_ff) bool: the elements shard `serial` trains (seeded, made on the CPU)."""
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + serial)
        return (torch.rand(self.d_model, self.d_ff, generator=gen) < self.config.mask_ratio).to(self.host.device)

    @torch.no_grad()
    def layer_inputs(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, T, d_ff) down_proj inputs of right-padded prompts and their (P, T) token mask."""
        a, attention = prompt_inputs(self.host, self.path, prompts)
        return a.float(), attention.bool()

    # ----- computing an edit -----------------------------------------------------------------
    def _apply(self, edit_id: str, request: EditRequest) -> None:
        changed = [k for k in STRUCTURAL if getattr(self.config, k) != self._structure[k]]
        if changed:  # `configured(...)` may tune the optimisation per edit, not the memory layout
            raise EditorError(f"wise: {changed} cannot change between edits")
        cfg = self.config
        options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in STRUCTURAL}
        if self.shards and len(self.shards[-1].edit_ids) < cfg.shard_size:
            shard, new = self.shards[-1], False
        else:
            shard, new = Shard(serial=self.next_serial), True
        mask = self.mask(shard.serial)
        start = shard.delta if shard.delta is not None else torch.zeros(self.d_model, self.d_ff, device=self.host.device)
        delta, info, prompt_input, keys = self._train(start, shard.gram, mask, edit_id, request, cfg)
        # Commit (nothing above touched the editor's state).
        shard.delta = delta
        shard.gram = self._grown_gram(shard.gram, keys, cfg)
        shard.edit_ids.append(edit_id)
        if new:
            self.shards.append(shard)
            self.next_serial += 1
        self.meta[edit_id] = {"shard": shard.serial, "options": options, **info}
        self._prompt_inputs[edit_id] = prompt_input
        self._merge()
        if new and len(self.shards) > 1:
            self._measure(self._all_ids())  # the merge changed what every kept edit sees
        else:
            self._measure([edit_id])
        logger.bind(edit_id=edit_id).debug(
            "wise: shard {}, {} steps, nll {:.4f}, act {:.2f}, threshold {:.2f}",
            shard.serial, info["steps"], info["nll"], self.acts[edit_id], self.threshold,
        )

    def _train(
        self, start: torch.Tensor, gram: torch.Tensor | None, mask: torch.Tensor, edit_id: str, request: EditRequest, cfg: WiseConfig
    ) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor, torch.Tensor]:
        """Train one edit into a shard's task vector (`gram`: the shard's so far, or None).

        Returns (new delta, info, the bare prompt's inputs (T_p, d_ff), all training inputs (n, d_ff)).
        """
        host = self.host
        prompts, unrelated = self.variants(request, cfg)
        batch = teacher_forced_batch(host, [(p, request.target) for p in prompts])
        stack, a = stack_above(host, self.layer, self.path, batch.input_ids, batch.attention_mask)
        center = self.ensure_center()
        a = a - center  # (B, T, d_ff): rows are the bare prompt and its prefixed copies, + target
        if unrelated:
            a_unrelated, unrelated_mask = self.layer_inputs(unrelated)  # (U, T', d_ff), (U, T')
            a_unrelated = a_unrelated - center
        hidden, dtype = stack.hidden.float(), stack.hidden.dtype
        weight = torch.nn.Parameter(start.clone())
        grad_mask = mask.to(weight.dtype)
        optimiser = (torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.Adam)([weight], lr=cfg.lr)
        nll_first = None
        with torch.enable_grad():
            for step in range(cfg.max_steps + 1):
                extra = a @ weight.T  # (B, T, d_model): what the memory adds to the layer's output
                logits = stack.logits_at(stack.final_hidden((hidden + extra).to(dtype)), batch.rows, batch.positions)
                nll = F.cross_entropy(logits.float(), batch.labels)
                act_edit = activation(extra, batch.prompt_mask)  # (B,)
                margin = F.relu(cfg.margin_edit - act_edit).mean()
                if unrelated:
                    act_other = activation(a_unrelated @ weight.T, unrelated_mask)  # (U,)
                    gap = act_edit[:, None] - act_other[None, :]  # (B, U)
                    margin = margin + F.relu(act_other - cfg.margin_unrelated).mean() + F.relu(cfg.margin_gap - gap).mean()
                nll_first = nll.item() if nll_first is None else nll_first
                if (nll.item() < cfg.stop_loss and margin.item() == 0.0) or step == cfg.max_steps:
                    break
                loss = nll + cfg.margin_weight * margin
                optimiser.zero_grad()
                loss.backward()
                weight.grad.mul_(grad_mask)  # only the shard's elements learn
                optimiser.step()
                with torch.no_grad():
                    weight.clamp_(-cfg.clamp, cfg.clamp)  # W' within +-clamp of W
        keys = a[batch.attention_mask.bool()]  # (n, d_ff): every token the edit trained on
        delta = weight.detach()
        if cfg.update == "min_norm":
            delta = (start + self._min_norm(keys, delta - start, mask, self._protected(gram, cfg))).clamp(-cfg.clamp, cfg.clamp)
        if not torch.isfinite(delta).all():
            raise EditorError("wise: the optimisation diverged (non-finite memory)")
        info = {"steps": step, "nll_first": round(nll_first, 5), "nll": round(nll.item(), 5), "margin": round(margin.item(), 5)}
        prompt_input = a[0, batch.prompt_mask[0]]  # (T_p, d_ff): the bare prompt's tokens
        return delta, info, prompt_input, keys

    def _min_norm(
        self, keys: torch.Tensor, change: torch.Tensor, mask: torch.Tensor, protected: torch.Tensor | None, chunk: int = 64
    ) -> torch.Tensor:
        """(d_model, d_ff) the minimum-norm change with the same output as `change` on `keys`
        (n, d_ff), weighted away from `protected` (d_ff, d_ff; see `_protected`), solved per
        output row over that row's masked elements (mask (d_model, d_ff))."""
        width = int(mask.sum(1).max())
        columns = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]  # (d_model, width): masked first
        valid = mask.gather(1, columns)  # (d_model, width): False on the padding of shorter rows
        keys = keys.double()
        outputs = keys @ change.double().T  # (n, d_model): what this edit's change adds on its tokens
        result = torch.zeros_like(change)
        for first in range(0, change.shape[0], chunk):
            rows = slice(first, first + chunk)
            cols, ok = columns[rows], valid[rows]  # (r, width)
            a = keys[:, cols].permute(1, 0, 2) * ok[:, None, :]  # (r, n, width), padding zeroed
            g = None
            if protected is not None:
                g = protected[cols[:, :, None], cols[:, None, :]] * (ok[:, :, None] & ok[:, None, :])  # (r, width, width)
            d = min_norm_change(a, outputs[:, rows].T[..., None], g, 1.0)[..., 0]  # (r, width)
            result[rows].scatter_(1, cols, d * ok)
        return result

    def _grown_gram(self, gram: torch.Tensor | None, keys: torch.Tensor, cfg: WiseConfig) -> torch.Tensor | None:
        """A shard's Gram matrix after one more edit (only kept with update min_norm, protect > 0)."""
        if cfg.update != "min_norm" or cfg.protect <= 0:
            return None
        keys = keys.double()
        return (gram if gram is not None else 0) + keys.T @ keys

    def _revert(self, edit_id: str) -> None:
        started = time.perf_counter()
        shard = next(s for s in self.shards if edit_id in s.edit_ids)
        kept = [e for e in shard.edit_ids if e != edit_id]
        mask = self.mask(shard.serial)
        delta, gram = torch.zeros(self.d_model, self.d_ff, device=self.host.device), None
        infos = {}
        for other in kept:  # replay the shard's history without the reverted edit
            options = self.meta[other]["options"]
            cfg = dataclasses.replace(self.config, **options)
            delta, infos[other], self._prompt_inputs[other], keys = self._train(delta, gram, mask, other, self.request(other), cfg)
            gram = self._grown_gram(gram, keys, cfg)
        # Commit.
        shard.delta, shard.edit_ids, shard.gram = delta, kept, gram
        if not kept:
            self.shards.remove(shard)
        for other, info in infos.items():
            self.meta[other] |= info
        del self.meta[edit_id]
        self.acts.pop(edit_id, None)
        self._prompt_inputs.pop(edit_id, None)
        self._merge()
        self._measure(self._all_ids())
        self.last_revert = {"edit_id": edit_id, "retrained": len(kept), "seconds": round(time.perf_counter() - started, 4)}
        logger.bind(edit_id=edit_id).info(
            "wise: reverted by retraining shard {} on its {} other edits in {:.2f} s",
            shard.serial, len(kept), self.last_revert["seconds"],
        )

    def _all_ids(self) -> list[str]:
        return [e for s in self.shards for e in s.edit_ids]

    def _merge(self) -> None:
        if not self.shards:
            self.memory_t = torch.zeros(self.d_ff, self.d_model, device=self.host.device)
            return
        merged = ties_merge([s.delta for s in self.shards], self.config.density)  # (d_model, d_ff)
        self.memory_t = merged.T.contiguous()

    @torch.no_grad()
    def _measure(self, edit_ids: Sequence[str]) -> None:
        """Activation of each edit's bare prompt under the served memory (routing threshold)."""
        missing = [e for e in edit_ids if e not in self._prompt_inputs]
        if missing:  # after a load: one forward to the edited layer for the edits' prompts
            a, mask = self.layer_inputs([self.request(e).prompt for e in missing])
            for row, e in enumerate(missing):
                self._prompt_inputs[e] = a[row, mask[row]] - self.center
        for e in edit_ids:
            inputs = self._prompt_inputs[e]  # (T_p, d_ff)
            self.acts[e] = float(activation((inputs @ self.memory_t)[None], torch.ones(1, inputs.shape[0], dtype=torch.bool, device=inputs.device))[0])

    # ----- serving ----------------------------------------------------------------------------
    def _hook_specs(self) -> list[HookSpec]:
        return [HookSpec(self.path, self._serve)]

    def _serve(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        routing = self.routing()
        a = args[0]
        batch, seq, _ = a.shape
        decision = routing.decisions.get(self.name)
        if decision is None:  # prefill: decide per row from its prompt tokens only
            extra = (a.float() - self.center) @ self.memory_t  # (B, T, d_model)
            act = activation(extra, routing.mask_for(batch, seq, a.device))  # (B,)
            rows = (act >= self.threshold).nonzero().flatten()
            decision = routing.decisions[self.name] = {"rows": rows, "act": act}
            extra = extra[rows]
        else:  # decode step with the KV cache: the prefill decided
            rows = decision["rows"]
            extra = (a[rows].float() - self.center) @ self.memory_t if rows.numel() else None
        if rows.numel() == 0:
            return None  # no row routed: the output is exactly the base model's
        out = output.clone()
        out[rows] = output[rows] + extra.to(output.dtype)
        return out

    def _regroup(self, how: Regroup, decisions: list[dict[str, Any]]) -> dict[str, Any]:
        """A regrouped batch (continuous batching): each row keeps whether it reads the memory."""
        mine = entries(decisions, self.name)
        if mine is None:
            return {}
        rows, _ = how.routed([m["rows"] for m in mine])
        return {self.name: {"rows": rows, "act": how.dense([m["act"] for m in mine])}}

    # ----- routing-aware probing ----------------------------------------------------------
    def routing_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"a": (B, T, d_ff) down_proj inputs (base model), "mask": (B, T) prompt tokens}."""
        return {"a": module_input(self.host, self.path, input_ids, attention_mask), "mask": attention_mask.bool()}

    def routes(self, features: dict[str, torch.Tensor]) -> list[tuple | None]:
        """Routed rows read the whole merged memory, which every shard's edits shape: the
        token is the shards' content (serials and edit ids), None for rows not routed."""
        a = features["a"]
        if not self.shards or self.center is None:
            return [None] * a.shape[0]
        act = activation((a.float() - self.center) @ self.memory_t, features["mask"])  # (B,)
        memory = tuple((s.serial, tuple(s.edit_ids)) for s in self.shards)
        return [memory if routed else None for routed in (act >= self.threshold).tolist()]

    # ----- persistence ------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        # Only each shard's masked elements: the masks are rebuilt from their seeds.
        tensors = {f"shard_{s.serial}": s.delta[self.mask(s.serial)] for s in self.shards}
        tensors |= {f"gram_{s.serial}": s.gram for s in self.shards if s.gram is not None}
        if self.center is not None:
            tensors["center"] = self.center
        return tensors

    def extra_state(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "shards": [{"serial": s.serial, "edit_ids": s.edit_ids} for s in self.shards],
            "next_serial": self.next_serial,
            "prefixes": self.prefixes,
            "acts": self.acts,
            "meta": self.meta,
        }

    def _restore(self, requests: Sequence[EditRequest], tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        ids = [r.edit_id for r in requests]
        saved = extra.get("shards", [])
        order = [e for s in saved for e in s["edit_ids"]]
        if extra.get("layer") != self.layer or sorted(order) != sorted(ids) or set(extra.get("acts", {})) != set(ids):
            raise EditorError("wise: saved shards do not match the saved edits (layer or edit ids)")
        shards = []
        for entry in saved:
            mask = self.mask(entry["serial"])
            values = tensors.get(f"shard_{entry['serial']}")
            if values is None or values.shape != (int(mask.sum()),):
                raise EditorError(f"wise: shard {entry['serial']} does not match its mask (seed or model changed?)")
            delta = torch.zeros(self.d_model, self.d_ff, device=self.host.device)
            delta[mask] = values.float()
            gram = tensors.get(f"gram_{entry['serial']}")
            if gram is None and self.config.update == "min_norm" and self.config.protect > 0:
                raise EditorError(f"wise: shard {entry['serial']} was saved without the Gram matrix that protect needs")
            gram = gram.double() if gram is not None else None
            shards.append(Shard(serial=entry["serial"], edit_ids=list(entry["edit_ids"]), delta=delta, gram=gram))
        self.shards, self.next_serial = shards, int(extra.get("next_serial", len(shards)))
        self.prefixes = list(extra.get("prefixes") or [])
        self.center = tensors["center"].float() if "center" in tensors else None
        if shards and self.center is None:
            raise EditorError("wise: saved shards without their background centre")
        self.acts = {k: float(v) for k, v in extra["acts"].items()}
        self.meta = dict(extra.get("meta") or {})
        self._prompt_inputs = {}
        self._merge()
