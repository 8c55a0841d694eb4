from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kmd.editors.answer_stop import AnswerPolicy
from kmd.editors.options import ChatRetrieval, Optimizer, Update


@dataclass(frozen=True)
class MemoirConfig:
    """MEMOIR hyperparameters (per model, from the profile; unknown keys are rejected).

    See docs/methods.md (MEMOIR) and docs/editors.md (## MEMOIR).
    """

    layer: int | None = None  # edited down_proj; None: ~0.85 of the depth (at most the last-but-one layer)
    # Mask size: a fraction of d_ff when < 1 (0.29 ~ 4096 of 14336 in the paper), else an absolute count.
    k: float = 0.29
    # Retrieval threshold on the mask overlap |m_q & m_e| / k. Calibrate it per model
    # (`kmd calibrate --backend memoir ...`, see the profiles). The default is deliberately
    # conservative for an uncalibrated model: two random masks overlap by ~k/d_ff, unrelated
    # prompts on SmolLM2-135M by up to ~0.5 (k = 0.29); the edited prompt itself by 1.0.
    tau: float = 0.6
    # Background statistics: "mean" subtracts the background mean of the down_proj input before
    # the top-k (as in the paper); "zscore" also divides by the background standard deviation.
    background: Literal["mean", "zscore"] = "mean"
    # What the memory reads: False, M ⊙ a (the paper); True, M ⊙ (a - mu) with mu the background
    # mean. The part every text shares then neither writes into nor reads from the memory, so
    # edits that share columns disturb each other less.
    center: bool = False
    seed: int = 0  # seeds the TopHash permutation and the augmentation prefixes
    # Augmentation: n_prefixes short texts generated once by the model itself (prefix_tokens
    # tokens each); every edit trains on the bare prompt plus these prefixed copies.
    # (The paper uses ~10; 4 is what fits the edit-time budget on a CPU.)
    n_prefixes: int = 4
    prefix_tokens: int = 8
    # How an edit changes its columns (k x d_model). "direct": the optimised change itself (the
    # paper). "min_norm": the optimised change is replaced, in closed form, by the change D of
    # least tr(D^T K D) that gives the same memory output on the edit's own training tokens
    # (A D = A delta, A: n_tokens x k masked inputs), K = I + protect * G / e, where G (k x k) is
    # the Gram matrix of the masked inputs of the live earlier edits on these columns and e the
    # mean squared norm of one row of A. D then lies in the span of A, and with protect > 0 it
    # avoids the directions earlier edits read, so it changes their outputs much less.
    update: Update = "direct"
    protect: float = 0.0
    # Memory shards: a residual memory holds at most this many live edits; the next edit opens a
    # new one (a zero d_ff x d_model matrix), and a routed row reads the memory of its edit's
    # shard. In one memory every column is shared by ~k/d_ff of all edits; on SmolLM2-135M,
    # 10,100 edits in one memory kept 0.10 of the first 100 (0.94 after 100). Each shard
    # costs d_ff x d_model floats. 0: one memory for every edit (the paper).
    shard_edits: int = 1000
    # Optimisation of the edit's mask columns of the residual memory. The paper's SGD (lr 1.0,
    # gradient norm clipped to 1.0) moves the memory by at most 1.0 per step and needs 30+
    # steps on SmolLM2-135M; Adam at lr 0.05 reaches the stopping loss in ~3 steps.
    optimizer: Optimizer = "adam"  # or "sgd" (as in the paper)
    lr: float = 0.05
    max_steps: int = 30
    weight_decay: float = 1e-5
    grad_clip: float = 1.0  # max gradient norm (0: no clipping)
    stop_loss: float = 0.02  # stop once the mean target NLL is below this...
    patience: int = 0  # ...or (if > 0) when it has not improved by 1 % for this many steps

    # The question check (editors/question_check): a routed edit acts on a row only when the
    # row asks what the edit's prompt asks (its relation, not only its subject). Per edit: an
    # edit applied with False (e.g. a relation's editor_options) gets every row it routes.
    question_check: bool = True
    # Serving: when the question check refuses a row's edit, the next `runners_up` edits whose
    # masks also overlap the row's by `tau` (most first) are offered in turn, and the first it
    # accepts acts (an alike name's edit can overlap a question most). 0: the best edit only.
    runners_up: int = 2
    # A chat turn is routed by the user's message run alone (pooled as a bare prompt is when
    # its mask is made); "in_context": by its tokens after the template's system prompt.
    chat_retrieval: ChatRetrieval = "alone"
    # How routed rows answer (editors/answer_stop.py). restate=False: once a routed row has
    # written its target it may not start it again until the row ends; MEMOIR's memory acts
    # at every prompt position, and its answers otherwise loop on the target ("poet, poet,
    # poet, ...").
    answer: AnswerPolicy = AnswerPolicy(restate=False)
