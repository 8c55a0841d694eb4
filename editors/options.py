"""Option values shared by several backends' configs. `profiles.coerce_options` refuses any
other value by name when a profile, a saved state or the CLI sets them."""

from __future__ import annotations

from typing import Literal

# A chat turn is routed by its user's message run alone through the model (as a bare prompt
# is when its edit is made), or "in_context": by its states after the template's system prompt.
ChatRetrieval = Literal["alone", "in_context"]
# How an edit changes its memory: "direct", the optimised change itself; "min_norm", the least
# change with the same output on the edit's own tokens (editors/minnorm.py).
Update = Literal["direct", "min_norm"]
Optimizer = Literal["adam", "sgd"]
