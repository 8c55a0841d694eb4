"""Training RECIPE's networks for one base model (`kmd recipe train`).

The LLM and the sentence encoder stay frozen. Per step, on records of the training split
(statement = prompt + target, reliability prompt, rephrase, locality prompt):

- retrieval (InfoNCE over [sentinel, statements of the batch], on `batch_size` records;
  cheap, the encoder outputs are cached): a reliability or rephrase query picks its own
  statement; the same query with its statement left out, and every locality query, pick
  the sentinel;
- edit (on the first `llm_batch` records): hinged NLL of the target after the prompt
  and after the rephrase, with the edit's prefix prepended (its continuous prompts, then
  its statement context when `context_repeats` > 0);
- locality: KL from the unedited model to the model with that prefix prepended to an
  unrelated locality prompt, on its answer tokens.

Every `val_every` steps: validation (retrieval and teacher-forced accuracy with
retrieval decided by the sentinel, as served), `last.safetensors` plus the optimiser
state for resuming, and `best.safetensors` when the validation score improves. A run
stops after `steps` steps or `max_minutes`, and a rerun with the same --out resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from loguru import logger
from safetensors.torch import load_file, save_file

from kmd.editors.batching import teacher_forced_batch
from kmd.editors.hooks import resolve_module
from kmd.editors.prefix import stack_left_padded
from kmd.editors.recipe.model import (
    RecipeNetworks,
    edit_prefix,
    edit_prompts,
    encode_texts,
    load_networks,
    new_networks,
    save_networks,
    statement,
)

if TYPE_CHECKING:
    from kmd.editors.bench.data import EditRecord
    from kmd.editors.model import ModelHost

Progress = Callable[[int, int, dict[str, float]], None]  # (step, total, latest figures)


@dataclass(frozen=True)
class TrainOptions:
    steps: int = 3000
    batch_size: int = 64  # records per retrieval step (no LLM involved)
    llm_batch: int = 4  # records per step that go through the LLM (edit and locality losses)
    # Retrieval-only updates per step (each on its own `batch_size` records), the last one
    # joined with the LLM losses: retrieval costs no LLM pass, so it can learn faster.
    retrieval_updates: int = 8
    target_tokens: bool = True  # prompts built on the target's token embeddings (RecipeShape)
    context_repeats: int = 3  # the statement's tokens, repeated, after the prompts (RecipeShape); 0: the paper
    lr: float = 3e-4  # Adam (the paper: 1e-5 while fine-tuning RoBERTa; our MLPs start from scratch)
    edit_hinge: float = 0.05  # hinged NLL: no edit loss once a row's NLL is below this
    retrieval_weight: float = 1.0
    edit_weight: float = 1.0
    locality_weight: float = 1.0
    val_every: int = 100
    val_size: int = 200  # records held out from the training file when no validation file is given
    max_minutes: float | None = None  # stop (and save) after this much wall time
    hidden: int = 1024
    rep_dim: int = 384
    n_prompts: int = 3
    temperature: float = 0.05
    seed: int = 0


@dataclass
class Encoded:
    """Encoder outputs (N, 384) for each text role of a record list, computed once."""

    statements: torch.Tensor
    prompts: torch.Tensor
    rephrases: torch.Tensor
    localities: torch.Tensor

    @classmethod
    def of(cls, records: Sequence[EditRecord], device: torch.device) -> Encoded:
        return cls(
            statements=encode_texts([statement(r.prompt, r.target) for r in records], device),
            prompts=encode_texts([r.prompt for r in records], device),
            rephrases=encode_texts([rephrase(r) for r in records], device),
            localities=encode_texts([r.loc_prompt for r in records], device),
        )


def rephrase(record: EditRecord) -> str:
    return record.rephrases[0] if record.rephrases else record.prompt


class PrependedLM:
    """The frozen LLM with per-row vectors prepended to the token embeddings (differentiable)."""

    def __init__(self, host: ModelHost) -> None:
        self.host = host
        self.embed = resolve_module(host.model, host.profile.layout.embed)
        self.lm_head = resolve_module(host.model, host.profile.layout.lm_head)

    def target_logits(self, pairs: Sequence[tuple[str, str]], prefixes: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, Any]:
        """(K, V) logits at the target positions of `prompt + " " + target` rows; one prefix
        (n_i, D) per row, left-padded and masked to the longest, or None."""
        batch = teacher_forced_batch(self.host, pairs)
        embeds = self.embed(batch.input_ids)  # (B, T, D)
        attention, shift = batch.attention_mask, 0
        if prefixes is not None:
            vectors, real = stack_left_padded(prefixes)  # (B, n, D), (B, n) or None
            shift = vectors.shape[1]
            pad = attention.new_ones(attention.shape[0], shift) if real is None else real.to(attention.dtype)
            embeds = torch.cat([vectors.to(embeds.dtype), embeds], dim=1)
            attention = torch.cat([pad, attention], dim=1)
        hidden = self.host.model.model(inputs_embeds=embeds, attention_mask=attention, use_cache=False).last_hidden_state
        return self.lm_head(hidden[batch.rows, batch.positions + shift]).float(), batch


class Trainer:
    def __init__(self, host: ModelHost, train: Sequence[EditRecord], val: Sequence[EditRecord], out: Path, options: TrainOptions) -> None:
        self.host, self.train, self.val, self.out, self.options = host, list(train), list(val), out, options
        if len(self.train) < 2 or not self.val:
            raise ValueError("recipe training needs at least 2 training records and 1 validation record")
        self.lm = PrependedLM(host)
        out.mkdir(parents=True, exist_ok=True)

    # ----- state on disk ---------------------------------------------------------------------
    def _progress_file(self) -> Path:
        return self.out / "progress.json"

    def _resume(self, networks: RecipeNetworks, optimiser: torch.optim.Optimizer) -> dict[str, Any]:
        progress = {"step": 0, "best_score": -math.inf, "best_step": None, "seconds": 0.0, "history": []}
        if not self._progress_file().is_file():
            return progress
        saved = json.loads(self._progress_file().read_text())
        free = ("steps", "max_minutes", "val_every")  # a resumed run may go on longer
        mine = {k: v for k, v in asdict(self.options).items() if k not in free}
        theirs = {"context_repeats": 0} | saved.get("options", {})  # runs from before the option had none
        if {k: v for k, v in theirs.items() if k not in free} != mine:
            raise ValueError(f"{self.out}: a run with other options is there; use another --out or the same options")
        loaded, _ = load_networks(self.out / "last.safetensors", self.host)
        networks.load_state_dict(loaded.state_dict())
        state = load_file(str(self.out / "optimizer.safetensors"))
        params = list(networks.parameters())
        for index, param in enumerate(params):
            if f"{index}.exp_avg" in state:
                optimiser.state[param] = {
                    "step": state[f"{index}.step"],
                    "exp_avg": state[f"{index}.exp_avg"].to(param.device),
                    "exp_avg_sq": state[f"{index}.exp_avg_sq"].to(param.device),
                }
        logger.info("recipe train: resuming {} at step {}", self.out, saved["step"])
        return {k: saved[k] for k in progress}

    def _save(self, networks: RecipeNetworks, optimiser: torch.optim.Optimizer, progress: dict[str, Any], best: bool) -> None:
        info = {"step": progress["step"], "options": asdict(self.options), "validation": progress["history"][-1:]}
        if best:
            summary = f"step {progress['step']}, validation score {progress['best_score']:.4f}"
            save_networks(networks, self.host, self.out / "best.safetensors", info | {"summary": summary})
        save_networks(networks, self.host, self.out / "last.safetensors", info | {"summary": f"step {progress['step']}"})
        state = {}
        for index, param in enumerate(networks.parameters()):
            entry = optimiser.state.get(param)
            if entry:
                state[f"{index}.step"] = torch.as_tensor(entry["step"]).float().reshape(())
                state[f"{index}.exp_avg"] = entry["exp_avg"].detach().cpu().contiguous()
                state[f"{index}.exp_avg_sq"] = entry["exp_avg_sq"].detach().cpu().contiguous()
        save_file(state, str(self.out / ".optimizer.tmp"))
        (self.out / ".optimizer.tmp").replace(self.out / "optimizer.safetensors")
        tmp = self.out / ".progress.tmp"
        tmp.write_text(json.dumps(progress | {"options": asdict(self.options)}, indent=1))
        tmp.replace(self._progress_file())

    def _encoded(self, name: str, records: Sequence[EditRecord]) -> Encoded:
        """Encoder outputs for `records`, cached in --out (keyed by the texts) for resumed runs."""
        texts = [(statement(r.prompt, r.target), r.prompt, rephrase(r), r.loc_prompt) for r in records]
        key = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
        cache = self.out / f"encoded-{name}-{key}.safetensors"
        if cache.is_file():
            return Encoded(**{k: v.to(self.host.device) for k, v in load_file(str(cache)).items()})
        logger.info("recipe train: encoding {} {} records", len(records), name)
        encoded = Encoded.of(records, self.host.device)
        save_file({k: v.cpu().contiguous() for k, v in asdict(encoded).items()}, str(cache))
        return encoded

    def _batch(self, serial: int) -> torch.Tensor:
        """The `serial`-th batch of `batch_size` training indices (seeded epochs, no repeats within one)."""
        size, n = self.options.batch_size, len(self.train)
        epoch, offset = divmod(serial * size, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.options.seed * 7919 + epoch))
        idx = order[offset : offset + size]
        if len(idx) < 2:
            idx = order[:size]
        return idx.to(self.host.device)

    # ----- losses ------------------------------------------------------------------------------
    def retrieval_loss(self, networks: RecipeNetworks, enc: Encoded, idx: torch.Tensor) -> torch.Tensor:
        keys = networks.knowledge_reps(enc.statements[idx])  # (B, R)
        b = len(idx)
        own = torch.arange(1, b + 1, device=keys.device)
        sentinel = torch.zeros(b, dtype=torch.long, device=keys.device)
        eye = torch.eye(b, dtype=torch.bool, device=keys.device)
        losses = []
        for queries in (enc.prompts[idx], enc.rephrases[idx]):
            logits = networks.retrieval_logits(networks.query_reps(queries), keys)  # (B, 1 + B)
            losses.append(F.cross_entropy(logits, own))
            absent = logits.clone()
            absent[:, 1:] = absent[:, 1:].masked_fill(eye, float("-inf"))  # own statement left out
            losses.append(F.cross_entropy(absent, sentinel))
        loc = networks.retrieval_logits(networks.query_reps(enc.localities[idx]), keys)
        losses.append(F.cross_entropy(loc, sentinel))
        return torch.stack(losses).mean()

    def edit_and_locality_loss(self, networks: RecipeNetworks, enc: Encoded, records: Sequence[EditRecord], idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        opts = self.options
        chosen = [records[i] for i in idx.tolist()]
        vectors = edit_prompts(networks, self.host, networks.knowledge_reps(enc.statements[idx]), [r.target for r in chosen])  # (b, n, D)
        prefixes = [edit_prefix(self.host, networks.shape, v, r.prompt, r.target) for v, r in zip(vectors, chosen)]
        pairs = [(r.prompt, r.target) for r in chosen] + [(rephrase(r), r.target) for r in chosen]
        logits, batch = self.lm.target_logits(pairs, prefixes + prefixes)
        nll = F.cross_entropy(logits, batch.labels, reduction="none")
        rows = torch.stack([nll[a:b].mean() for a, b in batch.spans])
        edit = F.relu(rows - opts.edit_hinge).mean()
        # Locality: record i's prompts on the next record's locality prompt (an unrelated input).
        loc_pairs = [(records[j].loc_prompt, records[j].loc_answer) for j in idx.roll(1).tolist()]
        with torch.no_grad():
            base, _ = self.lm.target_logits(loc_pairs, None)
        edited, _ = self.lm.target_logits(loc_pairs, prefixes)
        kl = F.kl_div(edited.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="batchmean")
        return edit, kl

    # ----- validation -----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, networks: RecipeNetworks, enc: Encoded) -> dict[str, float]:
        """Served behaviour on the validation records, all edited at once: retrieval decided by
        the sentinel; teacher-forced target accuracy with the retrieved prompts (rel, gen) and
        locality queries that retrieve nothing (loc_clear)."""
        networks.eval()
        keys = networks.knowledge_reps(enc.statements)
        vectors = edit_prompts(networks, self.host, keys, [r.target for r in self.val])
        prefixes = [edit_prefix(self.host, networks.shape, v, r.prompt, r.target) for v, r in zip(vectors, self.val)]
        figures: dict[str, float] = {}
        for name, queries, pairs in (
            ("rel", enc.prompts, [(r.prompt, r.target) for r in self.val]),
            ("gen", enc.rephrases, [(rephrase(r), r.target) for r in self.val]),
        ):
            logits = networks.retrieval_logits(networks.query_reps(queries), keys)
            pick = logits.argmax(dim=1)  # 0: the sentinel won
            own = pick == torch.arange(1, len(self.val) + 1, device=pick.device)
            accuracy = []
            for start in range(0, len(pairs), 16):
                chunk = slice(start, start + 16)
                hit = pick[chunk] > 0
                # rows without a hit run bare: scored separately, without prefixes
                scored = torch.zeros(len(pairs[chunk]), device=pick.device)
                for mask, has_prefix in ((hit, True), (~hit, False)):
                    if mask.any():
                        sub = [p for p, m in zip(pairs[chunk], mask.tolist()) if m]
                        picked = [prefixes[i - 1] for i in pick[chunk][mask].tolist()] if has_prefix else None
                        lg, batch = self.lm.target_logits(sub, picked)
                        correct = (lg.argmax(-1) == batch.labels).float()
                        scored[mask] = torch.stack([correct[a:b].mean() for a, b in batch.spans])
                accuracy.append(scored)
            figures[name] = float(torch.cat(accuracy).mean())
            figures[f"{name}_retrieved_own"] = float(own.float().mean())
        loc_logits = networks.retrieval_logits(networks.query_reps(enc.localities), keys)
        figures["loc_clear"] = float((loc_logits.argmax(dim=1) == 0).float().mean())
        figures["score"] = (figures["rel"] + figures["gen"] + figures["loc_clear"]) / 3
        networks.train()
        return figures

    # ----- the loop ------------------------------------------------------------------------------
    def run(self, progress: Progress | None = None) -> dict[str, Any]:
        opts, host = self.options, self.host
        torch.manual_seed(opts.seed)
        networks = new_networks(
            host, hidden=opts.hidden, rep_dim=opts.rep_dim, n_prompts=opts.n_prompts,
            temperature=opts.temperature, target_tokens=opts.target_tokens, context_repeats=opts.context_repeats,
        )
        optimiser = torch.optim.Adam(networks.parameters(), lr=opts.lr)
        state = self._resume(networks, optimiser)
        started, before = time.perf_counter(), state["seconds"]  # wall time of earlier runs into this --out
        enc_train, enc_val = self._encoded("train", self.train), self._encoded("val", self.val)
        networks.train()
        figures: dict[str, float] = {}
        step = state["step"]
        stopped = "steps"
        while step < opts.steps:
            with torch.enable_grad():
                for extra in range(opts.retrieval_updates - 1):
                    optimiser.zero_grad()
                    self.retrieval_loss(networks, enc_train, self._batch(step * opts.retrieval_updates + extra + 1)).backward()
                    optimiser.step()
                idx = self._batch(step * opts.retrieval_updates)
                retrieval = self.retrieval_loss(networks, enc_train, idx)
                edit, kl = self.edit_and_locality_loss(networks, enc_train, self.train, idx[: opts.llm_batch])
                loss = opts.retrieval_weight * retrieval + opts.edit_weight * edit + opts.locality_weight * kl
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            step += 1
            figures = {"loss": loss.item(), "retrieval": retrieval.item(), "edit": edit.item(), "kl": kl.item()}
            elapsed = before + time.perf_counter() - started
            out_of_time = opts.max_minutes is not None and elapsed >= opts.max_minutes * 60
            if step % opts.val_every == 0 or step == opts.steps or out_of_time:
                val = self.validate(networks, enc_val)
                figures |= {f"val_{k}": v for k, v in val.items()}
                state["history"].append({"step": step, **{k: round(v, 5) for k, v in figures.items()}})
                best = val["score"] > state["best_score"]
                if best:
                    state["best_score"], state["best_step"] = val["score"], step
                state["step"], state["seconds"] = step, elapsed
                self._save(networks, optimiser, state, best)
                logger.info("recipe train: step {} {}", step, " ".join(f"{k} {v:.4f}" for k, v in figures.items()))
            if progress is not None:
                progress(step, opts.steps, figures)
            if out_of_time:
                stopped = "max_minutes"
                break
        return {
            "steps": step,
            "stopped": stopped,
            "best_step": state["best_step"],
            "best_score": state["best_score"],
            "seconds": round(state["seconds"], 1),
            "best": str(self.out / "best.safetensors"),
            "last_validation": state["history"][-1] if state["history"] else None,
        }


def split_validation(records: Sequence[EditRecord], val_size: int, seed: int) -> tuple[list[EditRecord], list[EditRecord]]:
    """Hold out `val_size` records (seeded) when no validation file is given."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[: min(val_size, len(records) // 5 or 1)])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]
