"""The served-answer half of the lifelong benchmark (`lifelong-served/v1`, PROTOCOL.md).

The unedited model answers every prompt first (pre pass); after the last edit the edited
model answers the same prompts. Both passes generate greedily with the KV cache in
left-padded batches, as the server does, at most 32 new tokens, stopping at EOS:

- the edit prompt and each rephrase, plain and (when the model has one) through the chat
  template as a user turn: `served_rel`, `served_gen`, `chat_rel`, `chat_gen` are the
  fractions answered correctly (hit and not degenerate, editors/answers.py), rephrases
  averaged per record first;
- the locality prompts, plain and chat: `served_loc`, `chat_loc` are the fractions whose
  continuation is token for token the unedited model's;
- `degenerate` / `degenerate_base`: the fraction of degenerate answers to the edit prompts
  and rephrases (both forms) after the edits / from the unedited model.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kmd.editors.answers import SERVED_PROTOCOL, Answer, Form, answers, has_chat_template

if TYPE_CHECKING:
    from kmd.editors.bench.data import EditRecord
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import Editor

SAMPLE_RECORDS = 10

Notify = Callable[[str, int, int], None]


@dataclass
class ServedPass:
    """Every answer of one pass (base or edited), per form."""

    rel: dict[Form, list[Answer]]  # one per record
    gen: dict[Form, list[Answer]]  # one per rephrase, in record order
    loc: dict[Form, list[Answer]]  # one per locality prompt


def forms_of(host: ModelHost) -> tuple[Form, ...]:
    return ("plain", "chat") if has_chat_template(host) else ("plain",)


def run_pass(
    host: ModelHost, editor: Editor | None, records: Sequence[EditRecord], batch_size: int, notify: Notify, phase: str
) -> ServedPass:
    forms = forms_of(host)
    rel_prompts = [r.prompt for r in records]
    rel_targets = [r.target for r in records]
    gen_prompts = [p for r in records for p in r.rephrases]
    gen_targets = [r.target for r in records for _ in r.rephrases]
    loc_prompts = [r.loc_prompt for r in records if r.loc_answer]
    steps, done = 3 * len(forms), 0
    out = ServedPass({}, {}, {})
    for form in forms:
        for kind, prompts, targets in (
            ("rel", rel_prompts, rel_targets), ("gen", gen_prompts, gen_targets), ("loc", loc_prompts, None)
        ):
            notify(phase, done, steps)
            getattr(out, kind)[form] = answers(host, editor, prompts, form, targets, batch_size=batch_size) if prompts else []
            done += 1
    notify(phase, steps, steps)
    return out


def _mean(values: Sequence[float]) -> float | None:
    return float(statistics.fmean(values)) if values else None


def _per_record(values: Sequence[float], records: Sequence[EditRecord]) -> list[float]:
    """Rephrase values (record order) averaged per record."""
    out, start = [], 0
    for record in records:
        count = len(record.rephrases)
        if count:
            out.append(statistics.fmean(values[start : start + count]))
        start += count
    return out


def _degenerate_rate(p: ServedPass) -> float | None:
    flags = [a.degenerate for form in p.rel for a in p.rel[form] + p.gen[form]]
    return _mean([float(f) for f in flags])


def summarise(base: ServedPass, edited: ServedPass, records: Sequence[EditRecord]) -> dict[str, Any]:
    def correct(form: Form, kind: str) -> float | None:
        answered = getattr(edited, kind).get(form)
        if answered is None:
            return None
        flags = [float(a.correct) for a in answered]
        return _mean(flags) if kind == "rel" else _mean(_per_record(flags, records))

    def same_as_base(form: Form) -> float | None:
        if form not in edited.loc:
            return None
        return _mean([float(e.tokens == b.tokens) for e, b in zip(edited.loc[form], base.loc[form], strict=True)])

    return {
        "served_protocol": SERVED_PROTOCOL,
        "served_rel": correct("plain", "rel"),
        "served_gen": correct("plain", "gen"),
        "chat_rel": correct("chat", "rel"),
        "chat_gen": correct("chat", "gen"),
        "served_loc": same_as_base("plain"),
        "chat_loc": same_as_base("chat"),
        "degenerate": _degenerate_rate(edited),
        "degenerate_base": _degenerate_rate(base),
        "answers_sample": sample(base, edited, records),
    }


def sample(base: ServedPass, edited: ServedPass, records: Sequence[EditRecord], count: int = SAMPLE_RECORDS) -> list[dict[str, Any]]:
    """The first `count` records with base and edited answers side by side."""
    rows, rephrase_index = [], 0
    for index, record in enumerate(records[:count]):
        row: dict[str, Any] = {"case_id": record.case_id, "prompt": record.prompt, "target": record.target}
        for form in edited.rel:
            row[form] = {
                "base": base.rel[form][index].text,
                "edited": edited.rel[form][index].text,
                "correct": edited.rel[form][index].correct,
            }
            if record.rephrases:
                first = edited.gen[form][rephrase_index]
                row[form]["rephrase"] = first.prompt
                row[form]["rephrase_base"] = base.gen[form][rephrase_index].text
                row[form]["rephrase_edited"] = first.text
                row[form]["rephrase_correct"] = first.correct
        rephrase_index += len(record.rephrases)
        rows.append(row)
    return rows
