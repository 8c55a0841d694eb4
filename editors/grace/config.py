from __future__ import annotations

from dataclasses import dataclass

from kmd.editors.answer_stop import AnswerPolicy
from kmd.editors.options import ChatRetrieval


@dataclass(frozen=True)
class GraceConfig:
    """GRACE hyperparameters (per model, from the profile; unknown keys are rejected)."""

    layer: int | None = None  # edited down_proj; None: 80 % of the depth
    # Radius of a new entry as a fraction of its key's L2 norm (scale-free across models).
    # On SmolLM2-135M layer 24 (ZsRE val): a rephrase's key lies at a median 0.35 of the norm,
    # the nearest other fact at 0.44, the nearest locality prompt beyond 1.2.
    radius: float = 0.5
    # GRACE's split rule: a new entry's radius stops halfway to any entry with another
    # target. Turning it off (with a huge radius) makes an edit fire on every prompt: only
    # useful to test that the probes catch a harmful edit.
    split_conflicts: bool = True
    lr: float = 1.0  # Adam, as in the GRACE paper
    max_steps: int = 100
    stop_loss: float = 0.01  # stop once the mean target NLL is below this

    # A chat turn is looked up by its user's message run alone (the down_proj input at the
    # message's last token, as a bare prompt's key is made); "in_context": at the chat
    # prompt's last token, which is the template's text.
    chat_retrieval: ChatRetrieval = "alone"
    # The question check (editors/question_check): a routed edit acts on a row only when the
    # row asks what the edit's prompt asks (its relation, not only its subject). Per edit: an
    # edit applied with False (e.g. a relation's editor_options) gets every row it routes.
    question_check: bool = True
    # How routed rows answer (editors/answer_stop.py). The entry acts on its own span of
    # positions after the prompt; stop_edit would also end it once the target is written.
    answer: AnswerPolicy = AnswerPolicy(stop_edit=False)
