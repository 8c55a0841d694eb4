"""Logging setup (loguru): human-readable by default, one JSON object per line on request.

Every line about an edit carries its id: bind it with `logger.bind(edit_id=...)`.
"""

from __future__ import annotations

import sys

from loguru import logger


def _human(record: dict) -> str:
    edit = "[edit {extra[edit_id]}] " if record["extra"].get("edit_id") else ""
    return "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> " + edit + "{message}\n{exception}"


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    logger.remove()
    if json_lines:
        logger.add(sys.stderr, level=level, serialize=True)
    else:
        logger.add(sys.stderr, level=level, format=_human)
