"""The served-answer half of the lifelong benchmark (`lifelong-served/v2`, PROTOCOL.md; it
keeps every `lifelong-served/v1` figure).

The unedited model answers every question first (pre pass); after the last edit the
edited model answers the same questions. Both passes generate greedily with the KV cache
in left-padded batches, as the server does, at most 32 new tokens, stopping at EOS
(editors/answers.py has the rules: answer line, hit, degenerate, correct).

What is asked, per record (forms: editors/answers.py; the chat forms only when the model
has a chat template, `sys` only when the template takes a system prompt):

- `edit`: the edit prompt in every form (plain, chat, sys, multi): `edit_<form>_ok`;
- `reph`: each rephrase, plain and chat: `reph_<form>_ok` (averaged per record first);
- `same`: the record's same-subject questions (KnowEdit Relation_Specificity), plain and
  chat: `same_<form>_unchanged` (the continuation is token for token the unedited one)
  and `same_<form>_hijack` (the edited answer line contains the edit's target and the
  unedited one's did not);
- `near`: the edit prompt asked of a near subject, one that shares all but one word with
  the edit's ("Jose L Castillo" -> "Darren L Castillo": `near_subjects`), plain and chat:
  `near_<form>_unchanged` and `near_<form>_hijack` as for `same` (retrieval finds an edit
  by its subject's words, and the relation is the edit's own, so only the subject can
  tell these apart);
- `port`: portability questions, plain and chat: `port_<form>_ok` (an expected answer, any
  alias, in the answer line), with `_base` (unedited) and `_context` (the in-context
  reference: the unedited model with the new fact stated before the question);
- `loc`: the unrelated locality prompt, plain and chat: `loc_<form>` (unchanged token for
  token; v1's `served_loc`, `chat_loc`).

`degenerate` / `degenerate_base` keep v1's definition (edit prompts and rephrases, plain
and chat); `degenerate_all` / `degenerate_all_base` cover every form asked. v1's names
stay: `served_rel` = `edit_plain_ok`, `served_gen` = `reph_plain_ok`, `chat_rel` =
`edit_chat_ok`, `chat_gen` = `reph_chat_ok`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from kmd.editors.answers import SERVED_PROTOCOL, Answer, Form, ask, conversation, has_chat_template, hits, question_features
from kmd.editors.chat import ChatTemplateError

if TYPE_CHECKING:
    from kmd.editors.bench.data import EditRecord
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import Editor

SERVED_PROTOCOL_V2 = "lifelong-served/v2"
SAMPLE_RECORDS = 10
NEAR_STEP = 7  # a near subject borrows its word from the subject this many records on
HIJACK_SAMPLE = 30
MISS_SAMPLE = 60

Kind = Literal["edit", "reph", "same", "near", "port", "context", "loc"]
Notify = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Asked:
    """One question of a pass: what is asked, in which form, about which record."""

    kind: Kind
    form: Form
    record: int  # index into the records
    prompt: str  # the question (the user's message in the chat forms)
    target: str | None = None  # the edit's target, for edit / reph (correct = hit, not degenerate)
    expected: tuple[str, ...] = ()  # port / context: the answers any of which is right


@dataclass
class ServedPass:
    """Every answer of one pass (base or edited), in the order asked."""

    asked: list[Asked]
    answers: list[Answer]

    def of(self, kind: Kind, form: Form) -> list[tuple[Asked, Answer]]:
        return [(q, a) for q, a in zip(self.asked, self.answers, strict=True) if q.kind == kind and q.form == form]


def forms_of(host: ModelHost) -> tuple[Form, ...]:
    """The forms this model can be asked in: plain, and the chat forms when it has a template
    (`sys` when the template takes a system prompt)."""
    if not has_chat_template(host):
        return ("plain",)
    try:
        host.chat.render(conversation("?", "sys"))
    except ChatTemplateError:
        return ("plain", "chat", "multi")
    return ("plain", "chat", "sys", "multi")


def fact_context(record: EditRecord, question: str) -> str:
    """The in-context reference's prompt: the new fact stated, then the question."""
    fact = f"{record.prompt.strip()} {record.target.strip()}"
    return f"{fact}{'' if fact[-1:] in '.!?' else '.'}\n{question}"


def near_subjects(records: Sequence[EditRecord]) -> dict[int, tuple[str, ...]]:
    """Per record, its edit prompt asked of near subjects: the subject with its last, then
    its first word swapped for the last / first word of the subject `NEAR_STEP` records on
    (among those with a subject of two or more words that the prompt contains). A swap that
    changes nothing, or gives a subject some record is about, is skipped."""
    eligible = [i for i, r in enumerate(records) if r.subject and len(r.subject.split()) >= 2 and r.subject in r.prompt]
    subjects = {r.subject.lower() for r in records if r.subject}
    out: dict[int, tuple[str, ...]] = {}
    for n, i in enumerate(eligible):
        record = records[i]
        words, lender = record.subject.split(), records[eligible[(n + NEAR_STEP) % len(eligible)]].subject.split()
        prompts = []
        for position, word in ((len(words) - 1, lender[-1]), (0, lender[0])):
            near = " ".join([*words[:position], word, *words[position + 1 :]])
            if word.lower() != words[position].lower() and near.lower() not in subjects:
                prompts.append(record.prompt.replace(record.subject, near))
        out[i] = tuple(prompts)
    return out


