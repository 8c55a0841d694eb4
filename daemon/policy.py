"""The policy: which sources are trusted for what, how facts are verified and edited.

A policy is a YAML file validated against the frozen pydantic models below. The schema is
strict: unknown keys, bad values and duplicate keys are errors, and every error names the
file, the line and the key (pydantic error locations are mapped back onto the YAML node
marks). `load_policy(path)` is the only entry point the daemon needs; `Policy.version` and
`Policy.digest` are recorded with every claim and edit so a ledger entry can always be traced
to the exact policy text that allowed it.

The backend name is a free string here; it is checked against the editor registry when the
daemon starts, so this module never imports the model side.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "ConfigError",
    "Duration",
    "ExtractionPattern",
    "FetchLimits",
    "NetworkPolicy",
    "Policy",
    "PolicyError",
    "PolicyProblem",
    "ProbePolicy",
    "RateLimit",
    "RelationTemplate",
    "SourcePolicy",
    "TRUST_LEVELS",
    "Trust",
    "VerificationPolicy",
    "StrictModel",
    "example_policy_path",
    "load_policy",
    "load_yaml_model",
    "parse_policy",
    "parse_yaml_model",
]

Trust = Literal["low", "medium", "high"]
# Ordered weakest first; index comparisons decide "at least this trusted".
TRUST_LEVELS: tuple[str, ...] = ("low", "medium", "high")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as "30s", "15m", "1h", "1d"."""
    if isinstance(value, bool):  # bool is an int subclass; "true" is never a duration
        raise PydanticCustomError("duration", "expected a duration such as 30s, 15m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise PydanticCustomError("duration", "expected a duration such as 30s, 15m or 1h")
    if seconds <= 0:
        raise PydanticCustomError("duration", "a duration must be positive")
    return seconds


Duration = Annotated[float, BeforeValidator(_parse_duration)]


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{what} {value!r} must be 1-64 characters of lowercase letters, digits, '_', '.', '-'"
        )
    return value


