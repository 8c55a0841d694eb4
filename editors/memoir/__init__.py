"""MEMOIR: a zero-initialised residual memory on one down_proj, with sparse TopHash masks."""

from kmd.editors.memoir.config import MemoirConfig
from kmd.editors.memoir.editor import MemoirEditor

__all__ = ["MemoirConfig", "MemoirEditor"]
