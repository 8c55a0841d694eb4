from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoirConfig:
    """MEMOIR hyperparameters (per model, from the profile; unknown keys are rejected).

    See ../shared/design/METHODS.md (MEMOIR) and docs/editors.md (## MEMOIR).
    """

    layer: int | None = None  # edited down_proj; None: ~0.85 of the depth (at most the last-but-one layer)
    # Mask size: a fraction of d_ff when < 1 (0.29 ~ 4096 of 14336 in the paper), else an absolute count.
    k: float = 0.29
    # Retrieval threshold on the mask overlap |m_q & m_e| / k (calibrated per model:
    # `kmd calibrate --backend memoir ...`, see the profile).
    tau: float = 0.4
    # Background statistics: "mean" subtracts the background mean of the down_proj input before
    # the top-k (as in the paper); "zscore" also divides by the background standard deviation.
    background: str = "mean"
    seed: int = 0  # seeds the TopHash permutation and the augmentation prefixes
    # Augmentation: n_prefixes short texts generated once by the model itself (prefix_tokens
    # tokens each); every edit trains on the bare prompt plus these prefixed copies.
    n_prefixes: int = 10
    prefix_tokens: int = 8
    # Optimisation of the edit's mask columns of the residual memory.
    optimizer: str = "sgd"  # "sgd" (as in the paper) or "adam"
    lr: float = 1.0
    max_steps: int = 30
    weight_decay: float = 1e-5
    grad_clip: float = 1.0  # max gradient norm (0: no clipping)
    stop_loss: float = 0.02  # stop once the mean target NLL is below this...
    patience: int = 0  # ...or (if > 0) when it has not improved by 1 % for this many steps
