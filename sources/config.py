"""What a source is, as a policy file declares it: the config schemas the sources read.

`SourcePolicy` (one trusted source: kind, location, trust, relations, limits, signing keys,
extraction patterns, watched Wikidata items), `FetchLimits` and `NetworkPolicy` (what one
fetch may do). They are strict frozen models (`kmd.common.config`); the policy
(`kmd.daemon.policy`) is made of them plus what the daemon does with the facts.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kmd.common.config import Duration, StrictModel, located
from kmd.sources.extraction import PatternError, compile_pattern

__all__ = [
    "ExtractionPattern",
    "FetchLimits",
    "NetworkPolicy",
    "RateLimit",
    "SourcePolicy",
    "TRUST_LEVELS",
    "Trust",
    "WikidataWatch",
    "check_name",
]

Trust = Literal["low", "medium", "high"]
# Ordered weakest first; index comparisons decide "at least this trusted".
TRUST_LEVELS: tuple[str, ...] = ("low", "medium", "high")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{what} {value!r} must be 1-64 characters of lowercase letters, digits, '_', '.', '-'"
        )
    return value


class RateLimit(StrictModel):
    """At most `max_claims` claims from one source are admitted to verification per `per`."""

    max_claims: int = Field(gt=0)
    per: Duration = 3600.0


class NetworkPolicy(StrictModel):
    """Network exceptions for one source.

    By default a source may only reach globally routable addresses. Listing a network here
    (CIDR, e.g. "127.0.0.0/8" for tests, "10.1.2.0/24" for an intranet mirror) allows it for
    this source only.
    """

    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @field_validator("allow_networks", mode="before")
    @classmethod
    def _parse_networks(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple):
            return value
        try:
            return tuple(ipaddress.ip_network(str(v), strict=True) for v in value)
        except ValueError as exc:
            raise ValueError(f"not a network in CIDR form: {exc}") from None


class FetchLimits(StrictModel):
    """Limits on one fetch. The global `fetch:` section is the default; a source may override."""

    connect_timeout: Duration = 5.0
    read_timeout: Duration = 10.0
    total_timeout: Duration = 30.0  # whole fetch incl. redirects: stops slow-drip bodies
    max_bytes: int = Field(default=2_000_000, gt=0)  # decoded body; the read stops past it
    max_entries: int = Field(default=500, gt=0)  # entries looked at per fetch, newest first
    max_field_chars: int = Field(default=2_000, gt=0)  # per text field taken from an entry
    max_redirects: int = Field(default=3, ge=0)
    user_agent: str = "kmd-intake/0.1"


class ExtractionPattern(StrictModel):
    """A regular expression (RE2) over one entry field whose named groups give subject and
    object (`kmd.sources.extraction`)."""

    field: Literal["title", "summary", "content"] = "title"
    pattern: str
    relation: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            compile_pattern(value)
        except PatternError as exc:
            raise ValueError(str(exc)) from None
        return value


_ENTITY_RE = re.compile(r"^Q[1-9][0-9]{0,11}$")
_PROPERTY_RE = re.compile(r"^P[1-9][0-9]{0,11}$")
_LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{2,8}){0,3}$")
_CONTACT_RE = re.compile(r"^[\x21-\x7e][\x20-\x7e]{2,199}$")  # printable ASCII: it goes into a header


class WikidataWatch(StrictModel):
    """What a `wikidata` source reads (`kmd.sources.wikidata`): items, and per property the
    relation its current value states."""

    entities: tuple[str, ...] = Field(min_length=1, max_length=10_000)  # item ids: Q95, Q90...
    properties: dict[str, str] = Field(min_length=1, max_length=100)  # P169: ceo, P36: capital...
    language: str = "en"  # labels in this language (else 'mul', else English, saying so)
    # Who runs this kmd (an email address or a URL): Wikimedia's User-Agent policy asks every
    # client to say how to reach its operator, and blocks clients that do not.
    contact: str
    maxlag: int = Field(default=5, ge=1, le=60)  # seconds of replica lag at which the API says "later"
    max_retries: int = Field(default=3, ge=0, le=10)  # per request, after maxlag, 429 or 503

    @field_validator("entities")
    @classmethod
    def _entities_ok(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [e for e in value if not _ENTITY_RE.match(e)]
        if bad:
            raise ValueError(f"not Wikidata item ids (Q followed by digits): {bad[:5]}")
        if len(set(value)) != len(value):
            raise ValueError(f"listed twice: {sorted({e for e in value if value.count(e) > 1})[:5]}")
        return value

    @field_validator("properties")
    @classmethod
    def _properties_ok(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [p for p in value if not _PROPERTY_RE.match(p)]
        if bad:
            raise ValueError(f"not Wikidata property ids (P followed by digits): {bad[:5]}")
        return value

    @field_validator("language")
    @classmethod
    def _language_ok(cls, value: str) -> str:
        if not _LANGUAGE_RE.match(value):
            raise ValueError(f"{value!r} is not a language code such as en, de or pt-br")
        return value

    @field_validator("contact")
    @classmethod
    def _contact_ok(cls, value: str) -> str:
        if not _CONTACT_RE.match(value):
            raise ValueError("contact: 3-200 printable ASCII characters (an email address or a URL)")
        return value


def _decode_public_key(value: str) -> bytes:
    raw = value.removeprefix("ed25519:")
    try:
        key = base64.b64decode(raw, validate=True)
    except ValueError:
        raise ValueError("signing key must be base64 (optionally prefixed 'ed25519:')") from None
    if len(key) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, this one is {len(key)}")
    return key


class SourcePolicy(StrictModel):
    """One trusted source of facts.

    Kinds: `feed` (RSS/Atom), `jsonl` (a curated file), `wikidata` (a Wikibase API: the
    current values of watched items' properties), `api` (facts people or programs submit
    through `POST /v1/facts`: not polled, no location; its facts wait for a person's approval
    unless `needs_approval: false`).
    """

    id: str
    kind: Literal["feed", "jsonl", "wikidata", "api"]
    # feed: http(s) URL; jsonl: a local path or an http(s) URL; wikidata: the API endpoint
    # (https://www.wikidata.org/w/api.php); api: none
    location: str = ""
    trust: Trust
    # Sources in the same group count once towards a quorum (two feeds of one publisher
    # are not independent). Defaults to the source id. Sources on one registrable domain
    # or host, or delivering entries with the same content, also count once unless each lists the
    # other under `independent_of`.
    group: str | None = None
    independent_of: tuple[str, ...] = ()
    # Facts backed by this source wait (`quarantined`) until a person approves them.
    # Default: yes for `api` sources, no for the others.
    needs_approval: bool | None = None
    relations: tuple[str, ...] = Field(min_length=1)  # relations this source may assert
    poll_interval: Duration = 900.0
    rate_limit: RateLimit = RateLimit(max_claims=1000, per=3600.0)
    on_malformed: Literal["reject", "downweight"] = "reject"  # bozo feeds / bad JSONL lines
    network: NetworkPolicy = NetworkPolicy()
    limits: FetchLimits | None = None  # None: the policy's `fetch:` section
    extract: tuple[ExtractionPattern, ...] = ()  # feeds only
    wikidata: WikidataWatch | None = None  # wikidata only
    signing_keys: tuple[str, ...] = ()  # jsonl only: pinned Ed25519 public keys, base64
    require_signature: bool = False
    signature_location: str | None = None  # default: location + ".sig"

    @field_validator("id")
    @classmethod
    def _id_ok(cls, value: str) -> str:
        return check_name(value, "source id")

    @field_validator("signing_keys")
    @classmethod
    def _keys_ok(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for key in value:
            _decode_public_key(key)
        return value

    @model_validator(mode="after")
    def _kind_rules(self) -> SourcePolicy:
        if self.kind == "api":
            if self.location:
                raise located("location", "an api source has no location (facts arrive through POST /v1/facts)")
            if self.signing_keys or self.require_signature or self.signature_location or self.extract:
                raise located("kind", "signatures and extraction patterns do not apply to api sources")
        if (self.kind == "wikidata") != (self.wikidata is not None):
            raise located("wikidata", "a wikidata source needs a wikidata: section (entities, properties, contact)"
                          if self.kind == "wikidata" else "the wikidata: section applies to wikidata sources only")
        if self.kind == "api":
            return self
        if not self.location:
            raise located("location", f"a {self.kind} source needs a location")
        if self.kind in ("feed", "wikidata"):
            if not self.location.startswith(("http://", "https://")):
                raise located("location", f"a {self.kind} location must be an http:// or https:// URL")
            if self.signing_keys or self.require_signature or self.signature_location:
                raise located("require_signature", "signatures apply to jsonl sources only")
            if self.kind == "wikidata" and self.extract:
                raise located("extract", "extraction patterns apply to feed sources only")
        else:
            if self.extract:
                raise located("extract", "extraction patterns apply to feed sources only")
            if self.require_signature and not self.signing_keys:
                raise located("signing_keys", "require_signature needs at least one pinned key")
        return self

    @property
    def independence_group(self) -> str:
        return self.group or self.id

    @property
    def requires_approval(self) -> bool:
        return self.needs_approval if self.needs_approval is not None else self.kind == "api"

    @property
    def public_keys(self) -> tuple[bytes, ...]:
        return tuple(_decode_public_key(k) for k in self.signing_keys)
