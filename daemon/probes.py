"""Regression probes run after every edit (the locality baseline they compare against is
`kmd.daemon.locality`).

Three probes (thresholds come from the policy's `probes:` section):
1. the edit itself, as users read it (`lifelong-served/v1`, editors/answers.py): greedy
   answers (KV cache, batched, at most 32 new tokens) to the edit prompt and each
   paraphrase, as plain text and, when the model is served with a chat template, as a
   chat turn. An answer is correct when its first line holds the target and the
   continuation is not degenerate; `served_rel` / `served_gen` are the fractions
   correct. The teacher-forced accuracies (`rel`, `gen`) are kept as secondary figures;
2. locality: held-out prompts whose greedy continuations (8 tokens) by the *unedited*
   model were recorded when the baseline was created, in fixed chunks of the suite;
   `loc` is the fraction of prompts the edited model still continues token for token
   the same way. Routing-aware: a backend that implements `routing_features`/`routes`
   says from cached features which rows each edit reaches; only the chunks whose rows
   route differently from the committed state are generated again (see `Prober`);
3. earlier edits: a sample of committed edits re-scored (teacher-forced): still held?
4. same-subject questions (`lifelong-served/v2`): questions about the edit's subject that
   ask for other facts (the policy's other relations). Their answers before the edit are
   recorded when it is applied (`same_subject_before`), and asked again with the edit in
   the served-answer batch; an answer that now holds the edit's target and did not before
   is a hijack, and the edit is reverted with that reason.

`Prober.check` returns a `ProbeReport`; each missed threshold is a typed `ProbeFailure`
(which check, the reason in words, the prompt that showed it), so callers ask
`report.took` (the edit's own checks passed) and `report.harmful` (locality or earlier
edits suffered) instead of reading messages.
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
from kmd.editors.answers import Answer, Form, ask, has_chat_template, hits
from kmd.editors.batching import left_padded_ids
from kmd.editors.scoring import generate_ids, score_targets

if TYPE_CHECKING:
    from kmd.daemon.policy import ProbePolicy
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import EditRequest, Editor

__all__ = ["HARM_CHECKS", "TOOK_CHECKS", "Check", "ProbeFailure", "ProbeReport", "Prober"]

# What a probe checks. The first three say whether the edit took; the last two whether it
# harmed what was there before (a stronger retry of the same edit would not help).
Check = Literal["served", "rel", "gen", "locality", "earlier", "same_subject"]
TOOK_CHECKS: tuple[Check, ...] = ("served", "rel", "gen")
HARM_CHECKS: tuple[Check, ...] = ("locality", "earlier", "same_subject")


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


def _same_subject_figure(before: Answer, after: Answer, target: str) -> dict[str, Any]:
    return {"prompt": after.prompt, "form": after.form, "before": before.line[:200], "after": after.line[:200],
            "hijacked": hits(after.line, target) and not hits(before.line, target),
            "unchanged": before.tokens == after.tokens}  # fmt: skip


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
    def locality(self, editor: Editor | None, *, full: bool = False) -> LocalityState:
        """The suite's verdicts under `editor` (see the class docstring for what is generated)."""
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
            run.append(c)
        for c in run:
            chunk = self.chunks[c]
            tokens = generate_ids(self.host, editor, [self._encoded[i] for i in chunk], LOCALITY_TOKENS, len(chunk))
            for i, got in zip(chunk, tokens, strict=True):
                verdicts[i] = tuple(got) == self.baseline.continuations[i]
                if not verdicts[i]:
                    changed[i] = tuple(got)
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

    # ----- the edit itself ---------------------------------------------------------------------
    def edit_scores(self, editor: Editor, request: EditRequest) -> tuple[float, float | None]:
        """Teacher-forced accuracy of the target after the prompt and after each paraphrase."""
        pairs = [(request.prompt, request.target)] + [(p, request.target) for p in request.rephrases]
        scores = score_targets(self.host, editor, pairs, self.batch_size)
        gen = [s.accuracy for s in scores[1:]]
        return scores[0].accuracy, (sum(gen) / len(gen) if gen else None)

    def _forms(self) -> tuple[Form, ...]:
        return ("plain", "chat") if self.chat else ("plain",)

    def served(self, editor: Editor, request: EditRequest, others: Sequence[str] = ()) -> list[Answer]:
        """Greedy answers to the edit prompt and its paraphrases (target: the edit's), then to
        `others` (no target), plain (and chat when served so): one batch for every form, one
        pass of 32 decode steps instead of one per form."""
        prompts = [request.prompt, *request.rephrases]
        questions = [(p, form, request.target) for form in self._forms() for p in prompts]
        questions += [(q, form, None) for form in self._forms() for q in others]
        return ask(self.host, editor, questions, batch_size=self.batch_size)

    def same_subject_before(self, editor: Editor, questions: Sequence[str]) -> tuple[Answer, ...]:
        """The answers to same-subject `questions` before an edit is applied (plain, and chat
        when served so), which `check` compares with the answers after it."""
        if not questions:
            return ()
        return tuple(ask(self.host, editor, [(q, form, None) for form in self._forms() for q in questions],
                         batch_size=self.batch_size))  # fmt: skip

    def earlier(self, editor: Editor, requests: Sequence[EditRequest], seed: int = 0) -> tuple[float | None, int]:
        k = min(self.thresholds.earlier_edits_sample, len(requests))
        if k == 0:
            return None, 0
        sample = random.Random(seed).sample(list(requests), k)
        scores = score_targets(self.host, editor, [(r.prompt, r.target) for r in sample], self.batch_size)
        return sum(s.accuracy for s in scores) / k, k

    def check(self, editor: Editor, request: EditRequest, earlier: Sequence[EditRequest] = (),
              same_subject: Sequence[Answer] = ()) -> ProbeReport:  # fmt: skip
        """Probe `request`'s edit, just applied to `editor`. `same_subject`: the answers to
        same-subject questions before it was applied (`same_subject_before`)."""
        t = self.thresholds
        failures: list[ProbeFailure] = []
        served_rel = served_gen = None
        figures: tuple[dict[str, Any], ...] = ()
        clock = _Clock()
        questions = list(dict.fromkeys(a.prompt for a in same_subject))
        same: tuple[dict[str, Any], ...] = ()
        if t.served_answers or same_subject:
            answered = clock("served", self.served, editor, request, questions)
            got, others = answered[: len(answered) - len(same_subject)], answered[len(answered) - len(same_subject) :]
            before = {(a.prompt, a.form): a for a in same_subject}
            same = tuple(_same_subject_figure(before[(a.prompt, a.form)], a, request.target) for a in others)
            hijacked = [f for f in same if f["hijacked"]]
            if hijacked:
                f = hijacked[0]
                failures.append(ProbeFailure("same_subject", f"hijacks {len(hijacked)} of {len(same)} same-subject answers: "
                                             f"{f['form']} {f['prompt']!r} -> {f['after'][:120]!r} (was {f['before'][:120]!r})",
                                             f["prompt"]))  # fmt: skip
        if t.served_answers:
            figures = tuple(_answer_figure(a) for a in got)
            own = [a for a in got if a.prompt == request.prompt]
            para = [a for a in got if a.prompt != request.prompt]
            served_rel = sum(a.correct for a in own) / len(own)
            served_gen = sum(a.correct for a in para) / len(para) if para else None
            wrong = [a for a in own + para if not a.correct]
            if served_rel < t.min_served_rel or (served_gen is not None and served_gen < t.min_served_gen):
                a = wrong[0]
                why = "degenerate" if a.degenerate else "misses the target"
                failures.append(ProbeFailure("served", f"answers wrong: served_rel {served_rel:.2f} (min {t.min_served_rel}), "
                                             f"served_gen {'-' if served_gen is None else f'{served_gen:.2f}'} (min "
                                             f"{t.min_served_gen}); {a.form} {a.prompt!r} -> {a.line[:120]!r} ({why})",
                                             a.prompt))  # fmt: skip
        rel, gen = clock("teacher_forced", self.edit_scores, editor, request)
        state = clock("locality", self.locality, editor)
        earlier_rel, checked = clock("earlier", self.earlier, editor, earlier)
        if rel < t.min_rel:
            failures.append(ProbeFailure("rel", f"edit did not take: rel {rel:.3f} < {t.min_rel}", request.prompt))
        if gen is not None and gen < t.min_gen:
            failures.append(ProbeFailure("gen", f"paraphrases not answered: gen {gen:.3f} < {t.min_gen}",
                                         request.rephrases[0] if request.rephrases else None))
        examples = self.changed_examples(state)
        if state.loc < t.min_loc:
            first = examples[0]
            failures.append(ProbeFailure("locality", f"locality degraded: loc {state.loc:.4f} < {t.min_loc} "
                                         f"({len(state.changed)} prompts changed, e.g. {first['prompt']!r} -> "
                                         f"{first['answer']!r}, was {first['recorded']!r})", first["prompt"]))  # fmt: skip
        if earlier_rel is not None and earlier_rel < t.min_earlier_rel:
            failures.append(ProbeFailure("earlier", f"earlier edits lost: rel {earlier_rel:.3f} < {t.min_earlier_rel} "
                                         f"over {checked}"))
        return ProbeReport(rel, gen, state.loc, earlier_rel, checked, tuple(failures), served_rel, served_gen,
                           figures, state.rows_run, examples, same, clock.seconds, state)  # fmt: skip


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn, *args):
        started = time.perf_counter()
        try:
            return fn(*args)
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