def plan(records: Sequence[EditRecord], forms: Sequence[Form], base: bool, v2: bool = True) -> list[Asked]:
    """Every question of a pass. The in-context reference is asked of the unedited model only."""
    two = [f for f in forms if f in ("plain", "chat")]
    edit_forms = list(forms) if v2 else two
    near = near_subjects(records) if v2 else {}
    out: list[Asked] = []
    for i, r in enumerate(records):
        out += [Asked("edit", f, i, r.prompt, r.target) for f in edit_forms]
        out += [Asked("reph", f, i, p, r.target) for p in r.rephrases for f in two]
        if r.loc_answer:
            out += [Asked("loc", f, i, r.loc_prompt) for f in two]
        if not v2:
            continue
        out += [Asked("same", f, i, q.prompt) for q in r.same_subject for f in two]
        out += [Asked("near", f, i, p) for p in near.get(i, ()) for f in two]
        out += [Asked("port", f, i, q.prompt, expected=q.answers) for q in r.portability for f in two]
        if base:
            out += [Asked("context", f, i, fact_context(r, q.prompt), expected=q.answers) for q in r.portability for f in two]
    return out


def run_pass(
    host: ModelHost, editor: Editor | None, records: Sequence[EditRecord], batch_size: int, notify: Notify, phase: str,
    v2: bool = True,
) -> ServedPass:
    asked = plan(records, forms_of(host), base=editor is None, v2=v2)
    answers: list[Answer] = []
    chunk = batch_size * 8
    for start in range(0, len(asked), chunk):
        notify(phase, start, len(asked))
        part = asked[start : start + chunk]
        answers += ask(host, editor, [(q.prompt, q.form, q.target) for q in part], batch_size=batch_size)
    notify(phase, len(asked), len(asked))
    return ServedPass(asked, answers)


def _mean(values: Sequence[float]) -> float | None:
    return float(statistics.fmean(values)) if values else None


def _per_record(pairs: Sequence[tuple[Asked, float]]) -> list[float]:
    """Values averaged per record first."""
    grouped: dict[int, list[float]] = {}
    for q, value in pairs:
        grouped.setdefault(q.record, []).append(value)
    return [statistics.fmean(v) for v in grouped.values()]


def _any_hit(answer: Answer, expected: Sequence[str]) -> bool:
    return any(hits(answer.line, e) for e in expected)


def summarise(base: ServedPass, edited: ServedPass, records: Sequence[EditRecord]) -> dict[str, Any]:
    forms = sorted({q.form for q in edited.asked}, key=("plain", "chat", "sys", "multi").index)
    out: dict[str, Any] = {"served_protocol": SERVED_PROTOCOL_V2 if any(q.kind == "same" or q.form in ("sys", "multi")
                                                                         for q in edited.asked) else SERVED_PROTOCOL}  # fmt: skip
    for form in forms:
        for kind in ("edit", "reph"):
            for name, p in (("", edited), ("_base", base)):
                pairs = [(q, float(a.correct)) for q, a in p.of(kind, form)]
                if kind == "edit" or form in ("plain", "chat"):
                    out[f"{kind}_{form}_ok{name}"] = _mean(_per_record(pairs)) if pairs else None
        if form not in ("plain", "chat"):
            continue  # the other questions are asked plain and as a chat turn
        for kind in ("same", "near"):
            pairs = list(zip(base.of(kind, form), edited.of(kind, form), strict=True))
            out[f"{kind}_{form}_unchanged"] = _mean([float(e.tokens == b.tokens) for (_, b), (_, e) in pairs])
            out[f"{kind}_{form}_hijack"] = _mean([float(_hijacked(records[q.record].target, b, e)) for (q, b), (_, e) in pairs])
        for name, p, kind in (("", edited, "port"), ("_base", base, "port"), ("_context", base, "context")):
            pairs = p.of(kind, form)
            out[f"port_{form}_ok{name}"] = _mean([float(_any_hit(a, q.expected)) for q, a in pairs])
        loc = list(zip(base.of("loc", form), edited.of("loc", form), strict=True))
        out[f"loc_{form}"] = _mean([float(e.tokens == b.tokens) for (_, b), (_, e) in loc])
    out |= {
        "served_rel": out.get("edit_plain_ok"),
        "served_gen": out.get("reph_plain_ok"),
        "chat_rel": out.get("edit_chat_ok"),
        "chat_gen": out.get("reph_chat_ok"),
        "served_loc": out.get("loc_plain"),
        "chat_loc": out.get("loc_chat"),
        "degenerate": _degenerate(edited, ("plain", "chat")),
        "degenerate_base": _degenerate(base, ("plain", "chat")),
        "degenerate_all": _degenerate(edited, forms),
        "degenerate_all_base": _degenerate(base, forms),
        "n_same": sum(len(r.same_subject) for r in records),
        "n_near": sum(1 for q in edited.asked if q.kind == "near" and q.form == "plain"),
        "n_port": sum(len(r.portability) for r in records),
        "answers_sample": sample(base, edited, records),
        "hijack_sample": hijack_sample(base, edited, records),
        "miss_sample": miss_sample(base, edited, records),
    }
    return out


