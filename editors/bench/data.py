"""Edit datasets: ZsRE, CounterFact (flat), KnowEdit, hallucination and temporal files.

Every format is read into the same `EditRecord`. A bad or partial file fails with an
error naming the file and the record (index and case id) and the field at fault.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

FORMATS = ("zsre", "counterfact", "knowedit", "hallucination", "temporal")
MAX_SIDE_QUESTIONS = 8  # same-subject / portability questions kept per record and kind


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class SideQuestion:
    """A question about an edited record other than its own: a same-subject question (another
    fact of the subject, `answers` its unedited truth) or a portability question (`answers`
    the aliases any of which is correct after the edit); `kind` names the set it came from."""

    prompt: str
    answers: tuple[str, ...]
    kind: str


@dataclass(frozen=True)
class EditRecord:
    case_id: str
    prompt: str
    target: str
    subject: str | None
    rephrases: tuple[str, ...]
    loc_prompt: str
    loc_answer: str | None  # None: the record has no locality answer and no locality score
    long_form: bool = False  # hallucination/temporal: perplexity is the headline metric
    same_subject: tuple[SideQuestion, ...] = ()  # KnowEdit locality.Relation_Specificity
    portability: tuple[SideQuestion, ...] = ()  # KnowEdit portability.*


def detect_format(record: dict[str, Any]) -> str:
    keys = set(record)
    if {"src", "alt"} <= keys:
        return "zsre"
    if isinstance(record.get("portability"), dict) or isinstance(record.get("locality"), dict):
        return "knowedit"
    if "ood_rephrase" in keys:
        return "temporal"
    if "rephrase_prompt" in keys and "target_new" in keys:
        return "counterfact"
    if {"prompt", "target_new", "locality_prompt"} <= keys:
        return "hallucination"
    raise DatasetError(f"cannot tell the format from fields {sorted(keys)}; pass --format ({', '.join(FORMATS)})")


def _text(record: dict[str, Any], field: str, where: str, optional: bool = False) -> str | None:
    value = record.get(field)
    if value is None and optional:
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0]  # some splits store single answers as one-element lists
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: field {field!r} must be a non-empty string (got {value!r:.60})")
    return value


def _blank_or_text(record: dict[str, Any], field: str, where: str) -> str | None:
    """A few hallucination records have an empty locality answer: edited, not locality-scored."""
    value = record.get(field)
    return None if isinstance(value, str) and not value.strip() else _text(record, field, where)


def _zsre(r: dict[str, Any], where: str) -> EditRecord:
    return EditRecord(
        case_id=str(r.get("case_id", "")),
        prompt=_text(r, "src", where),
        target=_text(r, "alt", where),
        subject=_text(r, "subject", where, optional=True),
        rephrases=(_text(r, "rephrase", where),),
        loc_prompt=_text(r, "loc", where),
        loc_answer=_text(r, "loc_ans", where),
    )


def _counterfact(r: dict[str, Any], where: str) -> EditRecord:
    return EditRecord(
        case_id=str(r.get("case_id", "")),
        prompt=_text(r, "prompt", where),
        target=_text(r, "target_new", where),
        subject=_text(r, "subject", where, optional=True),
        rephrases=(_text(r, "rephrase_prompt", where),),
        loc_prompt=_text(r, "locality_prompt", where),
        loc_answer=_text(r, "locality_ground_truth", where),
    )


def _long_form(r: dict[str, Any], where: str, rephrase_field: str | None) -> EditRecord:
    return EditRecord(
        case_id=str(r.get("case_id", "")),
        prompt=_text(r, "prompt", where),
        target=_text(r, "target_new", where),
        subject=_text(r, "subject", where, optional=True),
        rephrases=(_text(r, rephrase_field, where),) if rephrase_field else (),
        loc_prompt=_text(r, "locality_prompt", where),
        loc_answer=_blank_or_text(r, "locality_ground_truth", where),
        long_form=True,
    )


def _aliases(value: Any, where: str) -> tuple[str, ...]:
    """A KnowEdit ground truth: a string, a list of aliases, or a list of alias lists."""
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, list):
        return tuple(a for v in value for a in _aliases(v, where))
    raise DatasetError(f"{where}: a ground truth must be a string or a list of strings (got {value!r:.60})")


def _side_questions(r: dict[str, Any], field: str, where: str, kinds: tuple[str, ...] | None) -> tuple[SideQuestion, ...]:
    """The questions of `r[field]` (a dict of kind -> [{prompt, ground_truth}]), kinds in
    `kinds` (None: every kind), at most MAX_SIDE_QUESTIONS per kind."""
    groups = r.get(field) or {}
    if not isinstance(groups, dict):
        raise DatasetError(f"{where}: field {field!r} must be an object of question lists")
    out = []
    for kind, items in groups.items():
        if kinds is not None and kind not in kinds:
            continue
        if not isinstance(items, list):
            raise DatasetError(f"{where}: {field}.{kind} must be a list")
        for index, item in enumerate(items[:MAX_SIDE_QUESTIONS]):
            at = f"{where}: {field}.{kind}[{index}]"
            if not isinstance(item, dict):
                raise DatasetError(f"{at}: expected an object")
            prompt = item.get("prompt")
            if isinstance(prompt, list) and prompt:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt.strip():
                raise DatasetError(f"{at}: field 'prompt' must be a non-empty string")
            answers = _aliases(item.get("ground_truth"), at)
            if answers:
                out.append(SideQuestion(prompt=prompt, answers=answers, kind=kind))
    return tuple(out)


def _rephrases(r: dict[str, Any], where: str) -> tuple[str, ...]:
    for field in ("rephrase", "rephrase_prompt", "rephrase_prompts"):
        value = r.get(field)
        if isinstance(value, str) and value.strip():
            return (value,)
        if isinstance(value, list):
            return tuple(v for v in value if isinstance(v, str) and v.strip())
    return ()


def _knowedit(r: dict[str, Any], where: str) -> EditRecord:
    """KnowEdit (WikiData counterfact / recent, ZsRE in its format): the edit is `prompt ->
    target_new`; `locality.Relation_Specificity` holds same-subject questions and
    `portability.*` the questions whose answer follows from the new fact. KnowEdit has no
    unrelated locality prompt: `load_records` gives each record another record's
    same-subject question (`_unrelated`)."""
    prompt = _text(r, "prompt" if "prompt" in r else "text", where)
    return EditRecord(
        case_id=str(r.get("case_id", "")),
        prompt=prompt,
        target=_text(r, "target_new" if "target_new" in r else "labels", where),
        subject=_text(r, "subject" if "subject" in r else "concept", where, optional=True),
        rephrases=_rephrases(r, where),
        loc_prompt=prompt,  # replaced by `_unrelated`
        loc_answer=None,
        same_subject=_side_questions(r, "locality", where, ("Relation_Specificity",)),
        portability=_side_questions(r, "portability", where, None),
    )


def _unrelated(records: list[EditRecord], pool: list[list[SideQuestion]]) -> list[EditRecord]:
    """KnowEdit records get, as their unrelated locality prompt, the first same-subject
    question of the record half the file away (another subject; with N <= half the file,
    one no evaluated edit is about). Records without one keep no locality score."""
    n = len(pool)
    out = []
    for index, record in enumerate(records):
        for step in range(n):
            other = pool[(index + n // 2 + step) % n]
            if other and (index + n // 2 + step) % n != index:
                out.append(replace(record, loc_prompt=other[0].prompt, loc_answer=other[0].answers[0]))
                break
        else:
            out.append(record)
    return out


_READERS: dict[str, Callable[[dict[str, Any], str], EditRecord]] = {
    "zsre": _zsre,
    "counterfact": _counterfact,
    "knowedit": _knowedit,
    "hallucination": lambda r, w: _long_form(r, w, None),
    "temporal": lambda r, w: _long_form(r, w, "ood_rephrase"),
}


def _read_json(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); truncated?") from exc
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def load_records(path: str | Path, fmt: str | None = None, limit: int | None = None) -> tuple[str, list[EditRecord]]:
    """(format, records) from a dataset file; only the first `limit` records are checked."""
    path = Path(path)
    rows = _read_json(path)
    if not rows:
        raise DatasetError(f"{path}: no records")
    if fmt is not None and fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    pool = rows
    rows = rows[:limit] if limit else rows
    records = []
    for index, row in enumerate(rows):
        where = f"{path.name}: record {index}"
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected an object, got {type(row).__name__}")
        if "case_id" in row:
            where += f" (case_id {row['case_id']})"
        row_format = fmt or detect_format(row)
        fmt = row_format  # the first record fixes the format for the rest
        record = _READERS[row_format](row, where)
        records.append(record if record.case_id else replace(record, case_id=str(index)))
    if fmt == "knowedit":
        same = [list(_side_questions(r, "locality", "", ("Relation_Specificity",))) if isinstance(r, dict) else []
                for r in pool]  # fmt: skip
        records = _unrelated(records, same)
    return fmt, records
