"""GRACE: a codebook of (key, radius, value) entries at one down_proj (baseline backend)."""

from kmd.editors.grace.config import GraceConfig
from kmd.editors.grace.editor import GraceEditor

__all__ = ["GraceConfig", "GraceEditor"]
