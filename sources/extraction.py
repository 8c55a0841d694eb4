"""Extraction rules: facts in a feed entry's prose, read with regular expressions from the policy.

A rule (`kmd.sources.config.ExtractionPattern`) names a relation, an entry field and a
pattern whose named groups `subject` and `object` give the fact. Patterns run on RE2
(google-re2), whose matching is linear in the text: no pattern can backtrack
catastrophically, so a hostile or careless pattern cannot stall the intake on a crafted
headline. What RE2 cannot promise that for (backreferences, lookaround) it does not
support, and such a pattern is refused when the policy is loaded, as is one whose compiled
program exceeds RE2's memory budget. RE2's `\\w`, `\\d`, `\\s` and `\\b` are ASCII; use
`\\pL` (any letter) or `\\p{Lu}` (an upper-case letter) for names like "Zürich".
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import re2

from kmd.sources.claims import clean_text

__all__ = ["MAX_PATTERN_CHARS", "PatternError", "RuleMatch", "compile_pattern", "match_rules"]

MAX_PATTERN_CHARS = 2000
_GROUPS = ("subject", "object")


class PatternError(ValueError):
    """A pattern kmd refuses: not RE2 syntax, too large, or without the named groups."""


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # the error is raised to the policy loader, not printed on stderr
    return options


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> re2._Regexp:
    """The compiled RE2 program for a rule's pattern; raises `PatternError` saying why not."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"pattern is {len(pattern)} characters; at most {MAX_PATTERN_CHARS}")
    try:
        compiled = re2.compile(pattern, _options())
    except re2.error as exc:
        detail = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        hint = ""
        if "invalid perl operator" in detail or "invalid escape" in detail:
            hint = " (RE2 has no backreferences or lookaround: they can take exponential time)"
        raise PatternError(f"invalid regular expression (RE2): {detail}{hint}") from None
    missing = [g for g in _GROUPS if g not in compiled.groupindex]
    if missing:
        raise PatternError(f"pattern needs named groups (?P<subject>...) and (?P<object>...); missing {missing}")
    return compiled


@dataclass(frozen=True)
class RuleMatch:
    """One rule that matched an entry: which rule (its index in the source's list) and what it read."""

    rule: int
    relation: str
    field: str
    subject: str
    object: str


class Rule(Protocol):
    """What `match_rules` needs of a rule (`ExtractionPattern` is one)."""

    relation: str
    field: str
    pattern: str


def match_rules(rules: Sequence[Rule], fields: Mapping[str, str]) -> list[RuleMatch]:
    """Every rule whose pattern matches its field's text, in rule order.

    `fields` maps a field name to the entry's plain text for it (cleaned, capped); a rule
    whose groups capture only spaces gives nothing.
    """
    found: list[RuleMatch] = []
    for index, rule in enumerate(rules):
        text = fields.get(rule.field, "")
        match = compile_pattern(rule.pattern).search(text) if text else None
        if match is None:
            continue
        subject, obj = clean_text(match.group("subject") or ""), clean_text(match.group("object") or "")
        if subject and obj:
            found.append(RuleMatch(index, rule.relation, rule.field, subject, obj))
    return found
