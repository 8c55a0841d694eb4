from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kmd.editors.answer_stop import AnswerPolicy


@dataclass(frozen=True)
class RecipeConfig:
    """RECIPE options (per model, from the profile; unknown keys are rejected).

    The method's hyperparameters live in the trained editor (`kmd recipe train`); here is
    which trained editor to use and how strictly to retrieve.
    """

    # The trained editor (a safetensors file from `kmd recipe train`, normally
    # <out>/best.safetensors). None: the one shipped for the model (editors/recipe/trained/,
    # matched by the model's identity; SmolLM2-135M-Instruct only), else an error: there is
    # no untrained RECIPE.
    checkpoint: str | None = None
    # A query retrieves its nearest edit when that edit's cosine exceeds the sentinel's by
    # more than this (0: the Knowledge Sentinel alone decides, as in the paper).
    margin: float = 0.0
    # Per edit (a relation's editor_options): added to the bar this edit's cosine must clear,
    # and taken off its score when rows pick their nearest edit; negative fires more. Fault
    # injection only (the demo's harmful edit uses -10: it fires on every prompt).
    threshold_shift: float = 0.0
    # An edit whose own prompt or a paraphrase in its request does not clear the sentinel
    # gets a lower bar, just under the lowest of their margins, by at most this (cosine
    # units); the question check keeps the rows it then reaches to those about its subject
    # and relation. 0: the sentinel alone.
    own_prompt_bar_floor: float = 0.25
    # Memory for the prefixes' per-layer keys/values, computed when an edit is first
    # retrieved (~2 MB per edit on SmolLM2-135M with the statement context); past this the
    # least recently retrieved are dropped and recomputed when needed again (one pass of
    # the prefix through the model).
    kv_cache_mb: float = 4096.0
    # What a routed row is shown: "statement" (the edit as one plain sentence, "Known fact
    # (current, verified): <prompt> <target>.", in front of the row, as the base model's own
    # token embeddings: a retrieved fact in the context) or "trained" (the trained continuous
    # prompts, then the statement repeated as the editor was trained; the paper's RECIPE plus
    # ours). Retrieval is the trained networks' either way.
    context: Literal["statement", "trained"] = "statement"
    # Also query by the text's last sentence (of 3+ words) when it has several, and use
    # whichever of the two clears the sentinel by more: a question asked after unrelated
    # text ("... and Sallie Beavers Riley. The Autonomous University of Madrid is in") is
    # found by its question. False: the whole text only.
    last_sentence_query: bool = True
    # The question check (editors/question_check): a retrieved edit acts on a row only when the
    # row asks what the edit's prompt asks (its relation, not only its subject). Per edit: an
    # edit applied with False (e.g. a relation's editor_options) gets every row it retrieves.
    question_check: bool = True
    # Serving: when the question check refuses a row's nearest edit, the next `runners_up` edits
    # that also clear the sentinel (in score order) are offered in turn, and the first it accepts
    # acts: "Nimbrook Energy"'s edit is nearest to a question about "Nimbrook Labs" as readily as
    # the other way round. 0: the nearest edit only.
    runners_up: int = 2
    # How routed rows answer: the pointer, the end and restate rules, and whether the prefix
    # stops acting once the target is written (editors/answer_stop.py). The prefix keeps
    # acting here: stopping it makes RECIPE's answers far worse (BENCHMARKS.md).
    answer: AnswerPolicy = AnswerPolicy(stop_edit=False)
