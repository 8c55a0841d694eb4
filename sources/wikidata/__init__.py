"""Wikidata as a source of facts: the current values of watched items' properties.

`WikidataSource` (source.py) polls through `WikibaseClient` (api.py: `wbgetentities`,
batching, maxlag and backoff, validation); values.py decides which statement is current
and writes its value as text; `RecordedWikibase` (recorded.py) answers from saved entity
documents for the tests and the demo.
"""

from kmd.sources.wikidata.api import WikibaseClient, WikibaseError
from kmd.sources.wikidata.recorded import RecordedWikibase
from kmd.sources.wikidata.source import WikidataSource

__all__ = ["RecordedWikibase", "WikibaseClient", "WikibaseError", "WikidataSource"]
