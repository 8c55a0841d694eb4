"""The policy: which sources are trusted for what, how facts are verified and edited.

A policy is a YAML file validated against the frozen pydantic models below. The schema is
strict: unknown keys, bad values and duplicate keys are errors, and every error names the
file, the line and the key (pydantic error locations are mapped back onto the YAML node
marks). `load_policy(path)` is the only entry point the daemon needs; `Policy.version` and
`Policy.digest` are recorded with every claim and edit so a ledger entry can always be traced
to the exact policy text that allowed it.

The sources' own schemas (`SourcePolicy`, `FetchLimits`...) live with the sources
(`kmd.sources.config`); the YAML loader is `kmd.common.config`. The backend name is a free
string here; it is checked against the editor registry when the daemon starts, so this
module never imports the model side.
"""

from __future__ import annotations

import hashlib
import string
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from kmd.common.config import ConfigError, ConfigProblem, StrictModel, located, parse_yaml_model, read_config_bytes
from kmd.sources.config import TRUST_LEVELS, FetchLimits, SourcePolicy, check_name

# The policy's own names for the shared config errors (a policy is one strict config file).
PolicyError = ConfigError
PolicyProblem = ConfigProblem

__all__ = [
    "PolicyError",
    "PolicyProblem",
    "Policy",
    "ProbePolicy",
    "RelationTemplate",
    "TRUST_LEVELS",
    "VerificationPolicy",
    "example_policy_path",
    "load_policy",
    "parse_policy",
]


class RelationTemplate(StrictModel):
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


class VerificationPolicy(StrictModel):
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


class ProbePolicy(StrictModel):
    """Thresholds the maintenance loop applies after each edit (names follow docs/protocol.md)."""

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
    # Same-subject questions: the prompts of up to this many of the policy's other relations,
    # asked about the edit's subject (plain, and as a chat turn when served so). Their answers
    # before the edit are recorded when it is applied; an edit that answers one of them with
    # its own target (a hijack: the answer before did not hold it) is reverted. 0: not asked.
    same_subject_questions: int = Field(default=4, ge=0, le=16)
    # Locality prompts: kmd's shipped suite (several hundred varied prompts) plus your own
    # JSONL files ({"prompt": ...} per line; relative paths are relative to the policy file).
    default_locality_suite: bool = True
    locality_suites: tuple[str, ...] = ()


class Policy(StrictModel):
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
            check_name(name, "relation name")
        return value

    @model_validator(mode="after")
    def _references(self) -> Policy:
        seen: set[str] = set()
        for i, src in enumerate(self.sources):
            if src.id in seen:
                raise located(("sources", i, "id"), f"duplicate source id {src.id!r}")
            seen.add(src.id)
            for j, rel in enumerate(src.relations):
                if rel not in self.relations:
                    raise located(("sources", i, "relations", j), f"unknown relation {rel!r}; define it under relations:")
            for j, other in enumerate(src.independent_of):
                if other != "*" and (other == src.id or other not in {s.id for s in self.sources}):
                    raise located(("sources", i, "independent_of", j), f"{other!r} is not another source of this policy")
            for j, pat in enumerate(src.extract):
                if pat.relation not in src.relations:
                    raise located(
                        ("sources", i, "extract", j, "relation"),
                        f"relation {pat.relation!r} is not in this source's relations",
                    )
            for prop, rel in (src.wikidata.properties.items() if src.wikidata else ()):
                if rel not in src.relations:
                    raise located(("sources", i, "wikidata", "properties", prop),
                                  f"relation {rel!r} is not in this source's relations")  # fmt: skip
        for j, rel in enumerate(self.verification.sensitive_relations):
            if rel not in self.relations:
                raise located(("verification", "sensitive_relations", j), f"unknown relation {rel!r}")
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


# -- loading ---------------------------------------------------------------------------------


def example_policy_path() -> Path:
    """The documented example policy shipped with the package."""
    from importlib.resources import files

    return Path(str(files("kmd.policies").joinpath("example.yaml")))


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; raises PolicyError naming file, line and key."""
    path = Path(path)
    return parse_policy(read_config_bytes(path, "policy"), name=str(path))


def parse_policy(text: str | bytes, name: str = "<policy>") -> Policy:
    """Validate policy YAML text. `name` is used in error messages."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    policy = parse_yaml_model(raw, Policy, name=name, what="policy")
    policy._path = name
    policy._digest = hashlib.sha256(raw).hexdigest()
    return policy