def _hijacked(target: str, base: Answer, edited: Answer) -> bool:
    """The edited answer states the edit's target and the unedited one did not."""
    return hits(edited.line, target) and not hits(base.line, target)


def _degenerate(p: ServedPass, forms: Sequence[str]) -> float | None:
    flags = [float(a.degenerate) for q, a in zip(p.asked, p.answers, strict=True) if q.kind in ("edit", "reph") and q.form in forms]
    return _mean(flags)


def sample(base: ServedPass, edited: ServedPass, records: Sequence[EditRecord], count: int = SAMPLE_RECORDS) -> list[dict[str, Any]]:
    """The first `count` records with base and edited answers side by side: the edit prompt in
    every form, the first rephrase and the first same-subject question (plain and chat)."""
    rows: dict[int, dict[str, Any]] = {}
    first: dict[tuple[Kind, Form, int], bool] = {}
    for q, b, e in zip(edited.asked, _aligned(base, edited), edited.answers, strict=True):
        if q.record >= count or q.kind not in ("edit", "reph", "same") or first.get((q.kind, q.form, q.record)):
            continue
        first[(q.kind, q.form, q.record)] = True
        r = records[q.record]
        row = rows.setdefault(q.record, {"case_id": r.case_id, "prompt": r.prompt, "target": r.target})
        entry = row.setdefault(q.form, {})
        if q.kind == "edit":
            entry |= {"base": b.text, "edited": e.text, "correct": e.correct}
        elif q.kind == "reph":
            entry |= {"rephrase": q.prompt, "rephrase_base": b.text, "rephrase_edited": e.text, "rephrase_correct": e.correct}
        else:
            entry |= {"same": q.prompt, "same_base": b.text, "same_edited": e.text,
                      "same_hijacked": _hijacked(r.target, b, e), "same_unchanged": b.tokens == e.tokens}  # fmt: skip
    return [rows[i] for i in sorted(rows)]


def hijack_sample(base: ServedPass, edited: ServedPass, records: Sequence[EditRecord], count: int = HIJACK_SAMPLE) -> list[dict[str, Any]]:
    """Every hijacked same-subject or near-subject answer (up to `count`): the edit, the other
    question, both answers."""
    out = []
    for q, b, e in zip(edited.asked, _aligned(base, edited), edited.answers, strict=True):
        if q.kind in ("same", "near") and _hijacked(records[q.record].target, b, e):
            r = records[q.record]
            out.append({"kind": q.kind, "edit": f"{r.prompt} -> {r.target}", "question": q.prompt, "form": q.form,
                        "base": b.text, "edited": e.text})  # fmt: skip
            if len(out) >= count:
                break
    return out


def miss_sample(base: ServedPass, edited: ServedPass, records: Sequence[EditRecord], count: int = MISS_SAMPLE) -> list[dict[str, Any]]:
    """Every edit prompt answered wrong, in any form (up to `count`): what the misses look like."""
    return [m for m in _wrong(base, edited, records) if m["kind"] == "edit"][:count]


def misses(
    host: ModelHost, editor: Editor, base: ServedPass, edited: ServedPass, records: Sequence[EditRecord]
) -> list[dict[str, Any]]:
    """Every edit prompt and rephrase answered wrong, in the order asked (`kmd bench --misses`),
    with `routed`: whether any edit acts on the question under the final edits (None: the
    backend cannot tell), so a retrieval miss reads apart from a routed question answered wrong."""
    wrong = _wrong(base, edited, records)
    features = question_features(host, editor, [(m["prompt"], m["form"]) for m in wrong])
    routed = [None] * len(wrong) if features is None else [route is not None for f in features for route in editor.routes(f)]
    return [m | {"routed": r} for m, r in zip(wrong, routed, strict=True)]


def _wrong(base: ServedPass, edited: ServedPass, records: Sequence[EditRecord]) -> list[dict[str, Any]]:
    """Every question with a target (edit prompt, rephrase) answered wrong, with both answers;
    `hit` true: the target was written but the answer is degenerate."""
    out = []
    for q, b, e in zip(edited.asked, _aligned(base, edited), edited.answers, strict=True):
        if q.kind in ("edit", "reph") and not e.correct:
            r = records[q.record]
            out.append({"edit": f"{r.prompt} -> {r.target}", "kind": q.kind, "prompt": q.prompt, "form": q.form,
                        "target": r.target, "base": b.text, "edited": e.text, "hit": e.hit, "degenerate": e.degenerate})  # fmt: skip
    return out


def _aligned(base: ServedPass, edited: ServedPass) -> list[Answer]:
    """The base pass's answer to each question of the edited pass (the base pass also asks
    the in-context reference, which the edited pass does not)."""
    index = {q: a for q, a in zip(base.asked, base.answers, strict=True)}
    return [index[q] for q in edited.asked]
