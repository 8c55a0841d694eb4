"""Edit datasets: ZsRE, CounterFact (flat), hallucination and temporal files.

Every format is read into the same `EditRecord`. A bad or partial file fails with an
error naming the file and the record (index and case id) and the field at fault.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("zsre", "counterfact", "hallucination", "temporal")


class DatasetError(ValueError):
    pass


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


def detect_format(record: dict[str, Any]) -> str:
    keys = set(record)
    if {"src", "alt"} <= keys:
        return "zsre"
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


_READERS: dict[str, Callable[[dict[str, Any], str], EditRecord]] = {
    "zsre": _zsre,
    "counterfact": _counterfact,
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
        records.append(_READERS[row_format](row, where))
    return fmt, records
