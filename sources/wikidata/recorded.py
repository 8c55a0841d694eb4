"""Recorded Wikibase answers: `wbgetentities` answered from saved entity documents.

The in-memory stand-in for the Wikidata API (the tests and `kmd demo` serve it on
loopback). `documents` is a `wbgetentities` answer in the documented JSON format
(`{"entities": {"Q1": {...}}}`) holding each entity whole; a request gets the entities it
names with only the parts its `props` and `languages` ask for, as the API gives them:
unknown ids answer `{"missing": ""}`, merged ones the entity they redirect to with
`"redirects": {"from": ..., "to": ...}`, and more than 50 ids the API's `toomanyvalues`
error.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["RecordedWikibase"]

_INFO = ("pageid", "ns", "title", "lastrevid", "modified", "type", "id")


class RecordedWikibase:
    def __init__(self, documents: Mapping[str, Any], redirects: Mapping[str, str] | None = None):
        self.entities: dict[str, dict[str, Any]] = copy.deepcopy(dict(documents["entities"]))
        self.redirects = dict(redirects or {})

    @classmethod
    def from_json(cls, text: str | bytes) -> RecordedWikibase:
        data = json.loads(text)
        return cls(data, data.get("redirects"))

    def answer(self, params: Mapping[str, str]) -> dict[str, Any]:
        """The JSON `api.php` gives for these query parameters."""
        if params.get("action") != "wbgetentities" or params.get("format") != "json":
            return _error("badvalue", "only action=wbgetentities&format=json is recorded")
        ids = [i for i in params.get("ids", "").split("|") if i]
        if len(ids) > 50:
            return _error("toomanyvalues", 'Too many values supplied for parameter "ids". The limit is 50.')
        props = set(params.get("props", "info|sitelinks|aliases|labels|descriptions|claims|datatype").split("|"))
        languages = set(params["languages"].split("|")) if params.get("languages") else None
        entities: dict[str, Any] = {}
        for asked in ids:
            target = self.redirects.get(asked, asked)
            doc = self.entities.get(target)
            if doc is None:
                entities[asked] = {"id": asked, "missing": ""}
                continue
            out = {k: v for k, v in doc.items() if k in ("type", "id") or (k in _INFO and "info" in props)}
            for part in ("labels", "descriptions", "aliases"):
                if part in props and isinstance(doc.get(part), dict):
                    out[part] = {lang: v for lang, v in doc[part].items() if languages is None or lang in languages}
                elif part in props and part in doc:  # [] for an empty map, as Wikibase writes it
                    out[part] = doc[part]
            for part in ("claims", "sitelinks"):
                if part in props and part in doc:
                    out[part] = doc[part]
            if target != asked:
                out["redirects"] = {"from": asked, "to": target}
            entities[asked] = out
        return {"entities": entities, "success": 1}


def _error(code: str, info: str) -> dict[str, Any]:
    return {"error": {"code": code, "info": info, "*": "See the API help for usage."}}
