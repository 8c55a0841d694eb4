"""The generated rows of a probe, asked under several editor states at the cost of one.

A probe of candidate edits asks, for each, its served questions (the edit prompt and its
paraphrases in every served form, judged against its target) and its same-subject
questions (judged by their answer line). `ProbeRows` holds them all with their routing
features, computed once: features depend on the model and the backend's config, never on
the edits. Under any editor state, `routes` gives each row's route token, and by the
editor protocol two states that give a row the same token give it the same tokens; so
`RouteMemo` keeps answers by (row, token), and a later probe of another state (a step of
a bisection, the state before the candidates) generates only the rows whose token it has
not seen. Without features (a backend without them) nothing is known: every row asked is
generated.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kmd.editors.answers import Answer, Form, ask, question_features

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import Editor

__all__ = ["ProbeRow", "ProbeRows", "RouteMemo", "ScoreMemo"]

Route = Hashable | None


@dataclass(frozen=True)
class ProbeRow:
    prompt: str
    form: Form
    target: str | None  # a served question: the edit's target; a same-subject question: None


class ProbeRows:
    """Rows with their routing features (`with_features`), in fixed chunks of `chunk` rows."""

    def __init__(self, host: ModelHost, rows: Sequence[ProbeRow], chunk: int = 32) -> None:
        self.host, self.rows, self.chunk = host, tuple(rows), chunk
        self.features: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def with_features(self, editor: Editor) -> bool:
        """Compute the rows' routing features with `editor`'s backend; False when it has none."""
        self.features = question_features(self.host, editor, [(r.prompt, r.form) for r in self.rows], self.chunk)
        return self.features is not None

    def routes(self, editor: Editor) -> list[Route] | None:
        """Each row's route token under `editor` now (None: no features, nothing known)."""
        if self.features is None:
            return None
        if not editor.edit_ids:
            return [None] * len(self.rows)
        return [token for f in self.features for token in editor.routes(f)]


class RouteMemo:
    """Answers by (row, route token): what a row gets under any state that routes it so."""

    def __init__(self) -> None:
        self._answers: dict[tuple[int, Route], Answer] = {}

    def answer(self, host: ModelHost, editor: Editor | None, rows: ProbeRows, wanted: Sequence[int],
               routes: Sequence[Route] | None, batch_size: int) -> dict[int, Answer]:  # fmt: skip
        """The answers of rows `wanted` under `editor` (whose routes are `routes`, None when
        unknown): those seen under the same token from the memo, the others generated
        together in one batched decode, only as far as their verdicts need."""
        out: dict[int, Answer] = {}
        todo = []
        for i in wanted:
            known = self._answers.get((i, routes[i])) if routes is not None else None
            if known is not None:
                out[i] = known
            else:
                todo.append(i)
        if todo:
            questions = [(rows.rows[i].prompt, rows.rows[i].form, rows.rows[i].target) for i in todo]
            for i, answer in zip(todo, ask(host, editor, questions, batch_size=batch_size, decided=True), strict=True):
                out[i] = answer
                if routes is not None:
                    self._answers[(i, routes[i])] = answer
        return out


class ScoreMemo:
    """Teacher-forced accuracies by (prompt, target, route token), across probes: an edit's
    own prompt scored when it was probed is what the check of earlier edits gets for it
    later, as long as the prompt still routes to it (any state that routes a row the same
    gives it the same output: the editor protocol). Least recently used entries go first."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._scores: OrderedDict[tuple[str, str, Route], float] = OrderedDict()

    def get(self, key: tuple[str, str, Route]) -> float | None:
        score = self._scores.get(key)
        if score is not None:
            self._scores.move_to_end(key)
        return score

    def put(self, key: tuple[str, str, Route], score: float) -> None:
        self._scores[key] = score
        self._scores.move_to_end(key)
        while len(self._scores) > self.limit:
            self._scores.popitem(last=False)

    def __len__(self) -> int:
        return len(self._scores)
