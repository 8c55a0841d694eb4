"""RECIPE: retrieval-augmented continuous prompts (see docs/methods.md, "RECIPE").

What a routed row is shown (`context`): by default ("statement", ours) the retrieved edit as
one plain sentence ("Known fact (current, verified): <prompt> <target>.") in front of the
row, plus the answer pointer (editors/answer_stop.py); the trained networks then serve
retrieval only. With "trained", the paper's continuous prompts as below.

Editing is a forward pass, no optimisation: the edit's statement ("prompt target") goes
through the frozen sentence encoder and the trained knowledge MLP (r_k, one repository
row) and the prompt MLP (n_prompts continuous vectors, prepended to the token embeddings
of the rows that retrieve this edit; with an editor trained with `context_repeats` (ours),
followed by the statement's own token embeddings, repeated). The prefix's per-layer
keys/values are computed once per edit, when a row first retrieves it (`PrefixInjector`;
one pass of the prefix positions through every layer, ~0.1 s on a CPU for 3 of them,
most of what an edit would otherwise cost), and kept (up to `kv_cache_mb`, the least
recently retrieved dropped first); serving only merges them into routed rows.

Serving, per row of a batch and from prompt tokens only: on the prefill, each row's
prompt tokens are decoded to text, encoded, and mapped by the query MLP to r_q; the row
retrieves its nearest stored edit when that scores above the Knowledge Sentinel (and
`margin`) and the question check accepts it, else the next `runners_up` edits that clear
the sentinel in turn; otherwise it runs as the base model. KV-cache decode steps reuse the
decision.

The trained networks come from `kmd recipe train` (editors/recipe/train.py); the
editor's `checkpoint` option names that file, and its checksum is kept in the saved
state. Revert deletes the edit's row: exact.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from loguru import logger

from kmd.editors.answer_stop import RoutedAnswers, TokenTexts, pointer_hook
from kmd.editors.hooks import HookSpec
from kmd.editors.protocol import EditorError, EditRequest, Editor, ranked_candidates
from kmd.editors.regroup import Regroup
from kmd.editors.rows import GrowingRows
from kmd.editors.recipe.config import RecipeConfig
from kmd.editors.prefix import Injection, PrefixInjector, answers_of, regrouped_decisions, stack_left_padded  # served like LLP's prefix
from kmd.editors.recipe.model import (
    CheckpointError,
    edit_prefix,
    edit_prompts,
    encode_texts,
    fact_context_ids,
    token_embedding,
    load_networks,
    packaged_checkpoint,
    statement,
)

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost


OWN_PROMPT_SLACK = 0.01  # the bar sits this far under the own questions' lowest margin (cosine units)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def last_sentence(text: str, min_words: int = 3) -> str:
    """The text after its last sentence end ('.', '!' or '?' then a space), when that has at
    least `min_words` words; else the whole text."""
    parts = _SENTENCE_END.split(text.strip())
    last = parts[-1].strip()
    return last if len(parts) > 1 and len(last.split()) >= min_words else text


def kv_bytes(entry: tuple[torch.Tensor, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in entry)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class RecipeEditor(Editor):
    name = "recipe"
    config_class = RecipeConfig
    SERVING_ONLY = ("runners_up",)

    def __init__(self, host: ModelHost, config: RecipeConfig | None = None) -> None:
        super().__init__(host, config)
        path = Path(self.config.checkpoint).expanduser() if self.config.checkpoint else packaged_checkpoint(host)
        if path is None:
            raise CheckpointError(
                f"recipe: no trained editor for {host.identity.name} (kmd ships one for SmolLM2-135M-Instruct "
                "only). Train one with `kmd recipe train --model M --data FILE --out DIR` and set the backend option "
                "checkpoint=DIR/best.safetensors (profile `backends: recipe:` or `--set checkpoint=...`)"
            )
        self.networks, meta = load_networks(path, host)
        self.checkpoint_sha256 = file_sha256(path)
        self.injector = PrefixInjector(host, range(host.num_layers), self.name)
        self.answer_texts = TokenTexts(host.tokenizer)
        shape, device = self.networks.shape, host.device
        self.reps = torch.empty(0, shape.rep_dim, device=device)  # (N, R) knowledge reps
        self.prompts = torch.empty(0, shape.n_prompts, shape.d_model, device=device)  # (N, n, D)
        self.row_ids: list[str] = []
        self.shifts = torch.empty(0, device=device)  # (N,) per-edit threshold_shift (cosine units)
        self.bars = torch.empty(0, device=device)  # (N,) per-edit bar on the margin over the sentinel (<= 0; _own_questions_bar)
        self.grown = GrowingRows()  # the buffers the four tensors above are prefix views of
        if not self.config.kv_cache_mb > 0:
            raise EditorError("recipe: kv_cache_mb must be > 0")
        # edit id -> its prefix's keys (pre-RoPE) and values, each (L, n, n_kv, hd), computed on
        # first retrieval (`_prefix_kv`), least recently used first; derived from `prompts`
        # and the edit's request, so not saved.
        self._kv: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._kv_bytes = 0
        logger.info("recipe: trained editor {} ({})", path, meta.get("training", {}).get("summary", "no summary"))

    # ----- editing: one encoder forward ----------------------------------------------------
    @torch.no_grad()
    def _apply(self, edit_id: str, request: EditRequest) -> None:
        encoded = encode_texts([statement(request.prompt, request.target)], self.host.device)
        rep = self.networks.knowledge_reps(encoded)  # (1, R)
        vectors = edit_prompts(self.networks, self.host, rep, [request.target])  # (1, n, D)
        self.grown.append(self, "reps", rep)
        self.grown.append(self, "prompts", vectors)
        self.grown.append(self, "shifts", torch.tensor([float(self.config.threshold_shift)], device=self.shifts.device))
        self.grown.append(self, "bars", self._own_questions_bar([request.prompt, *request.rephrases], rep, self.shifts[-1:]))
        self.row_ids.append(edit_id)

    def _own_questions_bar(self, questions: Sequence[str], rep: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """(1,) the margin over the sentinel this edit's rows must clear: 0, or lower when one
        of the edit's own questions (its prompt and the request's paraphrases, e.g. a
        policy's "{subject} is led by its chief executive,") does not clear the sentinel, by
        at most `own_prompt_bar_floor`. The trained retriever puts some prompts ("Lange,
        Reinerus follows": 6 of 100 development edits never fired) and paraphrases of made-up
        names closer to the sentinel than to their own edit. A lower bar reaches more rows,
        and the question check then lets through only those that name the edit's subject
        and ask its relation."""
        floor = float(self.config.own_prompt_bar_floor)
        if floor <= 0 or not self.config.question_check:  # unchecked, a lower bar would reach other questions
            return torch.zeros(1, device=rep.device)
        _, over = self._scores(self._query_reps(questions).flatten(0, 1), rep, shift)  # (len(questions) * Q, 1): this edit alone
        own = float(over.view(len(questions), -1).max(dim=1).values.min())  # each question's best query, as _match picks
        return torch.tensor([max(-floor, min(0.0, own - OWN_PROMPT_SLACK))], device=rep.device)

    @torch.no_grad()
    def _prefix_kv(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (L, n, n_kv, hd) of row `row`'s prefix (its prompts, then its statement
        context; n differs per edit with a context), computed once, one edit at a time (so they
        do not depend on which other edits a batch retrieves)."""
        edit_id = self.row_ids[row]
        if edit_id in self._kv:
            self._kv.move_to_end(edit_id)
            return self._kv[edit_id]
        request = self.request(edit_id)
        if self.config.context == "statement":
            ids = torch.tensor(fact_context_ids(self.host, request.prompt, request.target), device=self.host.device)
            prefix = token_embedding(self.host)(ids).float()  # (n, D)
        else:
            prefix = edit_prefix(self.host, self.networks.shape, self.prompts[row], request.prompt, request.target)
        keys, values = self.injector.prefix_kv(prefix[None].to(self.host.model.dtype))
        entry = (keys[0].float(), values[0].float())
        self._kv[edit_id] = entry
        self._kv_bytes += kv_bytes(entry)
        while self._kv_bytes > self.config.kv_cache_mb * 2**20 and len(self._kv) > 1:
            self._drop_kv(next(iter(self._kv)))
        return entry

    def _drop_kv(self, edit_id: str) -> None:
        entry = self._kv.pop(edit_id, None)
        if entry is not None:
            self._kv_bytes -= kv_bytes(entry)

    def _revert(self, edit_id: str) -> None:
        row = self.row_ids.index(edit_id)
        keep = torch.tensor([i for i in range(len(self.row_ids)) if i != row], dtype=torch.long, device=self.reps.device)
        self.reps, self.prompts, self.shifts, self.bars = self.reps[keep], self.prompts[keep], self.shifts[keep], self.bars[keep]
        self._drop_kv(edit_id)
        del self.row_ids[row]

    # ----- serving -------------------------------------------------------------------------
    @torch.no_grad()
    def retrieve(self, queries: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query text: (best row, hit). A hit beats the sentinel by more than `margin`
        and passes the question check (the query asks what the edit's prompt asks)."""
        return self._routed(self._query_reps(queries), queries)

    def _routed(self, reps: torch.Tensor, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Q, R) query reps and the rows' texts -> per row (edit row, hit): the nearest
        edit that clears the sentinel, or the next `runners_up` of them in turn, the first
        the question check accepts (`Editor.first_answerable`)."""
        winner, hit, scores, cleared = self._match(reps)
        return self.first_answerable(hit, winner, self.row_ids, lambda rows: [questions[r] for r in rows],
                                     ranked_candidates(winner, scores, cleared, self.config.runners_up))

    def _query_reps(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, Q, R) query reps of each text: the whole text, then (when `last_sentence_query`)
        its last sentence, or the whole text again when it has one sentence."""
        whole = self.networks.query_reps(encode_texts(list(texts), self.host.device))  # (B, R)
        if not self.config.last_sentence_query:
            return whole[:, None]
        last = whole.clone()
        lasts = {i: last_sentence(t) for i, t in enumerate(texts)}
        several = [i for i, t in enumerate(texts) if lasts[i] != t]  # one-sentence texts: the same rep
        if several:
            last[several] = self.networks.query_reps(encode_texts([lasts[i] for i in several], self.host.device))
        return torch.stack([whole, last], dim=1)

    def _match(self, reps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, Q, R) query reps (or (B, R)) -> per row (best row (B,), hit (B,), every edit's
        score (B, N), cleared (B, N): which edits clear the sentinel and their bar), all
        from the one of the row's Q queries whose best edit clears the sentinel by the
        widest margin."""
        if reps.dim() == 2:
            reps = reps[:, None]
        b, q, r = reps.shape
        scores, over = self._scores(reps.reshape(b * q, r), self.reps, self.shifts)  # (B*Q, N) each
        margins = over - self.bars[None, :]  # (B*Q, N)
        best = scores.argmax(dim=1)
        margin = margins.gather(1, best[:, None])[:, 0]  # (B*Q,)
        chosen = margin.view(b, q).argmax(dim=1)  # ties: the whole text
        picked = torch.arange(b, device=reps.device) * q + chosen  # (B,) rows of the (B*Q, ...) tensors
        return best[picked], margin[picked] > 0, scores[picked], margins[picked] > 0

    def _scores(self, queries: torch.Tensor, keys: torch.Tensor, shifts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (M, R), edits' knowledge reps `keys` (N, R), their shifts (N,) -> (scores
        (M, N): cosines less each edit's shift, which rank the edits; margins (M, N): how far
        each score clears the sentinel's cosine and `margin`)."""
        logits = self.networks.retrieval_logits(queries, keys) * self.networks.shape.temperature  # (M, 1 + N), sentinel first
        scores = logits[:, 1:] - shifts[None, :]
        return scores, scores - logits[:, :1] - self.config.margin

    def _hook_specs(self) -> list[HookSpec]:
        layout = self.host.profile.layout
        return [
            HookSpec(layout.embed, self._grab_ids),
            HookSpec(layout.path("layer", 0), self._decide, "forward_pre", with_kwargs=True),
            *self.injector.specs(self._current),
            HookSpec(layout.lm_head, pointer_hook(lambda: answers_of(self._current()))),
        ]

    def _grab_ids(self, module, args, output):
        decisions = self.routing().decisions
        decision = decisions.get(self.name)
        if decision is None:  # the prefill: the prompt's token ids
            decisions[self.name] = {"ids": args[0], "injection": None, "done": False}
        elif decision["done"] and decision["injection"] is not None:
            decision["injection"].decode_step(args[0])  # a decode step: has the answer been written yet?
        return None

    def _decide(self, module, args, kwargs):
        routing = self.routing()
        decision = routing.decisions.get(self.name)
        if decision is None or decision["done"]:
            return None
        decision["done"] = True
        ids = decision.pop("ids")
        batch, seq = ids.shape
        mask = routing.mask_for(batch, seq, ids.device)
        best, hit = self.retrieve(self._query_texts(ids, mask))
        rows = hit.nonzero().flatten()
        if rows.numel() == 0:
            return None
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(seq, device=ids.device)[None]
        position_ids = position_ids.expand(batch, seq)
        first = mask.int().argmax(dim=1)  # first prompt token of each row
        p_first = position_ids[torch.arange(batch, device=ids.device), first]
        keys, values = zip(*(self._prefix_kv(row) for row in best[rows].tolist()))
        keys, real = stack_left_padded(keys, dim=1)  # (Bh, L, n, n_kv, hd), (Bh, n) or None
        values, _ = stack_left_padded(values, dim=1)
        injection = decision["injection"] = Injection(rows=rows, keys=keys, values=values, p_first=p_first[rows], prefix_mask=real)
        targets = [self.request(self.row_ids[r]).target for r in best[rows].tolist()]
        last = routing.last_prompt_index(batch, seq, ids.device)[rows]
        injection.answers = RoutedAnswers.start(self.answer_texts, self.config.answer, rows, targets, ids, last)
        return None

    def _regroup(self, how: Regroup, decisions: list[dict[str, Any]]) -> dict[str, Any]:
        """A regrouped batch (continuous batching): each routed row keeps its prefix and answer state."""
        return regrouped_decisions(self.name, how, decisions)

    # ----- routing-aware probing ----------------------------------------------------------
    @torch.no_grad()
    def routing_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """{"reps": (B, Q, R)} each row's query reps from its prompt text (encoder and query MLP
        only); "questions": the texts, for the question check."""
        texts = self._query_texts(input_ids, attention_mask.bool())
        return {"reps": self._query_reps(texts), "questions": texts}

    def _query_texts(self, ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[str]:
        """Each row's retrieval query: its prompt text, a chat turn's question only (not the
        template's text); serving and routing-aware probing read the same."""
        return self.host.chat.questions(ids, prompt_mask)

    def routes(self, features: dict[str, Any]) -> list[str | None]:
        """The edit each row retrieves (as `_decide` does), by edit id; a stored edit never changes."""
        reps = features["reps"]
        if not self.row_ids:
            return [None] * reps.shape[0]
        best, hit = self._routed(reps, features["questions"])
        return [self.row_ids[b] if h else None for b, h in zip(best.tolist(), hit.tolist())]

    def _current(self) -> Injection | None:
        decision = self.routing().decisions.get(self.name)
        return decision["injection"] if decision else None

    # ----- persistence -----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"reps": self.reps, "prompts": self.prompts, "shifts": self.shifts, "bars": self.bars}

    def extra_state(self) -> dict[str, Any]:
        return {"row_ids": self.row_ids, "checkpoint_sha256": self.checkpoint_sha256}

    def _restore(self, requests: Sequence[EditRequest], tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        if extra.get("checkpoint_sha256") != self.checkpoint_sha256:
            raise EditorError("recipe: the saved edits were made with another trained editor (checkpoint checksum differs)")
        ids = list(extra.get("row_ids", []))
        if sorted(ids) != sorted(r.edit_id for r in requests):
            raise EditorError("recipe: saved rows do not match the saved edits")
        loaded = {k: tensors[k].float() for k in ("reps", "prompts")}
        if any(t.shape[0] != len(ids) for t in loaded.values()) or loaded["prompts"].shape[1:] != self.prompts.shape[1:]:
            raise EditorError("recipe: saved tensors do not match the saved rows / model")
        shifts = tensors.get("shifts", torch.zeros(len(ids))).float()  # absent in states saved before shifts
        if shifts.shape != (len(ids),):
            raise EditorError("recipe: saved threshold shifts do not match the saved rows")
        bars = tensors.get("bars", torch.zeros(len(ids))).float()  # absent in states saved before bars: 0, as they were
        if bars.shape != (len(ids),):
            raise EditorError("recipe: saved bars do not match the saved rows")
        self.reps, self.prompts = loaded["reps"], loaded["prompts"]
        self.shifts, self.bars = shifts.to(self.reps.device), bars.to(self.reps.device)
        self.row_ids, self._kv, self._kv_bytes = ids, OrderedDict(), 0
