"""Wikidata statements as kmd reads them: which one is current, and its value as text.

The current value of a property is its preferred-rank statement, else its normal-rank one.
Deprecated statements never count, nor do statements whose end time (P582) has passed or
whose start time (P580) has not come yet. Several candidates left: the one that started
last (an older statement whose end time nobody entered), or none when that does not
decide (co-chief executives, a country with two capitals): an ambiguous value is reported,
never guessed.

Values become the text an edit teaches: items by their label (looked up by the caller in
one batched request), times as "1 November 2026", "November 2026", "2026", "2020s",
"21st century" by their precision, quantities as the amount and its unit's label.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kmd.sources.wikidata.api import DataValue, Statement

__all__ = ["END", "START", "Current", "current_statement", "parse_time_value", "render_value", "start_time",
           "value_ids"]

START, END = "P580", "P582"
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")  # fmt: skip
_TIME_RE = re.compile(r"^([+-])(\d{1,16})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})Z$")
_ENTITY_URI_RE = re.compile(r"^https?://[^/]+/entity/(Q[1-9][0-9]{0,11})$")


@dataclass(frozen=True)
class Current:
    """The outcome for one property: its current statement, or why there is none."""

    statement: Statement | None
    why_none: str = ""  # "no current statement", "ambiguous: ...", "no value (novalue)"...


@dataclass(frozen=True)
class _Time:
    year: int
    month: int
    day: int
    hour: int
    minute: int
    precision: int


def _time(value: Any) -> _Time | None:
    """A Wikibase time value ({"time": "+2026-11-01T00:00:00Z", "precision": 11, ...})."""
    if not isinstance(value, dict) or not isinstance(value.get("time"), str):
        return None
    match = _TIME_RE.match(value["time"])
    precision = value.get("precision")
    if match is None or not isinstance(precision, int) or not 0 <= precision <= 14:
        return None
    sign, year, month, day, hour, minute, _ = match.groups()
    return _Time(int(year) * (-1 if sign == "-" else 1), int(month), int(day), int(hour), int(minute), precision)


def parse_time_value(value: Any) -> datetime | None:
    """The instant a time value starts at (precision year or finer, years 1-9999), else None.

    Wikibase writes unknown parts as zero ("+2026-00-00T00:00:00Z" at year precision)."""
    t = _time(value)
    if t is None or t.precision < 9 or not 1 <= t.year <= 9999:
        return None
    month = t.month if t.precision >= 10 and 1 <= t.month <= 12 else 1
    day = t.day if t.precision >= 11 and t.day >= 1 else 1
    try:
        return datetime(t.year, month, day, t.hour if t.precision >= 12 else 0, t.minute if t.precision >= 13 else 0,
                        tzinfo=UTC)  # fmt: skip
    except ValueError:
        return None


def _qualifier_time(statement: Statement, prop: str) -> tuple[bool, datetime | None]:
    """(has the qualifier, its time); an unknown value ("somevalue") is present without a time."""
    snaks = statement.qualifiers.get(prop) or []
    for snak in snaks:
        if snak.snaktype == "value" and snak.datavalue is not None:
            return True, parse_time_value(snak.datavalue.value)
        if snak.snaktype == "somevalue":
            return True, None
    return False, None


def start_time(statement: Statement) -> datetime | None:
    return _qualifier_time(statement, START)[1]


def _ended(statement: Statement, now: datetime) -> bool:
    has_end, end = _qualifier_time(statement, END)
    return has_end and (end is None or end <= now)  # an unknown end time has passed


def current_statement(statements: Sequence[Statement], now: datetime) -> Current:
    """The property's current statement (see the module docstring), or why there is none."""
    live = [s for s in statements if s.rank != "deprecated" and not _ended(s, now)
            and not ((start := start_time(s)) is not None and start > now)]  # fmt: skip
    best = [s for s in live if s.rank == "preferred"] or live
    if not best:
        return Current(None, "no current statement")
    if len(best) > 1:
        starts = sorted(((start_time(s) or datetime.min.replace(tzinfo=UTC)), i) for i, s in enumerate(best))
        if starts[-1][0] == starts[-2][0]:
            return Current(None, f"ambiguous: {len(best)} current {best[0].rank}-rank statements")
        best = [best[starts[-1][1]]]
    chosen = best[0]
    if chosen.mainsnak.snaktype != "value" or chosen.mainsnak.datavalue is None:
        return Current(None, f"no value ({chosen.mainsnak.snaktype})")
    return Current(chosen)


def value_ids(value: DataValue | None) -> list[str]:
    """The item ids the value's text needs labels of (the item, a quantity's unit)."""
    if value is None or not isinstance(value.value, dict):
        return []
    if value.type == "wikibase-entityid":
        item = value.value.get("id")
        return [item] if isinstance(item, str) and item.startswith("Q") else []
    if value.type == "quantity":
        unit = _ENTITY_URI_RE.match(str(value.value.get("unit", "")))
        return [unit.group(1)] if unit else []
    return []


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _render_time(t: _Time) -> str | None:
    era = " BC" if t.year < 0 else ""
    year = abs(t.year)
    if t.precision >= 11 and 1 <= t.month <= 12 and t.day >= 1:
        return f"{t.day} {_MONTHS[t.month - 1]} {year}{era}"
    if t.precision == 10 and 1 <= t.month <= 12:
        return f"{_MONTHS[t.month - 1]} {year}{era}"
    if t.precision >= 9:
        return f"{year}{era}"
    if t.precision == 8:
        return f"{year - year % 10}s{era}"
    if t.precision == 7:
        return f"{_ordinal((year - 1) // 100 + 1)} century{era}"
    if t.precision == 6:
        return f"{_ordinal((year - 1) // 1000 + 1)} millennium{era}"
    return f"{year}{era}"  # coarser: the year Wikibase gives


def render_value(value: DataValue, label: Callable[[str], str | None]) -> tuple[str | None, str]:
    """(the value as text, or None and why not). `label(item_id)` gives an item's label."""
    v = value.value
    if value.type == "string" and isinstance(v, str):
        return v, ""
    if value.type == "monolingualtext" and isinstance(v, dict) and isinstance(v.get("text"), str):
        return v["text"], ""
    if value.type == "wikibase-entityid":
        ids = value_ids(value)
        if not ids:
            return None, "not an item"
        text = label(ids[0])
        return (text, "") if text else (None, f"{ids[0]} has no label")
    if value.type == "time":
        t = _time(v)
        text = _render_time(t) if t else None
        return (text, "") if text else (None, "not a valid time value")
    if value.type == "quantity" and isinstance(v, dict) and isinstance(v.get("amount"), str):
        amount = v["amount"].removeprefix("+")
        if not re.fullmatch(r"-?\d{1,30}(\.\d{1,30})?", amount):
            return None, "not a valid quantity"
        unit_ids = value_ids(value)
        if not unit_ids:
            return amount, ""
        unit = label(unit_ids[0])
        return (f"{amount} {unit}", "") if unit else (None, f"unit {unit_ids[0]} has no label")
    return None, f"values of type {value.type!r} are not read"
