"""LLP: Layer-Level Prompting (key memories at the first layers, value vectors prepended at one layer)."""

from kmd.editors.llp.config import LlpConfig
from kmd.editors.llp.editor import LlpEditor

__all__ = ["LlpConfig", "LlpEditor"]
