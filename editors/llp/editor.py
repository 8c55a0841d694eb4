"""LLP, Layer-Level Prompting (see docs/methods.md, "LLP").

Each edit owns one row of a key memory and one row of a value memory:

- keys, one per retrieval layer l in R (the first quarter of the network): layer l's
  output at the last subject token of the prompt, averaged over the bare prompt and a
  few prefixed copies (short texts the model generated itself), then trained with an
  InfoNCE loss to stay close to those queries and away from the other edits' keys;
- b value vectors that act as if prepended to the sequence entering the injection
  layer z = max(R) + 1, trained so the prompts continue with the target. They are
  served as extra key/value pairs at layers >= z (editors/prefix.py explains why
  this is exactly prepending, and how it keeps other rows and the KV cache untouched).

Serving, per row of a batch and from prompt tokens only: at every l in R, each key's
similarity is its maximum cosine over the row's prompt tokens; the top-k keys above
`similarity` get one vote each. The key with the most votes is used when it has at
least `vote_fraction * |R|` of them and the question check accepts it (if it refuses,
the next `runners_up` keys with the votes are offered in turn); otherwise the row runs as
the base model. The decision is taken on the prefill and reused by KV-cache decode steps.

Revert deletes the edit's rows: exact. During an edit's optimisation the layers below
z run once (`UpperStack`); each step runs the b vectors through layers z.. (a few
positions) and the prompts through layers z.. with the merge.

The package: `LlpEditor` (here) holds the edits' rows and the background statistics and
is composed of `RetrievalReader` and `Background` (statistics.py: the retrieval layers'
states and the space keys live in), `EditTrainer` (training.py: an edit's key and value),
the vote (voting.py) and `ServingHooks` (serving.py: the prefill's decision, the merge).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from loguru import logger

from kmd.editors.answer_stop import TokenTexts
from kmd.editors.augment import generate_prefixes, with_prefix
from kmd.editors.batching import TeacherForcedBatch, teacher_forced_batch
from kmd.editors.chat import Turns
from kmd.editors.hooks import HookSpec
from kmd.editors.llp.config import LlpConfig
from kmd.editors.llp.serving import Questions, ServingHooks
from kmd.editors.llp.statistics import Background, RetrievalReader
from kmd.editors.llp.training import EditTrainer
from kmd.editors.llp.voting import (decide, key_basis, key_bounds, layer_thresholds, layer_votes, max_similarities,
                                    runners_up, shortlisted_max_similarities, vote_over_layers, votes_needed)
from kmd.editors.prefix import PrefixInjector, regrouped_decisions
from kmd.editors.protocol import EditorError, EditRequest, Editor
from kmd.editors.regroup import Regroup
from kmd.editors.rows import GrowingRows
from kmd.editors.scoring import capture_prefill
from kmd.editors.upper import UpperStack

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost


def default_layers(num_layers: int, config: LlpConfig) -> tuple[list[int], int]:
    """(R, z) from the config, or from depth fractions when unset."""
    if config.retrieval_layers is not None:
        retrieval = sorted({int(i) for i in config.retrieval_layers})
    else:
        retrieval = list(range(max(1, round(num_layers / 4))))
    z = config.injection_layer if config.injection_layer is not None else max(retrieval) + 1
    if not retrieval or min(retrieval) < 0 or not max(retrieval) < z < num_layers:
        raise EditorError(f"llp: need 0 <= R < z < {num_layers}; got R={retrieval}, z={z}")
    return retrieval, z


class LlpEditor(Editor):
    """Holds the edits (one key row and one value row each) and the background statistics;
    reading the retrieval layers (`RetrievalReader`), training an edit (`EditTrainer`), the
    vote (editors/llp/voting.py) and the serving hooks (`ServingHooks`) are collaborators."""

    name = "llp"
    config_class = LlpConfig

    def __init__(self, host: ModelHost, config: LlpConfig | None = None) -> None:
        super().__init__(host, config)
        cfg, layout = self.config, host.profile.layout
        self.retrieval, self.z = default_layers(host.num_layers, cfg)
        if cfg.n_values < 1 or cfg.top_k < 1 or not 0 < cfg.vote_fraction <= 1:
            raise EditorError("llp: n_values and top_k must be >= 1 and vote_fraction in (0, 1]")
        if cfg.layer_similarity is not None and len(cfg.layer_similarity) != len(self.retrieval):
            raise EditorError(f"llp: layer_similarity needs {len(self.retrieval)} values (one per retrieval layer)")
        if not 0 <= cfg.shortlist_rank <= host.model.config.hidden_size or cfg.shortlist_from < 1:
            raise EditorError("llp: shortlist_rank must be in [0, hidden size] and shortlist_from >= 1")
        self._structure = {k: getattr(cfg, k) for k in self.STRUCTURAL}
        self.upper = list(range(self.z, host.num_layers))
        self.layer_paths = [layout.path("layer", i) for i in range(host.num_layers)]
        self.injector = PrefixInjector(host, self.upper, self.name)  # layers z.. merge the prefix
        self.answer_texts = TokenTexts(host.tokenizer)
        self.attentions, self.rotary, self.runner = self.injector.attentions, self.injector.rotary, self.injector.runner
        self.reader = RetrievalReader(host, self.retrieval, self.layer_paths)
        self.trainer = EditTrainer(host, self.reader, self.injector)
        device, d = host.device, host.model.config.hidden_size
        nz, n_kv, head_dim = self.injector.kv_shape  # the layout's k projection, not a hard-coded name
        nr, b = len(self.retrieval), cfg.n_values
        self.keys = torch.empty(0, nr, d, device=device)  # (N, |R|, D) raw (centred when configured)
        self.values = torch.empty(0, b, d, device=device)  # (N, b, D)
        self.prefix_keys = torch.empty(0, nz, b, n_kv, head_dim, device=device)  # pre-RoPE
        self.prefix_values = torch.empty(0, nz, b, n_kv, head_dim, device=device)
        self.grown = GrowingRows()  # keys, values, prefix keys/values, _unit_keys, _shifts: views of its buffers
        self.background = Background.unmeasured(nr, d, device, cfg.normalize)  # per retrieval layer mean/std
        self.row_ids: list[str] = []
        self.meta: dict[str, dict[str, Any]] = {}  # per edit: prefixes used, steps, loss
        self.prefixes: list[str] = []  # generated once (lazily), persisted
        self._unit_keys = torch.empty(nr, 0, d, device=device)  # (|R|, N, D) normalised, for serving
        self._shifts = torch.empty(0, device=device)  # (N,) per-edit threshold shifts
        # The shortlist's bound (`shortlisted_max_similarities`), derived from the unit keys and
        # never saved: a basis (|R|, D, p), fitted at `_basis_keys` keys, and the keys' bound
        # rows (|R|, N, p + 2). None: every key is compared.
        self._basis: torch.Tensor | None = None
        self._basis_keys = 0
        self._key_bounds = torch.empty(nr, 0, cfg.shortlist_rank + 2, device=device)

    # ----- augmentation ----------------------------------------------------------------
    def ensure_prefixes(self) -> list[str]:
        cfg = self.config
        if not self.prefixes and cfg.n_prefixes > 0:
            self.prefixes = generate_prefixes(self.host, cfg.prefix_pool, cfg.prefix_tokens, cfg.seed)
        return self.prefixes

    def ensure_background(self) -> None:
        """Mean/std of each retrieval layer over texts the model generates (once, seeded)."""
        cfg = self.config
        if self.background.ready:
            return
        texts = generate_prefixes(self.host, cfg.background_texts, cfg.background_tokens, cfg.seed + 1)
        self.background = self.background.measured(self.reader.states(texts), cfg.normalize)

    def standardize(self, states: torch.Tensor) -> torch.Tensor:
        """(|R|, ..., D) retrieval-layer states in the space the keys live in."""
        return self.background.standardize(states)

    def variants(self, edit_id: str, prompt: str) -> tuple[list[str], list[int]]:
        """The bare prompt plus `n_prefixes` prefixed copies chosen for this edit."""
        cfg = self.config
        pool = self.ensure_prefixes()
        if cfg.n_prefixes == 0 or not pool:
            return [prompt], []
        chosen = random.Random(f"{cfg.seed}/{edit_id}").sample(range(len(pool)), min(cfg.n_prefixes, len(pool)))
        return [prompt] + [with_prefix(pool[i], prompt) for i in chosen], chosen

    # ----- keys from prompts alone (calibration) ----------------------------------------------
    def key_queries(self, edit_id: str, request: EditRequest) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Key inputs from the prompts alone (layers 0..max(R) only); used by calibration:
        (|R|, P, D) subject queries, (|R|, C, D) context, the prefixes chosen."""
        prompts, chosen = self.variants(edit_id, request.prompt)
        self.ensure_background()
        got = self.reader.states(prompts)
        states = self.standardize(got["states"])
        queries, context = self.trainer.subject_states(self.config, self.standardize, states, prompts, request.subject,
                                                       got["attention_mask"].bool())  # fmt: skip
        return queries, context, chosen

    def train_key(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """InfoNCE per retrieval layer: close to the subject queries, away from the other keys. -> (|R|, D)"""
        return self.trainer.train_key(self.config, queries, context, self.keys)

    def append_key(self, edit_id: str, key: torch.Tensor) -> None:
        """Add a key row only (used by calibration, which needs no values)."""
        self.grown.append(self, "keys", key[None])
        self.row_ids.append(edit_id)
        self._refresh_last()

    @torch.no_grad()
    def prompt_similarities(self, prompts: list[str]) -> torch.Tensor:
        """(|R|, P, N): each key's max cosine over each prompt's tokens, at every retrieval
        layer (the prompts right-padded, run through layers 0..max(R) of the base model)."""
        got = self.reader.states(prompts)
        return self.layer_similarities(got["states"], got["attention_mask"].bool())

    def stronger_overrides(self) -> dict[str, Any]:
        # A retry trains the value longer and lets the edit's key fire a little more easily
        # (the usual reason an LLP edit "did not take" is a paraphrase missing the vote).
        cfg = self.config
        return {"value_steps": cfg.value_steps * 2, "value_stop_loss": cfg.value_stop_loss / 5,
                "threshold_shift": cfg.threshold_shift - 0.02}  # fmt: skip

    # ----- computing an edit -----------------------------------------------------------------
    SERVING_ONLY = ("runners_up", "shortlist_rank", "shortlist_from")
    STRUCTURAL = ("retrieval_layers", "injection_layer", "n_values", "normalize", "background_texts", "background_tokens")

    def _apply(self, edit_id: str, request: EditRequest) -> None:
        changed = [k for k in self.STRUCTURAL if getattr(self.config, k) != self._structure[k]]
        if changed:  # `configured(...)` may tune the optimisation per edit, not the memory layout
            raise EditorError(f"llp: {changed} cannot change between edits")
        self.ensure_background()
        prompts, chosen = self.variants(edit_id, request.prompt)
        # One run of the frozen model gives both the retrieval-layer states (keys; causal,
        # so the target tokens do not touch the prompt positions) and the stream entering
        # z (values); layers below z are not run again during the optimisation.
        batch = teacher_forced_batch(self.host, [(p, request.target) for p in prompts])
        sink: dict[int, torch.Tensor] = {}
        stack = UpperStack(self.host, self.z, batch.input_ids, batch.attention_mask, self.reader.capture_specs(sink))
        states = self.standardize(self.reader.stacked(sink))
        queries, context = self.trainer.subject_states(self.config, self.standardize, states, prompts, request.subject,
                                                       batch.prompt_mask)  # fmt: skip
        key = self.train_key(queries, context)  # (|R|, D)
        value, steps, loss = self.train_value(stack, batch)
        with torch.no_grad():
            pk, pv = self.runner(value[None].to(self.host.model.dtype))
        self.grown.append(self, "keys", key[None])
        self.grown.append(self, "values", value[None])
        self.grown.append(self, "prefix_keys", pk.float())
        self.grown.append(self, "prefix_values", pv.float())
        self.row_ids.append(edit_id)
        self.meta[edit_id] = {"prefixes": chosen, "steps": steps, "loss": round(loss, 5)}
        if self.config.threshold_shift:
            self.meta[edit_id]["threshold_shift"] = float(self.config.threshold_shift)
        self._refresh_last()
        logger.bind(edit_id=edit_id).debug("llp: value trained in {} steps, loss {:.4f}", steps, loss)

    def train_value(self, stack: UpperStack, batch: TeacherForcedBatch) -> tuple[torch.Tensor, int, float]:
        """Optimise the b vectors entering layer z (rows: prompt variants + target)."""
        return self.trainer.train_value(self.config, stack, batch)

    def _revert(self, edit_id: str) -> None:
        row = self.row_ids.index(edit_id)
        keep = torch.tensor([i for i in range(len(self.row_ids)) if i != row], dtype=torch.long, device=self.keys.device)
        self.keys, self.values = self.keys[keep], self.values[keep]
        self.prefix_keys, self.prefix_values = self.prefix_keys[keep], self.prefix_values[keep]
        del self.row_ids[row]
        self.meta.pop(edit_id, None)
        self._refresh()

    def _refresh(self) -> None:
        """Serving's unit keys and per-edit shifts from all rows (revert, load; an apply: `_refresh_last`)."""
        self._unit_keys = F.normalize(self.keys.transpose(0, 1), dim=-1).contiguous()  # (|R|, N, D)
        shifts = [self.meta.get(row, {}).get("threshold_shift", 0.0) for row in self.row_ids]
        self._shifts = torch.tensor(shifts, dtype=torch.float32, device=self.keys.device)  # (N,)
        self._fit_shortlist()  # a load clears the basis first: fitted on its keys

    def _fit_shortlist(self) -> None:
        """The bound rows of all keys; without a basis, or once the keys doubled since it was
        fitted, a new basis first. Below `shortlist_from` keys: none (compare all)."""
        cfg, n = self.config, self._unit_keys.shape[1]
        if not cfg.shortlist_rank or n < cfg.shortlist_from:
            self._basis, self._basis_keys = None, 0
            self._key_bounds = self._key_bounds[:, :0]
            return
        if self._basis is None or n >= 2 * self._basis_keys:
            self._basis, self._basis_keys = key_basis(self._unit_keys, cfg.shortlist_rank), n
        self._key_bounds = key_bounds(self._unit_keys, self._basis)

    def _refresh_last(self) -> None:
        """`_refresh` after one key row was appended, in O(1): that row's unit keys and shift
        (normalising a row alone gives the bits normalising all of them does)."""
        unit = F.normalize(self.keys[-1:].transpose(0, 1), dim=-1)  # (|R|, 1, D)
        self.grown.append(self, "_unit_keys", unit, dim=1)
        shift = self.meta.get(self.row_ids[-1], {}).get("threshold_shift", 0.0)
        self.grown.append(self, "_shifts", torch.tensor([shift], dtype=torch.float32, device=self.keys.device))
        n = self._unit_keys.shape[1]
        if self._basis is not None and n < 2 * self._basis_keys:
            self.grown.append(self, "_key_bounds", key_bounds(unit, self._basis), dim=1)
        elif self.config.shortlist_rank and n >= self.config.shortlist_from:  # the first basis, or the keys doubled
            self._fit_shortlist()

    # ----- retrieval: similarities and the vote -------------------------------------------------
    def layer_similarities(self, states: torch.Tensor, prompt_mask: torch.Tensor, for_votes: bool = False
                           ) -> torch.Tensor:  # fmt: skip
        """(|R|, B, T, D) states -> (|R|, B, N): each key's max cosine over each row's prompt
        tokens. `for_votes`: only what the configured vote needs (`vote_floor`); with many
        keys the others are -inf (`shortlisted_max_similarities`)."""
        standardized = self.standardize(states)
        if for_votes and self._basis is not None:
            return shortlisted_max_similarities(standardized, prompt_mask, self._unit_keys, self._basis,
                                                self._key_bounds, self.vote_floor())  # fmt: skip
        return max_similarities(standardized, prompt_mask, self._unit_keys)

    def vote_floor(self) -> torch.Tensor:
        """(|R|,) per layer, the lowest threshold any key votes above (each edit's own shift
        included): a cosine at or below it neither votes nor outranks a key that does."""
        lowest_shift = self._shifts.min() if len(self._shifts) else 0.0
        return self.thresholds() + lowest_shift

    def row_similarities(self, states: torch.Tensor, prompt_mask: torch.Tensor, alone: dict[str, torch.Tensor] | None,
                         for_votes: bool = False) -> torch.Tensor:  # fmt: skip
        """`layer_similarities`, with the chat-turn rows' taken from their messages run alone
        (`user_turns_alone`; None or no such row: from `states`). -> (|R|, B, N)"""
        sims = self.layer_similarities(states, prompt_mask, for_votes)
        if alone is not None and alone["alone_rows"].numel():
            sims[:, alone["alone_rows"]] = self.layer_similarities(alone["alone_states"], alone["alone_mask"], for_votes)
        return sims

    def user_turns_alone(self, turns: Turns, device: torch.device) -> dict[str, torch.Tensor] | None:
        """The chat-turn rows of a batch and the retrieval-layer states of their user messages
        run alone (`RetrievalReader.messages_alone`); None when chat turns are retrieved in
        context. turns: the batch's chat turns (`ChatFormat.turns`)."""
        if self.config.chat_retrieval != "alone":
            return None
        return self.reader.messages_alone(turns.messages, device)

    def thresholds(self) -> torch.Tensor:
        """(|R|,) similarity threshold per retrieval layer."""
        return layer_thresholds(self.config, len(self.retrieval), self.keys.device)

    def vote(self, maxsims: torch.Tensor, similarity: float | torch.Tensor | None = None, vote_fraction: float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(|R|, B, N) -> per row (best key, its votes, hit). Without `similarity`: the
        configured thresholds plus each edit's own shift."""
        cfg = self.config
        tau = self.thresholds() if similarity is None else torch.as_tensor(similarity, device=maxsims.device)
        fraction = cfg.vote_fraction if vote_fraction is None else vote_fraction
        shifts = self._per_edit_shifts(maxsims) if similarity is None else None  # calibration passes its own tau
        return vote_over_layers(maxsims, tau, cfg.top_k, fraction, shifts)

    def _per_edit_shifts(self, maxsims: torch.Tensor) -> torch.Tensor | None:
        """(N,) each edit's own threshold shift, when maxsims (|R|, B, N) covers every edit."""
        return self._shifts if len(self._shifts) == maxsims.shape[-1] else None

    def routed_edits(self, states: torch.Tensor, read_mask: torch.Tensor, alone: dict[str, torch.Tensor] | None,
              questions: Questions | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The vote on (|R|, B, T, D) retrieval-layer states over the tokens `read_mask` (B, T)
        (chat-turn rows from `alone`), then the question check when `questions` is given.
        -> per row (best edit row, hit), each (B,)."""
        sims = self.row_similarities(states, read_mask, alone, for_votes=True)
        votes, score = self.tally(sims)
        need = votes_needed(self.config.vote_fraction, sims.shape[0])
        best, _, hit = decide(votes, score, need)
        if questions is None:
            return best, hit
        return self.checked_edits(votes, score, need, best, hit, questions)

    def tally(self, maxsims: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(|R|, B, N) -> per row and key (votes, score), each (B, N), under the configured
        thresholds and each edit's own shift (`voting.layer_votes`)."""
        return layer_votes(maxsims, self.thresholds(), self.config.top_k, self._per_edit_shifts(maxsims))

    def checked_edits(self, votes: torch.Tensor, score: torch.Tensor, need: int, best: torch.Tensor, hit: torch.Tensor,
                      questions: Questions) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The question check on the routed rows: each row's candidates (`candidates`) go
        to it in order and the first it accepts acts on the row; a row with none accepted
        runs as the base model. votes, score (B, N) (`tally`); best, hit (B,) (`decide`)
        -> (best, hit)."""
        return self.first_answerable(hit, best, self.row_ids, questions,
                                     lambda row, question: self.candidates(question, votes, score, need, row, int(best[row])))

    def candidates(self, question: str, votes: torch.Tensor, score: torch.Tensor, need: int, row: int, winner: int
                   ) -> list[int]:  # fmt: skip
        """The keys offered to the question check for a routed row, in order: the vote's
        winner and the next `runners_up` keys that also have the votes (a generic subject's
        key, one edit about "Life", can win the vote on prompts it must not answer and would
        hide their own edit), the ones whose subject the question names in full first (a
        near subject with the same relation, "Enterprise Rupes" for a question about
        "Victoria Rupes", can win the vote by a hair over the named one)."""
        from kmd.editors.question_check import subject_named

        def named_in_full(key: int) -> bool:
            request = self._requests.get(self.row_ids[key])
            return request is not None and request.subject is not None and subject_named(question, request.subject, 1.0)

        keys = [winner, *runners_up(votes, score, row, winner, need, self.config.runners_up)]
        return sorted(keys, key=lambda key: not named_in_full(key)) if len(keys) > 1 else keys

    # ----- serving ---------------------------------------------------------------------------
    def _hook_specs(self) -> list[HookSpec]:
        return ServingHooks(self, self.host, self.reader, self.injector, self.answer_texts).specs()

    def prefix_of(self, edits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M,) edit rows -> their prefix keys (pre-RoPE) and values, each (M, |z..|, b, n_kv, hd)."""
        return self.prefix_keys[edits], self.prefix_values[edits]

    def targets_of(self, edits: torch.Tensor) -> list[str]:
        """(M,) edit rows -> each edit's target ("" for an edit being applied)."""
        ids = [self.row_ids[int(e)] for e in edits]
        return [self._requests[i].target if i in self._requests else "" for i in ids]

    def _regroup(self, how: Regroup, decisions: list[dict[str, Any]]) -> dict[str, Any]:
        """A regrouped batch (continuous batching): each routed row keeps its prefix and answer state."""
        return regrouped_decisions(self.name, how, decisions)

    # ----- routing-aware probing ----------------------------------------------------------
    def routing_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """{"states": (|R|, B, T, D) retrieval-layer outputs (base model), "mask": (B, T) the
        tokens retrieval reads, "questions": each row's question (the question check)}, and
        the chat turns' messages run alone (`user_turns_alone`)."""
        sink: dict[int, torch.Tensor] = {}
        capture_prefill(self.host, input_ids, attention_mask, self.reader.capture_specs(sink),
                        stop_after=self.reader.last_path)  # fmt: skip
        turns = self.host.chat.turns(input_ids, attention_mask.bool())  # what serving reads (ServingHooks)
        mask = turns.mask
        alone = self.user_turns_alone(turns, input_ids.device) or {}
        states = self.reader.stacked(sink)
        return {"states": states, "mask": mask, "questions": self.host.chat.questions(input_ids, attention_mask.bool()), **alone}

    def routes(self, features: dict[str, Any]) -> list[str | None]:
        """The edit whose prefix each row gets (the vote the serving hooks take), by edit id;
        an edit's prefix never changes."""
        states = features["states"]
        if not self.row_ids:
            return [None] * states.shape[1]
        alone = features if "alone_rows" in features else None
        best, hit = self.routed_edits(states, features["mask"], alone, lambda rows: [features["questions"][r] for r in rows])
        return [self.row_ids[b] if h else None for b, h in zip(best.tolist(), hit.tolist())]

    # ----- persistence ------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "keys": self.keys,
            "values": self.values,
            "prefix_keys": self.prefix_keys,
            "prefix_values": self.prefix_values,
            "center": self.background.center,
            "scale": self.background.scale,
        }

    def extra_state(self) -> dict[str, Any]:
        return {
            "retrieval_layers": self.retrieval,
            "injection_layer": self.z,
            "row_ids": self.row_ids,
            "meta": self.meta,
            "prefixes": self.prefixes,
            "background_ready": self.background.ready,
        }

    def _restore(self, requests: Sequence[EditRequest], tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        if extra.get("retrieval_layers") != self.retrieval or extra.get("injection_layer") != self.z:
            raise EditorError("llp: saved layers differ from this configuration's")
        if sorted(extra.get("row_ids", [])) != sorted(r.edit_id for r in requests):
            raise EditorError("llp: saved rows do not match the saved edits")
        names = ("keys", "values", "prefix_keys", "prefix_values")
        loaded = {name: tensors[name].float() for name in names}
        n = len(extra["row_ids"])
        if any(t.shape[0] != n for t in loaded.values()) or loaded["prefix_keys"].shape[1:] != self.prefix_keys.shape[1:]:
            raise EditorError("llp: saved tensors do not match the saved rows / model")
        self.keys, self.values = loaded["keys"], loaded["values"]
        self.prefix_keys, self.prefix_values = loaded["prefix_keys"], loaded["prefix_values"]
        self.background = Background(center=tensors["center"].float(), scale=tensors["scale"].float(),
                                     ready=bool(extra.get("background_ready", self.config.normalize == "none")))  # fmt: skip
        self.row_ids = list(extra["row_ids"])
        self.meta = dict(extra.get("meta", {}))
        self.prefixes = list(extra.get("prefixes", []))
        self._basis = None  # fitted again on these keys
        self._refresh()
