from __future__ import annotations

from dataclasses import dataclass

from kmd.editors.options import Optimizer, Update


@dataclass(frozen=True)
class WiseConfig:
    """WISE hyperparameters (per model, from the profile; unknown keys are rejected).

    See docs/methods.md (WISE) and docs/editors.md (## WISE).
    """

    layer: int | None = None  # edited down_proj; None: ~0.85 of the depth (at most the last-but-one layer)
    # Knowledge shards: consecutive edits share a shard (`shard_size` edits each) that trains a
    # fixed random `mask_ratio` of the memory's elements (seeded by `seed` and the shard index).
    mask_ratio: float = 0.2
    shard_size: int = 500
    # TIES merging of the shards' task vectors: keep the top `density` of each by magnitude,
    # elect a sign per element, average the entries that agree with it.
    density: float = 0.53
    # Routing: a row uses the side memory when its activation (mean over its prompt tokens of
    # |W'a - W a|) reaches `act_ratio` times the smallest activation of an edit prompt.
    act_ratio: float = 0.88
    # Activation-margin loss (the paper's [5, 20, 10]): unrelated prompts below `margin_unrelated`,
    # edit prompts above `margin_edit`, and edit minus unrelated above `margin_gap`.
    margin_unrelated: float = 5.0
    margin_edit: float = 20.0
    margin_gap: float = 10.0
    # The hinges are in activation units (tens to hundreds), the NLL in nats: at weight 1.0 the
    # margins dominate and the target NLL stalls (tiny test model: 2.2 after 70 steps; 0.13 at 0.1).
    margin_weight: float = 0.1
    clamp: float = 1.0  # every memory element stays within +-clamp of the base weight
    # Optimisation. The paper uses SGD at lr 1.0 for ~70 steps (`optimizer: sgd`, `lr: 1.0`);
    # Adam at lr 0.05 moves every element at a similar pace whatever the scale of the layer's
    # inputs, and keeps earlier edits of the shard working where SGD's large steps overwrite
    # them (on the tiny test model and on SmolLM2-135M). Early stop when the target NLL is
    # below `stop_loss` and every margin holds.
    optimizer: Optimizer = "adam"  # or "sgd"
    # How an edit changes its shard. "direct": the optimised change itself (the paper).
    # "min_norm": replaced, in closed form and per output row over that row's masked elements,
    # by the least change that gives the same memory output on the edit's own tokens, weighted
    # with `protect` > 0 away from the inputs the shard's earlier edits read (editors/minnorm.py,
    # as MEMOIR's `update`). Adam's change is dense; this one lies in the span of the edit's
    # own inputs, so later edits of a shard overwrite earlier ones far less.
    update: Update = "direct"
    protect: float = 0.0
    # With min_norm: also protect the inputs of the packaged generic passages, with this weight
    # on their Gram matrix (per token, as an earlier edit's). Generic text then barely moves
    # the memory, which keeps the activation of unrelated prompts (routing) and their
    # outputs (locality) low as a shard fills.
    protect_background: float = 0.0
    lr: float = 0.05
    max_steps: int = 70
    stop_loss: float = 0.02
    # Augmentation: `n_prefixes` prefixed copies of the prompt (the paper ~10) drawn per edit
    # from `prefix_pool` short texts the model generates once (`prefix_tokens` tokens each).
    # The margin loss's unrelated prompts: `n_unrelated` packaged generic passages per edit
    # (editors/background.txt), plus the request's locality prompts.
    n_prefixes: int = 4
    n_unrelated: int = 4
    prefix_pool: int = 12
    prefix_tokens: int = 8
    seed: int = 0
