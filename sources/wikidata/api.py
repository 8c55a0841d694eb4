"""The Wikibase API as a `wikidata` source uses it: `wbgetentities`, politely, under limits.

Every request goes through the source's `Fetcher` (SSRF checks on every hop, size and time
limits) and follows Wikimedia's API etiquette:

- at most 50 ids a request (the API's limit for ordinary clients);
- a descriptive User-Agent with the operator's contact (built by the source);
- `maxlag`: when the database replicas lag, the API answers an error instead of data; so
  do 429 (too many requests) and 503. kmd waits (Retry-After when the server gives one,
  else the lag, else an exponential backoff; never more than `MAX_WAIT` seconds at a
  time) and tries again, at most `max_retries` times, then gives up until the next poll.

Responses are untrusted: they are size-capped by the fetcher, parsed as JSON and validated
(`Entity`); an entity that does not validate is reported and skipped, never half-read. A
batch too large for `max_bytes` is split in halves until it fits, so one large entity
costs only itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from loguru import logger
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from kmd.sources.config import FetchLimits, NetworkPolicy
from kmd.sources.net import Fetcher, FetchError, HttpStatusError, TooLarge

__all__ = ["MAX_IDS", "MAX_WAIT", "Entity", "Snak", "Statement", "WikibaseClient", "WikibaseError"]

MAX_IDS = 50
MAX_WAIT = 60.0  # seconds, per wait
_RETRY_STATUSES = (429, 503)


class WikibaseError(Exception):
    """A request that gave nothing usable, after any retries; the message says why."""


class _Lenient(BaseModel):
    # Wikibase adds fields over time; only the ones read here are checked.
    model_config = ConfigDict(extra="ignore", frozen=True)


class DataValue(_Lenient):
    type: str
    value: Any


class Snak(_Lenient):
    snaktype: Literal["value", "somevalue", "novalue"]
    property: str
    datavalue: DataValue | None = None


def _empty_map(value: Any) -> Any:
    """Wikibase writes an empty map as `[]` (PHP's empty array) in places."""
    return {} if value == [] else value


class Statement(_Lenient):
    id: str = Field(min_length=1, max_length=200)
    rank: Literal["preferred", "normal", "deprecated"]
    mainsnak: Snak
    qualifiers: Annotated[dict[str, list[Snak]], BeforeValidator(_empty_map)] = Field(default_factory=dict)


class Label(_Lenient):
    language: str
    value: str


class Redirect(_Lenient):
    to: str
    from_: str = Field(alias="from")


class Entity(_Lenient):
    """One entity of a `wbgetentities` answer (the documented JSON format), as far as kmd reads it."""

    id: str
    missing: str | None = None  # present (empty) when the entity does not exist
    lastrevid: int | None = None
    modified: datetime | None = None
    redirects: Redirect | None = None  # the requested id was merged into `id`
    labels: Annotated[dict[str, Label], BeforeValidator(_empty_map)] = Field(default_factory=dict)
    claims: Annotated[dict[str, list[Statement]], BeforeValidator(_empty_map)] = Field(default_factory=dict)

    @property
    def requested_id(self) -> str:
        return self.redirects.from_ if self.redirects else self.id


class WikibaseClient:
    """`wbgetentities` through a `Fetcher`, with batching, backoff and validation."""

    def __init__(
        self,
        endpoint: str,
        fetcher: Fetcher,
        limits: FetchLimits,
        network: NetworkPolicy,
        *,
        maxlag: int = 5,
        max_retries: int = 3,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.endpoint = endpoint
        self._fetcher = fetcher
        self._limits = limits
        self._network = network
        self._maxlag = maxlag
        self._max_retries = max_retries
        self._sleep = sleep

    def entities(self, ids: Sequence[str], props: Sequence[str], *, languages: Sequence[str] = (),
                 keep_claims: Sequence[str] = ()) -> tuple[dict[str, Entity], dict[str, str]]:  # fmt: skip
        """The entities for `ids`, keyed by the id asked for (a merged one is answered by the
        entity it now redirects to), and {id: why} for those that could not be read.

        `keep_claims`: the properties whose statements are validated and kept (the others
        are dropped unread).
        """
        found: dict[str, Entity] = {}
        failed: dict[str, str] = {}
        pending = [list(ids[i : i + MAX_IDS]) for i in range(0, len(ids), MAX_IDS)]
        while pending:
            batch = pending.pop(0)
            try:
                payload = self._get({"ids": "|".join(batch), "props": "|".join(props),
                                     **({"languages": "|".join(languages)} if languages else {})})  # fmt: skip
            except TooLarge as exc:
                if len(batch) > 1:  # one large entity costs only itself
                    half = len(batch) // 2
                    pending[:0] = [batch[:half], batch[half:]]
                    continue
                failed[batch[0]] = f"{exc} (raise limits.max_bytes to read it)"
                continue
            except WikibaseError as exc:
                failed.update({i: str(exc) for i in batch})
                continue
            got, bad = _entities(payload, batch, keep_claims)
            found.update(got)
            failed.update(bad)
        return found, failed

    def _get(self, params: Mapping[str, str]) -> dict[str, Any]:
        query = {"action": "wbgetentities", "format": "json", "maxlag": str(self._maxlag), **params}
        url = f"{self.endpoint}?{urlencode(query, safe='|')}"
        attempt = 0
        while True:
            try:
                payload = _json(self._fetcher.fetch(url, limits=self._limits, network=self._network).body)
            except HttpStatusError as exc:
                if exc.status not in _RETRY_STATUSES:
                    raise WikibaseError(str(exc)) from None
                # Retry-After when the server gives one, else an exponential backoff.
                why = f"HTTP {exc.status}"
                delay = max(1.0, exc.retry_after) if exc.retry_after is not None else 5.0 * 2**attempt
            except TooLarge:
                raise
            except FetchError as exc:
                raise WikibaseError(str(exc)) from None
            else:
                error = payload.get("error")
                if not isinstance(error, Mapping):
                    return payload
                code, info = str(error.get("code", "?"))[:64], str(error.get("info", ""))[:300]
                if code != "maxlag":
                    raise WikibaseError(f"API error {code}: {info}")
                # Wikimedia asks for a pause of at least 5 s after a lag error.
                lag = error.get("lag")
                why = f"maxlag ({info})"
                delay = max(5.0, float(lag)) if isinstance(lag, int | float) else 5.0 * 2**attempt
            if attempt >= self._max_retries:
                raise WikibaseError(f"{why}; gave up after {attempt + 1} tries (the next poll tries again)")
            delay = min(MAX_WAIT, delay)
            logger.info("wikidata {}: {}; waiting {:g}s before try {}", self.endpoint, why, delay, attempt + 2)
            self._sleep(delay)
            attempt += 1


def _json(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise WikibaseError(f"answer is not JSON: {str(exc)[:200]}") from None
    if not isinstance(payload, dict):
        raise WikibaseError("answer is not a JSON object")
    return payload


def _entities(payload: Mapping[str, Any], asked: Sequence[str],
              keep_claims: Sequence[str]) -> tuple[dict[str, Entity], dict[str, str]]:  # fmt: skip
    """Validate the entities of one answer; {asked id: entity}, {asked id: why not}."""
    raw = payload.get("entities")
    if not isinstance(raw, Mapping):
        reason = "answer has no 'entities' object"
        return {}, {i: reason for i in asked}
    found: dict[str, Entity] = {}
    bad: dict[str, str] = {}  # answer key -> why it was not read
    keep = set(keep_claims)
    for key, doc in raw.items():
        if not isinstance(doc, Mapping):
            bad[str(key)[:32]] = "entity is not a JSON object"
            continue
        claims = doc.get("claims")
        if isinstance(claims, Mapping):  # the other properties' statements are not read at all
            doc = {**doc, "claims": {p: s for p, s in claims.items() if p in keep}}
        try:
            entity = Entity.model_validate(doc)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            bad[str(key)[:32]] = f"entity does not validate: {where}: {first['msg']}"
            continue
        if entity.requested_id in asked:  # an answer about ids nobody asked for is not used
            found[entity.requested_id] = entity
    unattributed = "; ".join(why for key, why in bad.items() if key not in asked)
    failed = {i: bad.get(i) or unattributed or "not in the answer" for i in asked if i not in found}
    return found, failed