class _Strict(BaseModel):
    """Base of every config model: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


StrictModel = _Strict  # the public name for other config files (daemon settings)


class RateLimit(_Strict):
    """At most `max_claims` claims from one source are admitted to verification per `per`."""

    max_claims: int = Field(gt=0)
    per: Duration = 3600.0


class NetworkPolicy(_Strict):
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


class FetchLimits(_Strict):
    """Limits on one fetch. The global `fetch:` section is the default; a source may override."""

    connect_timeout: Duration = 5.0
    read_timeout: Duration = 10.0
    total_timeout: Duration = 30.0  # whole fetch incl. redirects: stops slow-drip bodies
    max_bytes: int = Field(default=2_000_000, gt=0)  # decoded body; the read stops past it
    max_entries: int = Field(default=500, gt=0)  # entries looked at per fetch, newest first
    max_field_chars: int = Field(default=2_000, gt=0)  # per text field taken from an entry
    max_redirects: int = Field(default=3, ge=0)
    user_agent: str = "kmd-intake/0.1"


class ExtractionPattern(_Strict):
    """A regular expression over one entry field whose named groups give subject and object."""

    field: Literal["title", "summary", "content"] = "title"
    pattern: str
    relation: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
        missing = {"subject", "object"} - set(compiled.groupindex)
        if missing:
            raise ValueError(f"pattern needs named groups (?P<subject>...) and (?P<object>...); missing {sorted(missing)}")
        return value

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)  # re caches compiled patterns


def _decode_public_key(value: str) -> bytes:
    raw = value.removeprefix("ed25519:")
    try:
        key = base64.b64decode(raw, validate=True)
    except ValueError:
        raise ValueError("signing key must be base64 (optionally prefixed 'ed25519:')") from None
    if len(key) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, this one is {len(key)}")
    return key


class SourcePolicy(_Strict):
    """One trusted source of facts.

    Kinds: `feed` (RSS/Atom), `jsonl` (a curated file), `api` (facts people or programs
    submit through `POST /v1/facts`: not polled, no location; its facts wait for a person's
    approval unless `needs_approval: false`).
    """

    id: str
    kind: Literal["feed", "jsonl", "api"]
    location: str = ""  # feed: http(s) URL; jsonl: a local path or an http(s) URL; api: none
    trust: Trust
    # Sources in the same group count once towards a quorum (two feeds of one publisher
    # are not independent). Defaults to the source id. Sources on one registrable domain
    # or host, or delivering byte-identical entries, also count once unless each lists the
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
    signing_keys: tuple[str, ...] = ()  # jsonl only: pinned Ed25519 public keys, base64
    require_signature: bool = False
    signature_location: str | None = None  # default: location + ".sig"

    @field_validator("id")
    @classmethod
    def _id_ok(cls, value: str) -> str:
        return _check_name(value, "source id")

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
                raise _located("location", "an api source has no location (facts arrive through POST /v1/facts)")
            if self.signing_keys or self.require_signature or self.signature_location or self.extract:
                raise _located("kind", "signatures and extraction patterns do not apply to api sources")
            return self
        if not self.location:
            raise _located("location", f"a {self.kind} source needs a location")
        if self.kind == "feed":
            if not self.location.startswith(("http://", "https://")):
                raise _located("location", "a feed location must be an http:// or https:// URL")
            if self.signing_keys or self.require_signature or self.signature_location:
                raise _located("require_signature", "signatures apply to jsonl sources only")
        else:
            if self.extract:
                raise _located("extract", "extraction patterns apply to feed sources only")
            if self.require_signature and not self.signing_keys:
                raise _located("signing_keys", "require_signature needs at least one pinned key")
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


class RelationTemplate(_Strict):
    """How a (subject, relation, object) fact becomes an edit request.

    `prompt` is text whose continuation should be the object, with `{subject}` where the
    subject goes (the only placeholder allowed). `paraphrases` are other prompts with the same
    answer, used to probe that the edit generalises.
    """

    prompt: str
    paraphrases: tuple[str, ...] = ()
    description: str = ""
    # Backend hyperparameter overrides for this relation's edits (e.g. more optimisation
    # steps for long answers). Unknown options are refused when the edit is applied.
    editor_options: dict[str, float | int | bool | str] = Field(default_factory=dict)

    @field_validator("prompt", "paraphrases")
    @classmethod
    def _template_ok(cls, value: Any) -> Any:
        for template in (value,) if isinstance(value, str) else value:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
            if fields != ["subject"]:
                raise ValueError(f"template {template!r} must contain '{{subject}}' exactly once and no other field")
        return value


class VerificationPolicy(_Strict):
    """When claims become verified facts."""

    quorum: int = Field(default=2, gt=0)  # independent source groups that must agree
    # A single source at least this trusted suffices on its own; null: always need quorum.
    # A single low-trust source never suffices, whatever the policy says.
    single_source_trust: Literal["medium", "high"] | None = "high"
    similarity_threshold: float = Field(default=0.85, gt=0.0, le=1.0)  # cosine, MiniLM
    sensitive_relations: tuple[str, ...] = ()  # quarantined until a person approves
    # A claim still short of quorum this many days after it was ingested is rejected as
    # expired: a lone stale claim must not complete a quorum with one from months later,
    # and the pending set stays bounded. null: claims wait for ever.
    pending_max_age_days: float | None = Field(default=90.0, gt=0)


class ProbePolicy(_Strict):
    """Thresholds the maintenance loop applies after each edit (names follow PROTOCOL.md)."""

    # Served answers (what users read, editors/answers.py): greedy answers to the edit prompt
    # and its paraphrases, plain and (with a chat template) as a chat turn; an answer is
    # correct when its first line holds the target and the continuation is not degenerate.
    served_answers: bool = True  # false: judge the edit by teacher-forced accuracy only
    min_served_rel: float = Field(default=1.0, ge=0.0, le=1.0)  # edit prompt: fraction of forms correct
    min_served_gen: float = Field(default=0.5, ge=0.0, le=1.0)  # paraphrases: fraction of answers correct
    min_rel: float = Field(default=0.9, ge=0.0, le=1.0)  # teacher-forced, the edit's own prompt
    min_gen: float = Field(default=0.5, ge=0.0, le=1.0)  # teacher-forced, its paraphrases
    min_loc: float = Field(default=0.98, ge=0.0, le=1.0)  # locality prompts whose greedy continuation is unchanged
    earlier_edits_sample: int = Field(default=20, ge=0)  # earlier edits re-checked per edit
    min_earlier_rel: float = Field(default=0.9, ge=0.0, le=1.0)
    # Locality prompts: kmd's shipped suite (several hundred varied prompts) plus your own
    # JSONL files ({"prompt": ...} per line; relative paths are relative to the policy file).
    default_locality_suite: bool = True
    locality_suites: tuple[str, ...] = ()


class Policy(_Strict):
    """A whole policy file. Build it with `load_policy` / `parse_policy`."""

    version: str = Field(min_length=1)  # a human label; the digest pins the exact text
    backend: str = Field(min_length=1)  # editor backend name, checked against the registry
    relations: dict[str, RelationTemplate] = Field(min_length=1)
    sources: tuple[SourcePolicy, ...] = Field(min_length=1)
    verification: VerificationPolicy = VerificationPolicy()
    probes: ProbePolicy = ProbePolicy()
    fetch: FetchLimits = FetchLimits()

    _path: str = PrivateAttr(default="<memory>")
    _digest: str = PrivateAttr(default="")
    _by_id: dict[Any, Any] = PrivateAttr(default_factory=dict)  # None -> the sources it indexes

    @field_validator("relations")
    @classmethod
    def _relation_names(cls, value: dict[str, RelationTemplate]) -> dict[str, RelationTemplate]:
        for name in value:
            _check_name(name, "relation name")
        return value

    @model_validator(mode="after")
    def _references(self) -> Policy:
        seen: set[str] = set()
        for i, src in enumerate(self.sources):
            if src.id in seen:
                raise _located(("sources", i, "id"), f"duplicate source id {src.id!r}")
            seen.add(src.id)
            for j, rel in enumerate(src.relations):
                if rel not in self.relations:
                    raise _located(("sources", i, "relations", j), f"unknown relation {rel!r}; define it under relations:")
            for j, other in enumerate(src.independent_of):
                if other != "*" and (other == src.id or other not in {s.id for s in self.sources}):
                    raise _located(("sources", i, "independent_of", j), f"{other!r} is not another source of this policy")
            for j, pat in enumerate(src.extract):
                if pat.relation not in src.relations:
                    raise _located(
                        ("sources", i, "extract", j, "relation"),
                        f"relation {pat.relation!r} is not in this source's relations",
                    )
        for j, rel in enumerate(self.verification.sensitive_relations):
            if rel not in self.relations:
                raise _located(("verification", "sensitive_relations", j), f"unknown relation {rel!r}")
        return self

    # -- conveniences ------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._path

    @property
    def digest(self) -> str:
        """sha256 of the policy file's bytes (of its canonical JSON when built in memory)."""
        if not self._digest:
            self._digest = hashlib.sha256(self.model_dump_json().encode()).hexdigest()
        return self._digest

    @property
    def version_tag(self) -> str:
        """What the ledger records: the human label plus the start of the digest."""
        return f"{self.version}@{self.digest[:12]}"

    def source(self, source_id: str) -> SourcePolicy:
        index = self._by_id
        if index.get(None) is not self.sources:  # built on first use (the verifier asks per claim),
            index = {None: self.sources, **{src.id: src for src in self.sources}}  # again after model_copy
            self._by_id = index
        try:
            return index[source_id]
        except KeyError:
            raise KeyError(f"no source {source_id!r} in policy {self.path}") from None

    def relation(self, name: str) -> RelationTemplate:
        try:
            return self.relations[name]
        except KeyError:
            raise KeyError(f"no relation {name!r} in policy {self.path}") from None

    def is_sensitive(self, relation: str) -> bool:
        return relation in self.verification.sensitive_relations

    def declared_independent(self, a: str, b: str) -> bool:
        """The policy marks the two sources independent: either lists the other under
        `independent_of`, or lists "*" (independent of every other source, e.g. several
        publishers' feeds behind one aggregator host)."""
        try:
            sa, sb = self.source(a), self.source(b)
        except KeyError:
            return False
        return bool({b, "*"} & set(sa.independent_of) or {a, "*"} & set(sb.independent_of))

    def api_source(self, source_id: str | None = None) -> SourcePolicy:
        """The `api` source a submission through the API is recorded under.

        Raises `PermissionError` when the policy declares none, when `source_id` names a
        source of another kind (a submission never borrows a feed's or a signed file's
        identity), or when several api sources exist and none is named."""
        api = [s for s in self.sources if s.kind == "api"]
        if source_id is not None:
            try:
                source = self.source(source_id)
            except KeyError:
                raise PermissionError(f"source {source_id!r} is not in the policy") from None
            if source.kind != "api":
                raise PermissionError(f"source {source_id!r} is a {source.kind} source; facts submitted through the "
                                      "API are recorded under an api source of the policy")  # fmt: skip
            return source
        if not api:
            raise PermissionError("the policy declares no api source: fact submissions through the API are disabled")
        if len(api) > 1:
            raise PermissionError(f"the policy has several api sources ({', '.join(s.id for s in api)}): name one in source_id")
        return api[0]

    def limits_for(self, source: SourcePolicy) -> FetchLimits:
        return source.limits or self.fetch


