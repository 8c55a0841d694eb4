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
least `vote_fraction * |R|` of them; otherwise the row runs as the base model. The
decision is taken on the prefill and reused by KV-cache decode steps.

Revert deletes the edit's rows: exact. During an edit's optimisation the layers below
z run once (`UpperStack`); each step runs the b vectors through layers z.. (a few
positions) and the prompts through layers z.. with the merge.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from loguru import logger

from kmd.editors.answer_stop import RoutedAnswers, TokenTexts, pointer_hook
from kmd.editors.chat import Turns
from kmd.editors.augment import generate_prefixes, with_prefix
from kmd.editors.batching import TeacherForcedBatch, teacher_forced_batch
from kmd.editors.hooks import HookSpec, hooked, run_until
from kmd.editors.prefix import Injection, PrefixInjector, answers_of, regrouped_decisions
from kmd.editors.llp.config import LlpConfig
from kmd.editors.protocol import EditorError, EditRequest, Editor, base_model
from kmd.editors.regroup import Regroup
from kmd.editors.scoring import capture_prefill, right_padded
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


def last_subject_token(host: ModelHost, text: str, subject: str | None) -> int:
    """Index of the last token of the last occurrence of `subject` in the formatted `text`
    (case-insensitive); the last token of the text when there is no subject or no match."""
    formatted = host.format_prompt(text)
    encoded = host.tokenizer(formatted, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if ids != host.encode(formatted):
        raise EditorError("llp: tokenizer offsets disagree with the host's encoding")
    if subject and subject.strip():
        start = formatted.lower().rfind(subject.strip().lower())
        if start >= 0:
            end = start + len(subject.strip())
            inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            if inside:
                return inside[-1]
    return len(ids) - 1


class LlpEditor(Editor):
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
        self._structure = {k: getattr(cfg, k) for k in self.STRUCTURAL}
        self.upper = list(range(self.z, host.num_layers))
        self.layer_paths = [layout.path("layer", i) for i in range(host.num_layers)]
        self.injector = PrefixInjector(host, self.upper, self.name)  # layers z.. merge the prefix
        self.answer_texts = TokenTexts(host.tokenizer)
        self.attentions, self.rotary, self.runner = self.injector.attentions, self.injector.rotary, self.injector.runner
        device, d = host.device, host.model.config.hidden_size
        nz, n_kv, head_dim = self.injector.kv_shape  # the layout's k projection, not a hard-coded name
        nr, b = len(self.retrieval), cfg.n_values
        self.keys = torch.empty(0, nr, d, device=device)  # (N, |R|, D) raw (centred when configured)
        self.values = torch.empty(0, b, d, device=device)  # (N, b, D)
        self.prefix_keys = torch.empty(0, nz, b, n_kv, head_dim, device=device)  # pre-RoPE
        self.prefix_values = torch.empty(0, nz, b, n_kv, head_dim, device=device)
        self.center = torch.zeros(nr, d, device=device)  # background mean per retrieval layer
        self.scale = torch.ones(nr, d, device=device)  # background std per retrieval layer
        self.background_ready = cfg.normalize == "none"
        self.row_ids: list[str] = []
        self.meta: dict[str, dict[str, Any]] = {}  # per edit: prefixes used, steps, loss
        self.prefixes: list[str] = []  # generated once (lazily), persisted
        self._unit_keys = torch.empty(nr, 0, d, device=device)  # (|R|, N, D) normalised, for serving
        self._shifts = torch.empty(0, device=device)  # (N,) per-edit threshold shifts
        self._train_injection: Injection | None = None
        self._training = False

    # ----- augmentation ----------------------------------------------------------------
    def ensure_prefixes(self) -> list[str]:
        cfg = self.config
        if not self.prefixes and cfg.n_prefixes > 0:
            self.prefixes = generate_prefixes(self.host, cfg.prefix_pool, cfg.prefix_tokens, cfg.seed)
        return self.prefixes

    def ensure_background(self) -> None:
        """Mean/std of each retrieval layer over texts the model generates (once, seeded)."""
        cfg = self.config
        if self.background_ready:
            return
        texts = generate_prefixes(self.host, cfg.background_texts, cfg.background_tokens, cfg.seed + 1)
        got = self._retrieval_states(texts)
        mask = got["attention_mask"].bool().clone()
        mask[:, 0] = False  # the first token is an attention sink with an outlying state
        tokens = got["states"][:, mask]  # (|R|, K, D)
        self.center = tokens.mean(1)
        if cfg.normalize == "zscore":
            std = tokens.std(1)
            self.scale = std.clamp(min=1e-3 * float(std.mean()))
        self.background_ready = True

    def standardize(self, states: torch.Tensor) -> torch.Tensor:
        """(|R|, ..., D) retrieval-layer states in the space the keys live in."""
        shape = (len(self.retrieval),) + (1,) * (states.dim() - 2) + (-1,)
        return (states.float() - self.center.view(shape)) / self.scale.view(shape)

    def variants(self, edit_id: str, prompt: str) -> tuple[list[str], list[int]]:
        """The bare prompt plus `n_prefixes` prefixed copies chosen for this edit."""
        cfg = self.config
        pool = self.ensure_prefixes()
        if cfg.n_prefixes == 0 or not pool:
            return [prompt], []
        chosen = random.Random(f"{cfg.seed}/{edit_id}").sample(range(len(pool)), min(cfg.n_prefixes, len(pool)))
        return [prompt] + [with_prefix(pool[i], prompt) for i in chosen], chosen

    # ----- retrieval states ------------------------------------------------------------------
    def _capture_specs(self, sink: dict[int, torch.Tensor]) -> list[HookSpec]:
        def grab(index: int):
            def hook(module, args, output):
                sink[index] = output[0] if isinstance(output, tuple) else output

            return hook

        return [HookSpec(self.layer_paths[layer], grab(i)) for i, layer in enumerate(self.retrieval)]

    @torch.no_grad()
    def _retrieval_states(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Layer outputs at R for right-padded prompts, running only layers 0..max(R)."""
        ids, attention = right_padded(self.host, prompts)  # (B, T) each
        sink: dict[int, torch.Tensor] = {}
        run_until(self.host, self.layer_paths[max(self.retrieval)], ids, attention, self._capture_specs(sink))
        states = torch.stack([sink[i] for i in range(len(self.retrieval))]).float()  # (|R|, B, T, D)
        return {"states": states, "attention_mask": attention, "lengths": attention.sum(dim=1).cpu()}

    def _subject_states(
        self, states: torch.Tensor, prompts: list[str], subject: str | None, prompt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(|R|, P, D) last-subject-token states of the variants (and of the subject alone, when
        configured); (|R|, C, D) the bare prompt's other tokens."""
        device = states.device
        index = torch.tensor([last_subject_token(self.host, p, subject) for p in prompts], device=device)
        queries = states[:, torch.arange(len(prompts), device=device), index]
        if self.config.subject_query and subject:  # appended last: row 0 stays the bare prompt
            alone = self.standardize(self._retrieval_states([subject])["states"])  # (|R|, 1, T_s, D)
            last = last_subject_token(self.host, subject, subject)
            queries = torch.cat([queries, alone[:, :, last]], dim=1)
        own = int(prompt_mask[0].sum())
        context = [t for t in range(1, own) if t != int(index[0])]
        return queries, states[:, 0, context]

    def key_queries(self, edit_id: str, request: EditRequest) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Key inputs from the prompts alone (layers 0..max(R) only); used by calibration."""
        prompts, chosen = self.variants(edit_id, request.prompt)
        self.ensure_background()
        got = self._retrieval_states(prompts)
        states = self.standardize(got["states"])
        queries, context = self._subject_states(states, prompts, request.subject, got["attention_mask"].bool())
        return queries, context, chosen

    def stronger_overrides(self) -> dict[str, Any]:
        # A retry trains the value longer and lets the edit's key fire a little more easily
        # (the usual reason an LLP edit "did not take" is a paraphrase missing the vote).
        cfg = self.config
        return {"value_steps": cfg.value_steps * 2, "value_stop_loss": cfg.value_stop_loss / 5,
                "threshold_shift": cfg.threshold_shift - 0.02}  # fmt: skip

    # ----- computing an edit -----------------------------------------------------------------
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
        stack = UpperStack(self.host, self.z, batch.input_ids, batch.attention_mask, self._capture_specs(sink))
        states = self.standardize(torch.stack([sink[i] for i in range(len(self.retrieval))]))
        queries, context = self._subject_states(states, prompts, request.subject, batch.prompt_mask)
        key = self.train_key(queries, context)  # (|R|, D)
        value, steps, loss = self.train_value(stack, batch)
        with torch.no_grad():
            pk, pv = self.runner(value[None].to(self.host.model.dtype))
        self.keys = torch.cat([self.keys, key[None]])
        self.values = torch.cat([self.values, value[None]])
        self.prefix_keys = torch.cat([self.prefix_keys, pk.float()])
        self.prefix_values = torch.cat([self.prefix_values, pv.float()])
        self.row_ids.append(edit_id)
        self.meta[edit_id] = {"prefixes": chosen, "steps": steps, "loss": round(loss, 5)}
        if self.config.threshold_shift:
            self.meta[edit_id]["threshold_shift"] = float(self.config.threshold_shift)
        self._refresh()
        logger.bind(edit_id=edit_id).debug("llp: value trained in {} steps, loss {:.4f}", steps, loss)

    def append_key(self, edit_id: str, key: torch.Tensor) -> None:
        """Add a key row only (used by calibration, which needs no values)."""
        self.keys = torch.cat([self.keys, key[None]])
        self.row_ids.append(edit_id)
        self._refresh()

    def train_key(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """InfoNCE per retrieval layer: close to the subject queries, away from other keys."""
        cfg = self.config
        unit_queries = F.normalize(queries, dim=-1)
        init = unit_queries.mean(1)  # (|R|, D)
        if queries.shape[1] > 1:  # the bare prompt (row 0) weighs `bare_weight`, the other queries the rest
            init = cfg.bare_weight * unit_queries[:, 0] + (1 - cfg.bare_weight) * unit_queries[:, 1:].mean(1)
        negatives = []
        if len(self.row_ids) and cfg.key_negatives > 0:
            n = len(self.row_ids)
            sample = torch.randperm(n, generator=torch.Generator().manual_seed(n))[: cfg.key_negatives]
            negatives.append(self.keys[sample.to(self.keys.device)].transpose(0, 1))  # (|R|, M, D)
        if cfg.context_negatives and context.shape[1]:
            negatives.append(context)
        if not negatives or cfg.key_steps == 0:
            return init
        negative = F.normalize(torch.cat(negatives, dim=1), dim=-1)  # (|R|, M, D)
        anchors = F.normalize(queries, dim=-1)  # (|R|, P, D)
        # key = init + rms(init) * delta: `key_lr` is a step relative to the state's scale.
        scale = init.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)
        delta = torch.nn.Parameter(torch.zeros_like(init))
        optimiser = torch.optim.Adam([delta], lr=cfg.key_lr)
        with torch.enable_grad():
            for _ in range(cfg.key_steps):
                unit = F.normalize(init + scale * delta, dim=-1)
                positive = torch.einsum("lpd,ld->lp", anchors, unit)  # (|R|, P)
                push = torch.einsum("lmd,ld->lm", negative, unit)  # (|R|, M)
                logits = torch.cat([positive[..., None], push[:, None].expand(-1, positive.shape[1], -1)], -1)
                loss = F.cross_entropy(logits.flatten(0, 1) / cfg.key_temperature, torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.long, device=logits.device))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        return (init + scale * delta.detach()).float()

    def train_value(self, stack: UpperStack, batch: TeacherForcedBatch) -> tuple[torch.Tensor, int, float]:
        """Optimise the b vectors entering layer z (rows: prompt variants + target)."""
        cfg, host = self.config, self.host
        b = cfg.n_values
        end = int(batch.attention_mask[0].sum())  # row 0 is the bare prompt + target
        init = stack.hidden[0, max(0, end - b) : end].float()
        if init.shape[0] < b:
            init = torch.cat([init[:1].expand(b - init.shape[0], -1), init])
        # Optimise a scale-free offset: value = init + rms(init) * delta, so `value_lr` is a
        # step relative to the stream's own scale (hidden-state norms vary a lot across models).
        scale = init.pow(2).mean().sqrt().clamp(min=1e-6)
        delta = torch.nn.Parameter(torch.zeros_like(init))
        init_norm = init.norm().clamp(min=1e-6)
        rows = batch.input_ids.shape[0]
        optimiser = torch.optim.Adam([delta], lr=cfg.value_lr)
        dtype = host.model.dtype
        nll = torch.tensor(float("inf"))
        steps = 0
        self._training = True
        try:
            with torch.enable_grad(), hooked(host.model, self._inject_specs()):
                for steps in range(1, cfg.value_steps + 1):
                    self._train_injection = None  # the prefix run itself gets no prefix
                    value = init + scale * delta
                    pk, pv = self.runner(value[None].to(dtype))
                    self._train_injection = Injection(
                        rows=torch.arange(rows, device=host.device),
                        keys=pk.expand(rows, *pk.shape[1:]),
                        values=pv.expand(rows, *pv.shape[1:]),
                        p_first=torch.zeros(rows, dtype=torch.long, device=host.device),
                    )
                    logits = stack.logits_at(stack.final_hidden(), batch.rows, batch.positions)
                    nll = F.cross_entropy(logits.float(), batch.labels)
                    if nll.item() < cfg.value_stop_loss or steps == cfg.value_steps:
                        break
                    loss = nll + cfg.value_weight_decay * value.norm() / init_norm
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
        finally:
            self._training = False
            self._train_injection = None
        return (init + scale * delta).detach().float(), steps, float(nll.item())

    def _revert(self, edit_id: str) -> None:
        row = self.row_ids.index(edit_id)
        keep = torch.tensor([i for i in range(len(self.row_ids)) if i != row], dtype=torch.long, device=self.keys.device)
        self.keys, self.values = self.keys[keep], self.values[keep]
        self.prefix_keys, self.prefix_values = self.prefix_keys[keep], self.prefix_values[keep]
        del self.row_ids[row]
        self.meta.pop(edit_id, None)
        self._refresh()

    def _refresh(self) -> None:
        self._unit_keys = F.normalize(self.keys.transpose(0, 1), dim=-1).contiguous()  # (|R|, N, D)
        shifts = [self.meta.get(row, {}).get("threshold_shift", 0.0) for row in self.row_ids]
        self._shifts = torch.tensor(shifts, dtype=torch.float32, device=self.keys.device)  # (N,)

    # ----- serving: retrieval ------------------------------------------------------------------
    def layer_similarities(self, states: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """(|R|, B, T, D) states -> (|R|, B, N): each key's max cosine over each row's prompt tokens."""
        nr, batch, seq, d = states.shape
        unit = F.normalize(self.standardize(states), dim=-1)
        sims = torch.bmm(unit.view(nr, batch * seq, d), self._unit_keys.transpose(1, 2)).view(nr, batch, seq, -1)
        sims = sims.masked_fill(~prompt_mask[None, :, :, None], float("-inf"))
        return sims.amax(dim=2)

    def row_similarities(self, states: torch.Tensor, prompt_mask: torch.Tensor, alone: dict[str, torch.Tensor] | None
                         ) -> torch.Tensor:
        """`layer_similarities`, with the chat-turn rows' taken from their messages run alone
        (`_user_turns_alone`; None or no such row: from `states`). -> (|R|, B, N)"""
        sims = self.layer_similarities(states, prompt_mask)
        if alone is not None and alone["alone_rows"].numel():
            sims[:, alone["alone_rows"]] = self.layer_similarities(alone["alone_states"], alone["alone_mask"])
        return sims

    @torch.no_grad()
    def _user_turns_alone(self, turns: Turns, device: torch.device) -> dict[str, torch.Tensor] | None:
        """The chat-turn rows of a batch and the retrieval-layer states of their user messages
        run alone, as a bare prompt is when its key is made: {"alone_rows": (Bc,),
        "alone_states": (|R|, Bc, Tc, D), "alone_mask": (Bc, Tc)} (right-padded; Bc may be 0).
        None when chat turns are retrieved in context. One message at a time, so a row's
        decision never depends on the batch it came in. turns: the batch's chat turns
        (`ChatFormat.turns`)."""
        if self.config.chat_retrieval != "alone":
            return None
        messages = turns.messages
        rows = torch.tensor([row for row, _ in messages], dtype=torch.long, device=device)
        runs = []
        with base_model():
            for _, message in messages:
                got = self._retrieval_states([message])
                runs.append((got["states"][:, 0], got["attention_mask"][0].bool()))
        nr, d = len(self.retrieval), self.host.model.config.hidden_size
        width = max((len(m) for _, m in runs), default=1)
        states = torch.zeros(nr, len(runs), width, d, device=device)
        mask = torch.zeros(len(runs), width, dtype=torch.bool, device=device)
        for i, (s, m) in enumerate(runs):
            states[:, i, : len(m)], mask[i, : len(m)] = s, m
        return {"alone_rows": rows, "alone_states": states, "alone_mask": mask}

    def thresholds(self) -> torch.Tensor:
        """(|R|,) similarity threshold per retrieval layer."""
        cfg = self.config
        values = cfg.layer_similarity if cfg.layer_similarity is not None else [cfg.similarity] * len(self.retrieval)
        return torch.tensor([float(v) for v in values], device=self.keys.device)

    def vote(self, maxsims: torch.Tensor, similarity: float | torch.Tensor | None = None, vote_fraction: float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(|R|, B, N) -> per row (best key, its votes, hit)."""
        cfg = self.config
        tau = self.thresholds() if similarity is None else torch.as_tensor(similarity, device=maxsims.device)
        fraction = cfg.vote_fraction if vote_fraction is None else vote_fraction
        nr, batch, n = maxsims.shape
        k = min(cfg.top_k, n)
        top, index = maxsims.topk(k, dim=-1)  # (|R|, B, k)
        tau = tau.reshape(-1, 1, 1) if tau.dim() else tau
        if similarity is None and len(self._shifts) == n:  # per-edit shifts (calibration passes its own tau)
            tau = tau + self._shifts[index]
        ok = (top > tau).float()
        flat_index = index.permute(1, 0, 2).reshape(batch, nr * k)
        votes = torch.zeros(batch, n, device=maxsims.device).scatter_add_(1, flat_index, ok.permute(1, 0, 2).reshape(batch, -1))
        total = torch.zeros(batch, n, device=maxsims.device).scatter_add_(
            1, flat_index, (top.clamp(min=-1) * ok).permute(1, 0, 2).reshape(batch, -1)
        )
        best = (votes * 4 + total / nr).argmax(dim=1)  # most votes, then the highest similarity
        best_votes = votes.gather(1, best[:, None]).squeeze(1)
        need = max(1, math.ceil(fraction * nr - 1e-9))
        return best, best_votes, best_votes >= need

    def _hook_specs(self) -> list[HookSpec]:
        last = len(self.retrieval) - 1
        specs = [
            HookSpec(self.layer_paths[layer], self._retrieval_hook(i, i == last), "forward", with_kwargs=True)
            for i, layer in enumerate(self.retrieval)
        ]
        pointer = HookSpec(self.host.profile.layout.lm_head, pointer_hook(lambda: answers_of(self._current())))
        return [HookSpec("", self._ids_hook, "forward_pre", with_kwargs=True), *specs, *self._inject_specs(), pointer]

    def _decision(self) -> dict[str, Any]:
        routing = self.routing()
        decision = routing.decisions.get(self.name)
        if decision is None:
            decision = routing.decisions[self.name] = {"states": {}, "injection": None, "done": False, "ids": None}
        return decision

    def _ids_hook(self, module, args, kwargs):
        """The token ids of each forward: retrieval reads a chat turn's user tokens only, and
        what a routed row has written so far decides where its edit stops acting."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        decision = self._decision()
        if not decision["done"]:
            decision["ids"] = ids  # the prefill (or a full forward): read in _decide
            if ids is not None:  # before the forward: what retrieval reads; chat turns' messages run alone
                mask = self.routing().mask_for(*ids.shape, ids.device)
                turns = self.host.chat.turns(ids, mask)
                decision["users"] = turns.mask
                decision["alone"] = self._user_turns_alone(turns, ids.device)
        elif decision["injection"] is not None and ids is not None:
            decision["injection"].decode_step(ids)
        return None

    def _retrieval_hook(self, index: int, last: bool):
        def hook(module, args, kwargs, output):
            routing = self.routing()
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
    def _decide(self, routing, decision: dict[str, Any], position_ids: torch.Tensor | None) -> None:
        collected = decision.pop("states")
        states = torch.stack([collected[i] for i in range(len(self.retrieval))])
        _, batch, seq, _ = states.shape
        device = states.device
        mask = routing.mask_for(batch, seq, device)
        ids = decision.pop("ids", None)
        retrieval_mask = decision.pop("users", None)
        retrieval_mask = mask if retrieval_mask is None else retrieval_mask  # (B, T): a chat turn's user tokens
        best, _, hit = self.vote(self.row_similarities(states, retrieval_mask, decision.pop("alone", None)))
        if ids is not None:
            hit = self.keep_answerable(hit, best, self.row_ids,
                                       lambda rows: self.host.chat.questions(ids, mask, rows))  # fmt: skip
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
        injection = decision["injection"] = Injection(
            rows=rows,
            keys=self.prefix_keys[edits],
            values=self.prefix_values[edits],
            p_first=p_first[rows],
        )
        if ids is not None:
            targets = [self._requests[self.row_ids[int(e)]].target if self.row_ids[int(e)] in self._requests else ""
                       for e in edits]
            last = routing.last_prompt_index(batch, seq, device)[rows]
            injection.answers = RoutedAnswers.start(self.answer_texts, self.config.answer, rows, targets, ids, last)

    # ----- serving: injection at layers >= z ---------------------------------------------------
    def _current(self) -> Injection | None:
        if self._training:
            return self._train_injection
        decision = self.routing().decisions.get(self.name)
        return decision["injection"] if decision else None

    def _inject_specs(self) -> list[HookSpec]:
        return self.injector.specs(self._current)

    def _regroup(self, how: Regroup, decisions: list[dict[str, Any]]) -> dict[str, Any]:
        """A regrouped batch (continuous batching): each routed row keeps its prefix and answer state."""
        return regrouped_decisions(self.name, how, decisions)

    # ----- routing-aware probing ----------------------------------------------------------
    def routing_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """{"states": (|R|, B, T, D) retrieval-layer outputs (base model), "mask": (B, T) the
        tokens retrieval reads, "questions": each row's question (the question check)}, and
        the chat turns' messages run alone (`_user_turns_alone`)."""
        sink: dict[int, torch.Tensor] = {}
        capture_prefill(self.host, input_ids, attention_mask, self._capture_specs(sink),
                        stop_after=self.layer_paths[max(self.retrieval)])  # fmt: skip
        turns = self.host.chat.turns(input_ids, attention_mask.bool())  # what serving reads (_ids_hook)
        mask = turns.mask
        alone = self._user_turns_alone(turns, input_ids.device) or {}
        states = torch.stack([sink[i] for i in range(len(self.retrieval))])
        return {"states": states, "mask": mask, "questions": self.host.chat.questions(input_ids, attention_mask.bool()), **alone}

    def routes(self, features: dict[str, Any]) -> list[str | None]:
        """The edit whose prefix each row gets (the vote `_decide` takes), by edit id; an
        edit's prefix never changes."""
        states = features["states"]
        if not self.row_ids:
            return [None] * states.shape[1]
        alone = features if "alone_rows" in features else None
        best, _, hit = self.vote(self.row_similarities(states, features["mask"], alone))
        hit = self.keep_answerable(hit, best, self.row_ids,
                                   lambda rows: [features["questions"][r] for r in rows])  # fmt: skip
        return [self.row_ids[b] if h else None for b, h in zip(best.tolist(), hit.tolist())]

    # ----- persistence ------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "keys": self.keys,
            "values": self.values,
            "prefix_keys": self.prefix_keys,
            "prefix_values": self.prefix_values,
            "center": self.center,
            "scale": self.scale,
        }

    def extra_state(self) -> dict[str, Any]:
        return {
            "retrieval_layers": self.retrieval,
            "injection_layer": self.z,
            "row_ids": self.row_ids,
            "meta": self.meta,
            "prefixes": self.prefixes,
            "background_ready": self.background_ready,
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
        self.center, self.scale = tensors["center"].float(), tensors["scale"].float()
        self.background_ready = bool(extra.get("background_ready", self.config.normalize == "none"))
        self.row_ids = list(extra["row_ids"])
        self.meta = dict(extra.get("meta", {}))
        self.prefixes = list(extra.get("prefixes", []))
        self._refresh()
