"""WISE: a side memory on one late down_proj, trained in random-mask knowledge shards."""

from kmd.editors.wise.config import WiseConfig
from kmd.editors.wise.editor import WiseEditor

__all__ = ["WiseConfig", "WiseEditor"]
