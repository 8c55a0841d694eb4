"""Regression probes run after every edit (the locality baseline they compare against is
`kmd.daemon.locality`).

Three probes (thresholds come from the policy's `probes:` section):
1. the edit itself, as users read it (`lifelong-served/v1`, editors/answers.py): greedy
   answers (KV cache, batched, at most 32 new tokens, decoded only as far as the verdict
   needs) to the edit prompt and each paraphrase, as plain text and, when the model is
   served with a chat template, as a chat turn. An answer is correct when its first line
   holds the target and the continuation is not degenerate; `served_rel` / `served_gen`
   are the fractions correct. The teacher-forced accuracies (`rel`, `gen`) are kept as
   secondary figures;
2. locality: held-out prompts whose greedy continuations (8 tokens) by the *unedited*
   model were recorded when the baseline was created, in fixed chunks of the suite;
   `loc` is the fraction of prompts the edited model still continues token for token
   the same way. Routing-aware: a backend that implements `routing_features`/`routes`
   says from cached features which rows each edit reaches; only the chunks whose rows
   route differently from the committed state are generated again (see `Prober`);
3. earlier edits: a sample of committed edits re-scored (teacher-forced): still held?
   Routing-aware too: a sampled prompt whose route token has not changed since it was
   scored (by its own probe, or an earlier check) keeps its score (`ScoreMemo`);
4. same-subject questions (`lifelong-served/v2`): questions about the edit's subject that
   ask for other facts (the policy's other relations). What they get before the edit is
   taken when the probe is planned (`Prober.plan`, before the apply): with routing
   features, each question's route token, and only the questions the edit re-routes are
   answered, before and after (a question it does not re-route gets the same tokens, by
   the editor protocol); without features, the answers themselves. An answer that now
   holds the edit's target and did not before is a hijack, and the edit is reverted with
   that reason.

Several candidate edits are probed together (`Prober.check` with a plan of several
requests): their rows share one batched decode, one teacher-forced pass, one locality
probe and one check of earlier edits, and a state probed again (a bisection step,
kmd.daemon.batch) generates only rows whose route tokens it has not seen
(kmd.daemon.probe_rows).

`Prober.check` returns a `ProbeReport` per edit; each missed threshold is a typed
`ProbeFailure` (which check, the reason in words, the prompt that showed it), so callers
ask `report.took` (the edit's own checks passed), `report.harmful` (locality, earlier
edits or same-subject answers suffered) and `report.own_failed` (its own rows failed)
instead of reading messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from loguru import logger

from kmd.daemon.locality import LOCALITY_TOKENS, LocalityBaseline, LocalityState
from kmd.daemon.probe_rows import ProbeRow, ProbeRows, RouteMemo, ScoreMemo
from kmd.editors.answers import Answer, Form, encode_as, has_chat_template, hits
from kmd.editors.batching import left_padded_ids
from kmd.editors.scoring import generate_ids, greedy_is_argmax, score_targets

if TYPE_CHECKING:
    from kmd.daemon.policy import ProbePolicy
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import EditRequest, Editor

__all__ = ["HARM_CHECKS", "OWN_CHECKS", "TOOK_CHECKS", "Check", "ProbeFailure", "ProbePlan", "ProbeReport", "Prober"]

# What a probe checks. The first three say whether the edit took; the last three whether it
# harmed what was there before (a stronger retry of the same edit would not help). Its own
# rows show the first three and the same-subject check: an edit that fails one of those is
# at fault itself, while locality and earlier edits are shared by the edits probed together.
Check = Literal["served", "rel", "gen", "locality", "earlier", "same_subject"]
TOOK_CHECKS: tuple[Check, ...] = ("served", "rel", "gen")
HARM_CHECKS: tuple[Check, ...] = ("locality", "earlier", "same_subject")
OWN_CHECKS: tuple[Check, ...] = ("served", "rel", "gen", "same_subject")


@dataclass(frozen=True)
class ProbeFailure:
    """One threshold a probe missed: which check, the reason in words, and the prompt that
    showed it (the served answer that missed, the locality prompt that changed), if any."""

    check: Check
    message: str
    prompt: str | None = None


@dataclass(frozen=True)
class ProbeReport:
    rel: float  # teacher-forced accuracy of the target after the edit prompt (secondary)
    gen: float | None  # the same over the paraphrases (secondary)
    loc: float  # fraction of locality prompts whose greedy continuation is unchanged
    earlier_rel: float | None
    earlier_checked: int
    failures: tuple[ProbeFailure, ...]  # empty means pass
    served_rel: float | None = None  # fraction of forms whose answer to the edit prompt is correct
    served_gen: float | None = None  # fraction of (paraphrase, form) answers that are correct
    answers: tuple[dict[str, Any], ...] = ()  # per prompt and form: the answer line and its verdicts
    loc_rows_run: int = 0  # locality prompts generated for this probe (the rest provably unchanged)
    loc_changed: tuple[dict[str, str], ...] = ()  # up to 5 locality prompts whose continuation changed
    # per same-subject question and form: the answer line before and after the edit, hijacked, unchanged
    same_subject: tuple[dict[str, Any], ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)  # where the probe's time went
    locality: LocalityState | None = None  # not a figure: the state the prober keeps on commit

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def took(self) -> bool:
        """The edit itself took (served and teacher-forced thresholds met)."""
        return not any(f.check in TOOK_CHECKS for f in self.failures)

    @property
    def harmful(self) -> bool:
        """The edit damaged other behaviour (locality, earlier edits): do not retry it stronger."""
        return any(f.check in HARM_CHECKS for f in self.failures)

    @property
    def own_failed(self) -> bool:
        """Its own rows failed (OWN_CHECKS): the edit is at fault whatever was probed with it."""
        return any(f.check in OWN_CHECKS for f in self.failures)

    @property
    def failing_prompt(self) -> str | None:
        """The first prompt that showed a failure (None when none did, or the probe passed)."""
        return next((f.prompt for f in self.failures if f.prompt is not None), None)

    @property
    def reason(self) -> str:
        """The failures in words, as the revert log records them."""
        return "; ".join(f.message for f in self.failures)

    def figures(self) -> dict[str, Any]:
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("failures", "locality")}
        return plain | {"took": self.took, "failures": [f.message for f in self.failures]}


# A bisection's locality chunks by (chunk, route tokens): their generated tokens.
LocalityMemo = dict[tuple[int, tuple[Hashable | None, ...]], tuple[tuple[int, ...], ...]]


@dataclass
class ProbePlan:
    """The probe of some candidate edits, set up before they are applied (`Prober.plan`) and
    asked under as many states as needed (`Prober.check`): each request's served and
    same-subject rows, what the same-subject rows got before the edits (their route tokens
    with routing features, else their answers), and what was generated and scored so far."""

    requests: tuple[EditRequest, ...]
    rows: ProbeRows
    served: tuple[tuple[int, ...], ...]  # per request: its served rows (prompt and paraphrases, each form)
    same: tuple[tuple[int, ...], ...]  # per request: its same-subject rows (each question, each form)
    before_routes: list[Hashable | None] | None = None  # every row's route token before the edits
    before: dict[int, Answer] = field(default_factory=dict)  # same-subject answers before the edits
    memo: RouteMemo = field(default_factory=RouteMemo)
    locality_memo: LocalityMemo = field(default_factory=dict)
    earlier_rows: ProbeRows | None = None  # the sampled earlier edits' prompts (Prober.earlier)


def _answer_figure(answer: Answer) -> dict[str, Any]:
    return {"prompt": answer.prompt, "form": answer.form, "answer": answer.line[:200],
            "hit": answer.hit, "degenerate": answer.degenerate}  # fmt: skip


class Prober:
    """Runs the probes; keeps the locality state of the committed edits between edits.

    Routing-aware locality: `use_routing(editor)` computes the backend's routing features
    once per locality chunk (cached on disk next to the baseline, keyed by the model, the
    suite, the backend and its config). A probe then asks the editor for every row's route
    token; a chunk whose tokens all equal those of the committed state computes exactly
    what it computed then (same rows, same padding, same edits acting on them), so its
    verdicts are reused; a chunk no edit reaches is the base model's, i.e. the baseline.
    Only the other chunks are generated. Without features (a backend without the method)
    every chunk is generated. `locality(editor, full=True)` generates every chunk: the
    safety net the regression job runs on its schedule.
    """

    def __init__(self, host: ModelHost, baseline: LocalityBaseline, thresholds: ProbePolicy, batch_size: int = 32) -> None:
        self.host, self.baseline, self.thresholds, self.batch_size = host, baseline, thresholds, batch_size
        encoded = [host.encode(host.format_prompt(p)) for p in baseline.prompts]
        n, size = len(encoded), baseline.chunk
        self.chunks: list[list[int]] = [list(range(start, min(start + size, n))) for start in range(0, n, size)]
        self._encoded = encoded
        self.features: list[dict[str, torch.Tensor]] | None = None
        self.committed: LocalityState | None = None  # the committed edits' state (None: not measured)
        self.chat = bool(host.settings.use_chat_template) and has_chat_template(host)
        self.scores = ScoreMemo()  # teacher-forced accuracies by route token, kept across probes
        self._argmax_greedy = greedy_is_argmax(host)  # a served answer that wrote the target scores 1.0

    # ----- routing features ------------------------------------------------------------------
    def use_routing(self, editor: Editor, cache_dir: Path | None = None) -> bool:
        """Compute (or load) `editor`'s routing features for every chunk; False when the
        backend has none (every probe then generates the whole suite)."""
        key = hashlib.sha256(json.dumps([self.host.identity.fingerprint, self.baseline.digest, self.baseline.chunk,
                                         editor.name, editor.config_dict()], sort_keys=True, default=str).encode())  # fmt: skip
        path = cache_dir / f"locality-routing-{editor.name}-{key.hexdigest()[:16]}.safetensors" if cache_dir else None
        if path is not None and path.is_file():
            try:
                self.features = _unflatten(_load_features(path), len(self.chunks))
                return True
            except Exception as exc:  # recompute: the cache is only a cache
                logger.warning("routing features {} unreadable ({}); computing them again", path, exc)
        started = time.perf_counter()
        features = []
        for chunk in self.chunks:
            ids, attention = left_padded_ids(self.host, [self._encoded[i] for i in chunk])
            got = editor.routing_features(ids, attention)
            if got is None:
                self.features = None
                return False
            features.append({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in got.items()})
        self.features = features
        logger.info("routing features of {} locality prompts ({}) in {:.1f} s", len(self._encoded), editor.name,
                    time.perf_counter() - started)  # fmt: skip
        if path is not None:
            from safetensors.torch import save_file

            tmp = path.with_name(f".{path.name}.tmp")
            flat = {f"{c}.{k}": v for c, f in enumerate(features) for k, v in f.items()}
            save_file({k: v.contiguous() for k, v in flat.items() if isinstance(v, torch.Tensor)}, str(tmp),
                      metadata={"json": json.dumps({k: v for k, v in flat.items() if not isinstance(v, torch.Tensor)})})
            os.replace(tmp, path)
        return True

    def routes(self, editor: Editor | None) -> list[tuple[Hashable | None, ...]] | None:
        if self.features is None:
            return None
        if editor is None or not editor.edit_ids:
            return [(None,) * len(chunk) for chunk in self.chunks]
        return [tuple(editor.routes(f)) for f in self.features]

    # ----- locality ----------------------------------------------------------------------------
    def locality(self, editor: Editor | None, *, full: bool = False, memo: LocalityMemo | None = None) -> LocalityState:
        """The suite's verdicts under `editor` (see the class docstring for what is generated).
        `memo`: chunks generated by earlier calls, by their route tokens (a bisection probes
        states that route most chunks alike); a chunk found there is not generated again."""
        routes = self.routes(editor)
        previous = self.committed
        run: list[int] = []
        verdicts: list[bool] = [True] * len(self._encoded)
        changed: dict[int, tuple[int, ...]] = {}
        for c, chunk in enumerate(self.chunks):
            if not full and routes is not None:
                if all(r is None for r in routes[c]):
                    continue  # no edit reaches these rows: the base model's answers, as recorded
                if previous is not None and previous.routes[c] == routes[c]:
                    for i in chunk:  # the same computation as in the committed state
                        verdicts[i] = previous.verdicts[i]
                        if i in previous.changed:
                            changed[i] = previous.changed[i]
                    continue
                if memo is not None and (c, routes[c]) in memo:
                    for i, got in zip(self.chunks[c], memo[(c, routes[c])], strict=True):
                        verdicts[i] = got == self.baseline.continuations[i]
                        if not verdicts[i]:
                            changed[i] = got
                    continue
            run.append(c)
        for c in run:
            chunk = self.chunks[c]
            tokens = generate_ids(self.host, editor, [self._encoded[i] for i in chunk], LOCALITY_TOKENS, len(chunk))
            for i, got in zip(chunk, tokens, strict=True):
                verdicts[i] = tuple(got) == self.baseline.continuations[i]
                if not verdicts[i]:
                    changed[i] = tuple(got)
            if memo is not None and routes is not None:
                memo[(c, routes[c])] = tuple(tuple(t) for t in tokens)
        state_routes = tuple(routes) if routes is not None else (None,) * len(self.chunks)
        return LocalityState(state_routes, tuple(verdicts), changed, sum(len(self.chunks[c]) for c in run),
                             full=len(run) == len(self.chunks))  # fmt: skip

    def changed_examples(self, state: LocalityState, limit: int = 5) -> tuple[dict[str, str], ...]:
        decode = self.host.tokenizer.decode
        return tuple(
            {"prompt": self.baseline.prompts[i], "answer": decode(list(tokens), skip_special_tokens=True),
             "recorded": decode(list(self.baseline.continuations[i]), skip_special_tokens=True)}  # fmt: skip
            for i, tokens in sorted(state.changed.items())[:limit]
        )

    # ----- the edits themselves ----------------------------------------------------------------
    def _forms(self) -> tuple[Form, ...]:
        return ("plain", "chat") if self.chat else ("plain",)

    def plan(self, editor: Editor, requests: Sequence[EditRequest], questions: Sequence[Sequence[str]],
             without: Sequence[str] = ()) -> ProbePlan:  # fmt: skip
        """Set up the probe of `requests`' edits (and `questions[i]`, the same-subject
        questions of request i) on `editor` *before* they are applied: the rows and their
        routing features, and what the same-subject questions get now (their route tokens
        or, without routing features, their answers), which `check` compares with after.
        `without`: edits `editor` holds already that the plan must not see (it is made on a
        fork with them reverted: a restart probing edits a crash left applied)."""
        if without:
            fork = editor.fork()
            try:
                for edit_id in without:
                    fork.revert(edit_id)
                return self.plan(fork, requests, questions)
            finally:
                fork.retire()
        rows: list[ProbeRow] = []
        served, same = [], []
        for request, asked in zip(requests, questions, strict=True):
            start = len(rows)
            rows += [ProbeRow(p, form, request.target) for form in self._forms() for p in (request.prompt, *request.rephrases)]
            served.append(tuple(range(start, len(rows))))
            start = len(rows)
            rows += [ProbeRow(q, form, None) for form in self._forms() for q in dict.fromkeys(asked)]
            same.append(tuple(range(start, len(rows))))
        table = ProbeRows(self.host, rows, self.batch_size)
        plan = ProbePlan(tuple(requests), table, tuple(served), tuple(same))
        if table.with_features(editor):
            plan.before_routes = table.routes(editor)
        elif any(same):  # nothing tells which rows the edits will reach: answer them all now
            wanted = [i for rows_of in same for i in rows_of]
            plan.before.update(plan.memo.answer(self.host, editor, table, wanted, None, self.batch_size))
        return plan

    def earlier(self, editor: Editor, requests: Sequence[EditRequest], plan: ProbePlan | None = None,
                seed: int = 0) -> tuple[float | None, int]:  # fmt: skip
        """(teacher-forced accuracy of a sample of the earlier edits, the sample's size). With
        `plan`, each sampled prompt's score is kept by its route token, as `_teacher_forced`
        keeps the candidates' (`self.scores`): a prompt still routed to its own edit is not
        scored again (its probe scored it), nor under each state of a bisection."""
        k = min(self.thresholds.earlier_edits_sample, len(requests))
        if k == 0:
            return None, 0
        sample = random.Random(seed).sample(list(requests), k)
        routes = None
        if plan is not None:
            if plan.earlier_rows is None or [r.prompt for r in plan.earlier_rows.rows] != [r.prompt for r in sample]:
                plan.earlier_rows = ProbeRows(self.host, [ProbeRow(r.prompt, "plain", r.target) for r in sample], self.batch_size)
                plan.earlier_rows.with_features(editor)
            routes = plan.earlier_rows.routes(editor)
        if routes is None:
            scores = score_targets(self.host, editor, [(r.prompt, r.target) for r in sample], self.batch_size)
            return sum(s.accuracy for s in scores) / k, k
        return sum(self._scored_by_route(editor, [(r.prompt, r.target) for r in sample], routes)) / k, k

    def _scored_by_route(self, editor: Editor, pairs: Sequence[tuple[str, str]], routes: Sequence[Hashable | None]) -> list[float]:
        """Teacher-forced accuracy of each (prompt, target) under `editor`, whose route token
        for it is routes[i]: those scored before under the same token (`self.scores`, any
        earlier probe) reused, the others scored in one batched pass and kept."""
        keys = [(prompt, target, route) for (prompt, target), route in zip(pairs, routes, strict=True)]
        known = [self.scores.get(key) for key in keys]
        todo = [i for i, score in enumerate(known) if score is None]
        for i, score in zip(todo, score_targets(self.host, editor, [pairs[i] for i in todo], self.batch_size), strict=True):
            known[i] = score.accuracy
            self.scores.put(keys[i], score.accuracy)
        return [float(score) for score in known]  # type: ignore[arg-type]

    def check(self, editor: Editor, plan: ProbePlan, edit_ids: Sequence[str], earlier: Sequence[EditRequest] = (),
              members: Sequence[int] | None = None) -> list[ProbeReport]:  # fmt: skip
        """Probe the edits of `plan` applied to `editor` (`edit_ids[i]` is request i's edit;
        `members`: the requests whose edits `editor` holds, all by default), together: one
        batched decode of their served and same-subject rows (only those not answered yet
        under the same route), one teacher-forced pass, one locality probe and one check of
        the `earlier` edits, which are shared. One report per member, in order: its own
        verdicts and the shared ones."""
        members = list(range(len(plan.requests))) if members is None else list(members)
        clock = _Clock()
        routes = clock("routes", plan.rows.routes, editor)
        before = plan.before_routes
        # Same-subject rows an edit does not re-route get the same tokens as before: not asked.
        same_rows = {m: [i for i in plan.same[m] if before is None or routes is None or routes[i] != before[i]] for m in members}
        served = self.thresholds.served_answers
        wanted = [i for m in members for i in ((plan.served[m] if served else ()) + tuple(same_rows[m]))]
        after = clock("served", plan.memo.answer, self.host, editor, plan.rows, wanted, routes, self.batch_size)
        rerouted = [i for m in members for i in same_rows[m] if i not in plan.before]
        if rerouted:  # answered before the edits only when the edits re-route them: under the state without them
            clock("same_subject_before", self._before, editor, plan, [edit_ids[m] for m in members], rerouted)
        scores = clock("teacher_forced", self._teacher_forced, editor, plan, members, routes, after)
        state = clock("locality", self.locality, editor, memo=plan.locality_memo)
        earlier_rel, checked = clock("earlier", self.earlier, editor, earlier, plan)
        shared = self._shared_failures(state, earlier_rel, checked)
        examples = self.changed_examples(state)
        reports = []
        for m, (rel, gen) in zip(members, scores, strict=True):
            request = plan.requests[m]
            same = tuple(self._same_subject_figure(plan, i, after.get(i), request.target) for i in plan.same[m])
            failures = self._same_subject_failures(same)
            served_rel = served_gen = None
            figures: tuple[dict[str, Any], ...] = ()
            if served:
                got = [after[i] for i in plan.served[m]]
                figures = tuple(_answer_figure(a) for a in got)
                served_rel, served_gen, failure = self._served_verdict(request, got)
                failures += failure
            t = self.thresholds
            if rel < t.min_rel:
                failures.append(ProbeFailure("rel", f"edit did not take: rel {rel:.3f} < {t.min_rel}", request.prompt))
            if gen is not None and gen < t.min_gen:
                failures.append(ProbeFailure("gen", f"paraphrases not answered: gen {gen:.3f} < {t.min_gen}",
                                             request.rephrases[0] if request.rephrases else None))  # fmt: skip
            reports.append(ProbeReport(rel, gen, state.loc, earlier_rel, checked, tuple(failures + shared), served_rel,
                                       served_gen, figures, state.rows_run, examples, same, dict(clock.seconds), state))  # fmt: skip
        return reports

    def _teacher_forced(self, editor: Editor, plan: ProbePlan, members: Sequence[int], routes: Sequence[Hashable | None] | None,
                        answers: dict[int, Answer]) -> list[tuple[float, float | None]]:  # fmt: skip
        """Per member: teacher-forced accuracy of the target after its prompt and after each
        paraphrase (mean), in one batched pass. Each score is kept by the route
        token of its plain served row: a state that routes that row the same scores it the
        same (the editor protocol), so a bisection step re-scores only what it re-routes
        (it was 75 % of a burst's probe time), and a later probe's check of earlier edits
        finds the edit's own prompt scored. Without routes every row is scored. A row whose
        plain served answer (`answers`, by row) wrote exactly the target's tokens scores 1.0
        without a pass (`_wrote_target`)."""
        pairs, row_routes, known = [], [], []
        for m in members:
            r = plan.requests[m]
            texts = (r.prompt, *r.rephrases)  # their plain rows come first in plan.served[m]
            for row, text in zip(plan.served[m], texts):
                pairs.append((text, r.target))
                row_routes.append(routes[row] if routes is not None else None)
                known.append(1.0 if self._wrote_target(answers.get(row), text, r.target) else None)
        todo = [i for i, score in enumerate(known) if score is None]
        if routes is not None:
            for i in set(range(len(pairs))) - set(todo):  # what a later check of earlier edits reads
                self.scores.put((*pairs[i], row_routes[i]), 1.0)
            got = self._scored_by_route(editor, [pairs[i] for i in todo], [row_routes[i] for i in todo])
        else:
            got = [s.accuracy for s in score_targets(self.host, editor, [pairs[i] for i in todo], self.batch_size)]
        for i, score in zip(todo, got, strict=True):
            known[i] = score
        scores = iter(known)
        out = []
        for m in members:
            own, gen = next(scores), [next(scores) for _ in plan.requests[m].rephrases]
            out.append((own, sum(gen) / len(gen) if gen else None))  # type: ignore[arg-type]
        return out

    def _wrote_target(self, answer: Answer | None, text: str, target: str) -> bool:
        """Did the greedy answer to the very input a teacher-forced pass reads (the plain
        prompt as `encode_pair` encodes it) begin with exactly the target's tokens? Then
        the argmax at every target position is the target's token (a full forward and
        decode steps agree: the contract suite), which is accuracy 1.0."""
        if answer is None or answer.form != "plain" or not self._argmax_greedy:
            return False
        prompt_ids, target_ids = self.host.encode_pair(text, target)
        return answer.tokens[: len(target_ids)] == tuple(target_ids) and encode_as(self.host, text, "plain") == prompt_ids

    def _before(self, editor: Editor, plan: ProbePlan, edit_ids: Sequence[str], rows: Sequence[int]) -> None:
        """The answers of same-subject `rows` before the edits `edit_ids`: under a fork of
        `editor` without them (reverting is exact), kept in `plan.before`."""
        without = editor.fork()
        try:
            for edit_id in edit_ids:
                without.revert(edit_id)
            plan.before.update(plan.memo.answer(self.host, without, plan.rows, rows, plan.before_routes, self.batch_size))
        finally:
            without.retire()

    def _same_subject_figure(self, plan: ProbePlan, row: int, after: Answer | None, target: str) -> dict[str, Any]:
        asked = plan.rows.rows[row]
        if after is None:  # not re-routed: the same answer as before, not generated
            return {"prompt": asked.prompt, "form": asked.form, "before": None, "after": None, "hijacked": False,
                    "unchanged": True, "reached": False}  # fmt: skip
        before = plan.before[row]
        return {"prompt": asked.prompt, "form": asked.form, "before": before.line[:200], "after": after.line[:200],
                "hijacked": hits(after.line, target) and not hits(before.line, target),
                "unchanged": before.tokens == after.tokens, "reached": True}  # fmt: skip

    @staticmethod
    def _same_subject_failures(same: Sequence[dict[str, Any]]) -> list[ProbeFailure]:
        hijacked = [f for f in same if f["hijacked"]]
        if not hijacked:
            return []
        f = hijacked[0]
        return [ProbeFailure("same_subject", f"hijacks {len(hijacked)} of {len(same)} same-subject answers: "
                             f"{f['form']} {f['prompt']!r} -> {f['after'][:120]!r} (was {f['before'][:120]!r})",
                             f["prompt"])]  # fmt: skip

    def _served_verdict(self, request: EditRequest, got: Sequence[Answer]) -> tuple[float, float | None, list[ProbeFailure]]:
        t = self.thresholds
        own = [a for a in got if a.prompt == request.prompt]
        para = [a for a in got if a.prompt != request.prompt]
        served_rel = sum(a.correct for a in own) / len(own)
        served_gen = sum(a.correct for a in para) / len(para) if para else None
        if served_rel >= t.min_served_rel and (served_gen is None or served_gen >= t.min_served_gen):
            return served_rel, served_gen, []
        a = next(a for a in own + para if not a.correct)
        why = "degenerate" if a.degenerate else "misses the target"  # a row stopped early is degenerate only if in full
        return served_rel, served_gen, [ProbeFailure(
            "served", f"answers wrong: served_rel {served_rel:.2f} (min {t.min_served_rel}), served_gen "
            f"{'-' if served_gen is None else f'{served_gen:.2f}'} (min {t.min_served_gen}); {a.form} {a.prompt!r} -> "
            f"{a.line[:120]!r} ({why})", a.prompt)]  # fmt: skip

    def _shared_failures(self, state: LocalityState, earlier_rel: float | None, checked: int) -> list[ProbeFailure]:
        """Locality and earlier edits: what all the probed edits together did to the rest."""
        t, failures = self.thresholds, []
        if state.loc < t.min_loc:
            first = self.changed_examples(state)[0]
            failures.append(ProbeFailure("locality", f"locality degraded: loc {state.loc:.4f} < {t.min_loc} "
                                         f"({len(state.changed)} prompts changed, e.g. {first['prompt']!r} -> "
                                         f"{first['answer']!r}, was {first['recorded']!r})", first["prompt"]))  # fmt: skip
        if earlier_rel is not None and earlier_rel < t.min_earlier_rel:
            failures.append(ProbeFailure("earlier", f"earlier edits lost: rel {earlier_rel:.3f} < {t.min_earlier_rel} "
                                         f"over {checked}"))
        return failures


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn, *args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 3)


def _load_features(path: Path) -> dict[str, Any]:
    """The tensors of a feature cache, and its other values (texts, as JSON in the metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        others = json.loads((fh.metadata() or {}).get("json", "{}"))
    return load_file(str(path)) | others


def _unflatten(flat: dict[str, Any], chunks: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{} for _ in range(chunks)]
    for name, tensor in flat.items():
        chunk, key = name.split(".", 1)
        out[int(chunk)][key] = tensor
    if any(not f for f in out):
        raise ValueError("a chunk has no features")
    return out
