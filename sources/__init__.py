"""Where facts come from: RSS/Atom feeds, curated JSONL files, and turning entries into claims."""
