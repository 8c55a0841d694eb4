"""Helpers every part of kmd may use and that use no other part of it (see docs/architecture.md)."""
