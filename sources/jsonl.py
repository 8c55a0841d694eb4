"""Curated JSONL files: one fact per line, strict schema, optional Ed25519 signature.

File format (UTF-8, one JSON object per line, blank lines ignored):

    {"kmd_jsonl": 1, "source": "curated", "sequence": 42, "created": "2024-05-01T12:00:00Z"}
    {"subject": "France", "relation": "capital", "object": "Paris"}
    {"subject": "Acme", "relation": "ceo", "object": "Jane Doe", "observed": "2024-04-30T00:00:00Z",
     "url": "https://acme.example/press/1", "id": "acme-ceo-2024"}

The first line is the header. `source` must be the source id in the policy (a file signed
for one source cannot be replayed as another) and `sequence` must grow with every new file:
a file whose sequence is lower than the last accepted one is refused as a replay, and one
that reuses the last sequence with different bytes is refused too. Because the signature
covers the header, an attacker cannot bump the sequence of an old signed file.

Invalid fact lines are reported with their line numbers and skipped; the valid lines of the
same file are kept. A bad header, a bad signature or too many facts refuse the whole file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from kmd.sources.base import PollResult
from kmd.sources.claims import Claim, clean_text, content_flag
from kmd.sources.config import FetchLimits, SourcePolicy
from kmd.sources.net import FetchError, Fetcher
from kmd.sources.signing import SignatureError, verify_detached

__all__ = ["JsonlFact", "JsonlHeader", "JsonlRefused", "JsonlSource", "ParsedJsonl", "parse_jsonl"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JsonlHeader(_Strict):
    kmd_jsonl: Literal[1]
    source: StrictStr
    sequence: StrictInt = Field(ge=0)
    created: datetime | None = None
    comment: StrictStr | None = None


class JsonlFact(_Strict):
    subject: StrictStr = Field(min_length=1)
    relation: StrictStr = Field(min_length=1)
    object: StrictStr = Field(min_length=1)
    observed: datetime | None = None
    url: StrictStr | None = None
    id: StrictStr | None = None


class JsonlRefused(Exception):
    """The whole file is refused (bad header, signature, replay, size)."""


@dataclass(frozen=True)
class ParsedJsonl:
    header: JsonlHeader
    claims: tuple[Claim, ...]
    problems: tuple[str, ...]  # "line N: ..." for every skipped line


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'line'}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
        for e in exc.errors(include_url=False)
    )


def parse_jsonl(data: bytes, source: SourcePolicy, limits: FetchLimits, *, location: str, now: datetime) -> ParsedJsonl:
    """Parse a curated file's bytes. Raises JsonlRefused for file-level problems only."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonlRefused(f"not UTF-8 ({exc})") from None
    lines = text.splitlines()
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise JsonlRefused("empty file: the header line is missing")
    header_no, header_line = numbered[0]
    try:
        header = JsonlHeader.model_validate_json(header_line)
    except ValidationError as exc:
        raise JsonlRefused(f"line {header_no}: bad header: {_errors(exc)}") from None
    if header.source != source.id:
        raise JsonlRefused(f"line {header_no}: header names source {header.source!r}, expected {source.id!r}")
    if len(numbered) - 1 > limits.max_entries:
        raise JsonlRefused(f"{len(numbered) - 1} facts exceed the cap of {limits.max_entries} (limits.max_entries)")

    claims: list[Claim] = []
    problems: list[str] = []
    for number, line in numbered[1:]:
        try:
            json.loads(line)  # a clearer message than pydantic's for broken JSON
        except ValueError as exc:
            problems.append(f"line {number}: not JSON: {exc}")
            continue
        try:
            fact = JsonlFact.model_validate_json(line)
        except ValidationError as exc:
            problems.append(f"line {number}: {_errors(exc)}")
            continue
        values = {k: clean_text(getattr(fact, k)) for k in ("subject", "relation", "object")}
        too_long = [k for k, v in values.items() if len(v) > limits.max_field_chars]
        empty = [k for k, v in values.items() if not v]
        if too_long or empty:
            problems.append(f"line {number}: {', '.join(too_long + empty)}: empty or longer than {limits.max_field_chars}")
            continue
        observed = fact.observed or header.created or now
        observed = observed if observed.tzinfo else observed.replace(tzinfo=UTC)
        claims.append(
            Claim(
                subject=values["subject"],
                relation=values["relation"],
                object=values["object"],
                source_id=source.id,
                url=(fact.url or f"{location}#L{number}")[: limits.max_field_chars],
                observed_at=min(observed, now),  # a file cannot post-date its facts
                ref=fact.id or f"seq{header.sequence}:L{number}",
                # the same fact and url in two files make their sources one for quorum, however
                # the line is spaced, ordered or given another id
                flags=(content_flag(values["subject"], values["relation"], values["object"], link=fact.url or ""),),
            )
        )
    return ParsedJsonl(header, tuple(claims), tuple(problems))


