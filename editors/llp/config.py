from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kmd.editors.answer_stop import AnswerPolicy
from kmd.editors.options import ChatRetrieval


@dataclass(frozen=True)
class LlpConfig:
    """LLP hyperparameters (per model, from the profile; unknown keys are rejected).

    Layer choices default to depth fractions: retrieval layers R = the first quarter of
    the network, injection layer z = max(R) + 1 (METHODS.md: R = 0..7, z = 8 on 32 layers).
    """

    retrieval_layers: list | None = None  # R, a list of layer indices; None: 0 .. round(L / 4) - 1
    injection_layer: int | None = None  # z > max(R); None: max(R) + 1
    n_values: int = 4  # b: value vectors prepended at z per edit (paper configs: 1)

    # Retrieval. Paper values; calibrate per model with `kmd calibrate --backend llp`.
    similarity: float = 0.7  # a key gets a vote at a layer when its max cosine over prompt tokens exceeds this
    layer_similarity: list | None = None  # per retrieval layer thresholds (floats); overrides `similarity`
    vote_fraction: float = 0.5  # the winning key needs at least this fraction of |R| votes
    # Added to every layer threshold for the keys of edits applied with this setting (kept per
    # edit). Negative: that edit fires more easily (a retry for an edit whose paraphrases miss);
    # a large negative value makes it fire on every prompt (fault injection in tests and demos).
    threshold_shift: float = 0.0
    top_k: int = 3  # keys considered per layer
    # Cosines are taken after standardising each retrieval layer's states with a background
    # mean/std (texts the model generated itself, first token excluded): "zscore"; "center"
    # subtracts the mean only; "none" uses raw states (the paper). Early-layer states share a
    # large common direction and a few massive dimensions, which make raw cosines all ~1.
    normalize: Literal["zscore", "center", "none"] = "zscore"
    background_texts: int = 32  # generated once per editor for the statistics
    background_tokens: int = 24

    # Keys: start from the subject states (unit-normalised, the bare prompt weighing
    # `bare_weight`, the other queries the rest; the paper averages all equally), then
    # InfoNCE against the existing keys of each layer. A subject that opens the bare
    # prompt sits on the attention-sink position there, far from its prefixed states.
    bare_weight: float = 0.5
    # Also key on the subject as it opens a text. In a causal model those states are
    # context-free: a prompt that starts with the subject ("X's capital is") gives exactly
    # them. Off by default: on ZsRE (paraphrases keep the subject in context) it costs more
    # false retrievals than it gains (docs/editors.md); a policy turns it on per relation.
    subject_query: bool = False
    key_lr: float = 5e-3
    key_steps: int = 32
    key_temperature: float = 0.2
    key_negatives: int = 1000  # existing keys sampled as negatives (per layer)
    context_negatives: bool = False  # also push away from the edit prompt's non-subject tokens

    # Values: NLL of the target on the prefixed prompts + weight_decay * |v| / |v_init|.
    value_lr: float = 0.5  # Adam; relative to the RMS of the initial vector (value = init + rms * delta)
    value_steps: int = 64
    value_stop_loss: float = 0.05
    value_weight_decay: float = 0.1

    # Serving: a chat turn is retrieved by the user's message run alone through layers
    # 0..max(R) (as a bare prompt is when its key is made); "in_context": by its states after
    # the template's system prompt, which match the keys less often.
    chat_retrieval: ChatRetrieval = "alone"
    # Serving: how routed rows answer (the pointer, the end and restate rules, and the edit
    # stopping once the target is written; editors/answer_stop.py).
    answer: AnswerPolicy = AnswerPolicy()
    # The question check (editors/question_check): a routed edit acts on a row only when the
    # row asks what the edit's prompt asks (its relation, not only its subject). Per edit: an
    # edit applied with False (e.g. a relation's editor_options) gets every row it routes.
    question_check: bool = True
    # The check gets the vote's winner and this many next-ranked keys that also have the votes,
    # those whose subject the question names in full first, and the first it accepts acts
    # (0: the winner only). A generic subject's key can win the vote on prompts it must not
    # answer and would otherwise hide their own edit; a near subject can win it by a hair.
    runners_up: int = 2
    # Serving: from `shortlist_from` keys on, the similarities are computed exactly only for
    # the keys a rank-`shortlist_rank` bound cannot rule out (editors/llp/voting.py); the
    # votes are those of the whole computation. 0: always compare with every key.
    shortlist_rank: int = 64
    shortlist_from: int = 512

    # Augmentation: short texts generated once by the model itself.
    n_prefixes: int = 2  # prefixed copies of the prompt per edit (besides the bare prompt)
    prefix_pool: int = 10  # texts generated once per editor; each edit draws n_prefixes of them
    prefix_tokens: int = 8  # length of each generated text, in tokens
    seed: int = 0
