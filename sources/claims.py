"""Claims: one source saying one (subject, relation, object) at one time.

A claim is an immutable value. Its `content_hash` identifies "this source said this thing in
this entry", so re-reading the same feed entry or JSONL line yields the same hash and the
ledger drops it as a duplicate. Text coming from sources is data only: it is cleaned of
control characters, length-checked and never formatted, evaluated or used as a path.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

from kmd.common.values import canonical_json, iso, parse_time, utcnow

__all__ = ["ENTRY_FLAG", "Claim", "canonical_json", "clean_text", "content_flag", "entry_flag", "iso", "normalize_text",
           "parse_time", "utcnow"]

_WS_RE = re.compile(r"\s+")
_ASCII_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# Format, surrogate, private-use and unassigned characters (bidi overrides, zero-width
# joiners) have no place in a fact and are dropped; control characters become spaces.
_DROP_CATEGORIES = {"Cf", "Cs", "Co", "Cn"}
_EDGE_PUNCT = " \t\"'`.,;:!?()[]{}<>«»“”‘’"

ENTRY_FLAG = "entry:"


def entry_flag(digest: str) -> str:
    """The claim flag carrying an entry's digest (`kmd.daemon.independence` counts two
    sources whose claims carry the same digest once). Sources make it with `content_flag`."""
    return ENTRY_FLAG + digest[:32]


def content_flag(subject: str, relation: str, object: str, *, text: str = "", link: str = "") -> str:  # noqa: A002
    """The entry flag of what an entry says, not of its bytes: the claim's normalised
    subject, relation and object, the entry's summary text (normalised) and its link
    target. A copy with a rewritten id, title, date or whitespace says the same thing, so
    its source counts as one with the original's; a publisher with its own story (another
    link or summary) stays independent."""
    content = {"subject": normalize_text(subject), "relation": relation, "object": normalize_text(object),
               "text": normalize_text(text), "link": _link_target(link)}  # fmt: skip
    return entry_flag(hashlib.sha256(canonical_json(content).encode("utf-8", "surrogatepass")).hexdigest())


def _link_target(link: str) -> str:
    """A link as a target: scheme and host in lower case, no fragment, no surrounding space."""
    link = clean_text(link)
    try:
        parts = urlsplit(link)
    except ValueError:  # e.g. a broken IPv6 literal: compare it as written
        return link
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path, parts.query, ""))


def clean_text(value: str) -> str:
    """Source text as plain data: NFC, invisible characters dropped, whitespace collapsed."""
    if value.isascii():  # the common case: only ASCII control characters to replace
        return _WS_RE.sub(" ", _ASCII_CONTROL_RE.sub(" ", value)).strip()
    value = unicodedata.normalize("NFC", value)
    value = "".join(
        " " if (cat := unicodedata.category(ch)) == "Cc" else ("" if cat in _DROP_CATEGORIES else ch) for ch in value
    )
    return _WS_RE.sub(" ", value).strip()


def normalize_text(value: str) -> str:
    """The exact-match form of a subject or object.

    NFKC + casefold, whitespace collapsed, surrounding punctuation and quotes stripped and a
    leading English article dropped: "The  Hague." and "the hague" compare equal. Anything
    looser is left to semantic matching.
    """
    value = unicodedata.normalize("NFKC", clean_text(value)).casefold()
    value = value.strip(_EDGE_PUNCT)
    for article in ("the ", "a ", "an "):
        if value.startswith(article) and len(value) > len(article):
            value = value[len(article) :]
            break
    return _WS_RE.sub(" ", value).strip(_EDGE_PUNCT)


@dataclass(frozen=True)
class Claim:
    """One source asserting (subject, relation, object)."""

    subject: str
    relation: str
    object: str
    source_id: str
    url: str  # where it was read (entry link, feed URL or file location)
    observed_at: datetime  # when the source says it was true (never later than fetch time)
    ref: str = ""  # the entry id / JSONL line id: distinguishes restatements from re-reads
    flags: tuple[str, ...] = ()  # e.g. ("malformed",): the source's feed was bozo, trust drops
    content_hash: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(
            canonical_json(
                {
                    "source": self.source_id,
                    "subject": self.subject,
                    "relation": self.relation,
                    "object": self.object,
                    "ref": self.ref,
                }
            ).encode()
        ).hexdigest()
        object.__setattr__(self, "content_hash", digest)

    @property
    def subject_key(self) -> str:
        return normalize_text(self.subject)

    @property
    def key(self) -> tuple[str, str]:
        """What a fact is about: normalised subject and relation."""
        return (self.subject_key, self.relation)