class JsonlSource:
    """A `Source` for one curated JSONL file, local or over http(s)."""

    def __init__(self, policy: SourcePolicy, limits: FetchLimits, fetcher: Fetcher | None = None):
        if policy.kind != "jsonl":
            raise ValueError(f"source {policy.id!r} is not a jsonl source")
        self.policy = policy
        self.limits = limits
        self._fetcher = fetcher

    @property
    def id(self) -> str:
        return self.policy.id

    def _is_url(self, location: str) -> bool:
        return location.startswith(("http://", "https://"))

    def _read(self, location: str, *, etag: str | None = None) -> tuple[bytes | None, str | None]:
        """(bytes, etag); bytes is None when the server says not modified."""
        if self._is_url(location):
            if self._fetcher is None:
                raise JsonlRefused(f"{location}: no fetcher configured for URLs")
            result = self._fetcher.fetch(location, limits=self.limits, network=self.policy.network, etag=etag)
            return (None if result.not_modified else result.body), result.etag
        path = Path(location)
        with path.open("rb") as fh:  # read one byte past the cap to know it was exceeded
            data = fh.read(self.limits.max_bytes + 1)
        if len(data) > self.limits.max_bytes:
            raise JsonlRefused(f"{location}: larger than the {self.limits.max_bytes}-byte cap")
        return data, None

    def poll(self, cursor: Mapping[str, Any], now: datetime) -> PollResult:
        location = self.policy.location
        try:
            data, etag = self._read(location, etag=cursor.get("etag"))
        except FileNotFoundError:
            return self._refuse(cursor, f"{location}: no such file")
        except (OSError, FetchError, JsonlRefused) as exc:
            return self._refuse(cursor, str(exc))
        if data is None:
            return PollResult(self.id, cursor=dict(cursor), not_modified=True)
        digest = hashlib.sha256(data).hexdigest()
        if digest == cursor.get("digest"):
            return PollResult(self.id, cursor=dict(cursor), not_modified=True)

        try:
            self._check_signature(data)
            parsed = parse_jsonl(data, self.policy, self.limits, location=location, now=now)
        except (JsonlRefused, SignatureError) as exc:
            return self._refuse(cursor, f"{location}: {exc}")
        last = cursor.get("sequence")
        seq = parsed.header.sequence
        if last is not None and seq < last:
            return self._refuse(cursor, f"{location}: sequence {seq} is older than the last accepted {last}: replay refused")
        if last is not None and seq == last:
            return self._refuse(cursor, f"{location}: sequence {seq} reused with different content: refused")
        for problem in parsed.problems:
            logger.warning("source {}: {}", self.id, problem)
        new_cursor = {"sequence": seq, "digest": digest, "etag": etag}
        return PollResult(self.id, parsed.claims, parsed.problems, new_cursor)

    def _check_signature(self, data: bytes) -> None:
        keys = self.policy.public_keys
        if not keys:
            return
        sig_location = self.policy.signature_location or f"{self.policy.location}.sig"
        try:
            signature, _ = self._read(sig_location)
        except (FileNotFoundError, FetchError):
            signature = None
        if signature is None:
            if self.policy.require_signature:
                raise SignatureError("unsigned file refused: the policy requires a signature")
            return
        # A signature that is present is always checked, required or not.
        index = verify_detached(data, signature, keys)
        logger.debug("source {}: signature valid (pinned key #{})", self.id, index)

    def _refuse(self, cursor: Mapping[str, Any], message: str) -> PollResult:
        logger.warning("source {}: file refused: {}", self.id, message)
        return PollResult(self.id, problems=(message,), cursor=dict(cursor), refused=True)
