"""Data files shipped with the daemon: the default locality probe suite (locality.jsonl)."""