def _located(loc: str | tuple[str | int, ...], message: str) -> PydanticCustomError:
    """An error raised from a model validator that still knows which key it is about."""
    loc = (loc,) if isinstance(loc, str) else loc
    return PydanticCustomError("policy_rule", "{message}", {"message": message, "at": loc})


# -- loading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyProblem:
    file: str
    line: int | None  # 1-based
    key: str  # dotted path, e.g. sources[0].trust
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key or '<top level>'}: {self.message}"


class PolicyError(ValueError):
    """A policy (or other strict YAML config) file that cannot be used; `problems` lists
    every error found."""

    def __init__(self, problems: list[PolicyProblem], what: str = "policy"):
        self.problems = problems
        super().__init__(f"invalid {what}:\n  " + "\n  ".join(str(p) for p in problems))


ConfigError = PolicyError  # the public name when the file is not a policy


def example_policy_path() -> Path:
    """The documented example policy shipped with the package."""
    from importlib.resources import files

    return Path(str(files("kmd.policies").joinpath("example.yaml")))


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; raises PolicyError naming file, line and key."""
    path = Path(path)
    return parse_policy(_read(path, "policy"), name=str(path))


def parse_policy(text: str | bytes, name: str = "<policy>") -> Policy:
    """Validate policy YAML text. `name` is used in error messages."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    policy = parse_yaml_model(raw, Policy, name=name, what="policy")
    policy._path = name
    policy._digest = hashlib.sha256(raw).hexdigest()
    return policy


M = TypeVar("M", bound=BaseModel)


def load_yaml_model(path: str | Path, model: type[M]) -> M:
    """Any strict YAML config file (policy, daemon settings) validated against `model`,
    with errors naming file, line and key (raises PolicyError)."""
    path = Path(path)
    return parse_yaml_model(_read(path, "configuration"), model, name=str(path))


# A policy or settings file is a few kilobytes; these caps stop a hostile file from
# costing minutes of CPU or gigabytes of memory before it is even validated.
MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_DEPTH = 64  # nested mappings and lists


def _read(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as fh:  # read one byte past the cap to know it was exceeded
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise PolicyError([PolicyProblem(str(path), None, "", f"cannot read: {exc.strerror}")], what) from None
    _check_size(data, str(path), what)
    return data


def _check_size(raw: bytes, name: str, what: str) -> None:
    if len(raw) > MAX_CONFIG_BYTES:
        raise PolicyError([PolicyProblem(name, None, "", f"larger than the {MAX_CONFIG_BYTES}-byte cap for a {what} file")],
                          what)  # fmt: skip


def _check_events(source: str, name: str, what: str) -> None:
    """Refuse YAML aliases and deep nesting before anything is built from the text.

    An alias (`*name`) lets a few hundred bytes expand to billions of nodes (the "billion
    laughs"); a policy never needs one, so it is refused outright rather than capped.
    """
    depth = 0
    for event in yaml.parse(source, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            line = event.start_mark.line + 1 if event.start_mark else None
            raise PolicyError([PolicyProblem(name, line, "", f"YAML aliases are not allowed (*{event.anchor}); "
                                             "write the value out in full")], what)  # fmt: skip
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else None
                raise PolicyError([PolicyProblem(name, line, "", f"nested deeper than {MAX_CONFIG_DEPTH} levels")], what)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def parse_yaml_model(text: str | bytes, model: type[M], name: str = "<yaml>", what: str = "configuration") -> M:
    """Validate YAML text against a pydantic model; every problem is reported with its line."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    _check_size(raw, name, what)
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError([PolicyProblem(name, None, "", f"not UTF-8: {exc}")], what) from None
    try:
        _check_events(source, name, what)
        root = yaml.compose(source, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError([PolicyProblem(name, line, "", f"YAML syntax: {problem}")], what) from None
    if root is None:
        raise PolicyError([PolicyProblem(name, 1, "", "the file is empty")], what)
    duplicates = list(_duplicate_keys(root, ()))
    if duplicates:
        raise PolicyError([PolicyProblem(name, ln, _dotted(loc), "duplicate key") for loc, ln in duplicates], what)
    try:
        data = yaml.SafeLoader(source).get_single_data()
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:  # e.g. a bad !!timestamp or an unhashable key
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError([PolicyProblem(name, mark.line + 1 if mark else None, "", f"YAML value: {problem}")], what) from None
    if not isinstance(data, Mapping):
        raise PolicyError([PolicyProblem(name, 1, "", "the top level must be a mapping")], what)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        errors = exc.errors(include_url=False)
        # A list whose only items failed also reports "too short": noise, the item errors say it.
        failing = [tuple(e["loc"]) for e in errors]
        errors = [
            e for e in errors
            if not (e["type"] == "too_short" and any(len(f) > len(e["loc"]) and f[: len(e["loc"])] == tuple(e["loc"]) for f in failing))
        ]  # fmt: skip
        for err in errors:
            loc = tuple(err["loc"]) + tuple((err.get("ctx") or {}).get("at", ()))
            line, known = _line_for(root, loc)
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            elif "input" in err and not isinstance(err["input"], dict | list) and err["type"] != "missing":
                message += f" (got {err['input']!r})"
            problems.append(PolicyProblem(name, line, _dotted(known), message))
        raise PolicyError(problems, what) from None


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_for(root: yaml.Node, loc: tuple[Any, ...]) -> tuple[int, tuple[Any, ...]]:
    """Walk the YAML node tree along a pydantic error location.

    Returns the line of the deepest node reached and the part of `loc` that was reached,
    after dropping pydantic's type tags (e.g. 'function-after[...]') that are not keys.
    """
    node, line, known = root, root.start_mark.line + 1, []
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    node, line = value_node, key_node.start_mark.line + 1
                    known.append(part)
                    break
            else:
                if isinstance(part, str) and not _is_type_tag(part):
                    known.append(part)  # a missing or unknown key: name it, point at its parent
                    for key_node, _ in node.value:  # an unknown key: point at the key itself
                        if key_node.value == part:
                            line = key_node.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
            known.append(part)
        elif isinstance(part, str) and _is_type_tag(part):
            continue
        else:
            break
    return line, tuple(known)


def _is_type_tag(part: str) -> bool:
    return "[" in part or part in {"str", "int", "float", "bool", "list", "dict", "tuple"}


def _duplicate_keys(node: yaml.Node, loc: tuple[Any, ...]):
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list or mapping as a key: refused when the values are built
            key = key_node.value
            if key in seen:
                yield loc + (key,), key_node.start_mark.line + 1
            seen.add(key)
            yield from _duplicate_keys(value_node, loc + (key,))
    elif isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            yield from _duplicate_keys(child, loc + (i,))
