"""Stop an edit acting once its answer has been written.

An edit's memory is trained to make the prompt continue with the target. Left acting on
every later position it keeps pushing the target: "Fredville villevilleville...". So a
row routed to an edit gets the edit only at positions whose continuation has not yet
stated the target: the prompt, and each generated (or teacher-forced) token up to the
one that completes the target's words. Past that point the row runs as the base model
(over a context whose earlier positions carry the edit), and writes on as the unedited
model would once the fact is stated.

The rule is a pure function of a row's token ids, so a full forward at every step and
KV-cache decode steps (which see one new token at a time) agree on every position.

The answer pointer (`boost` > 0) is the other half: while a routed row has not yet written
its target, the logit of the target's next token gets +boost at each position: the first
token (with a leading space, and also without one unless the text so far ends in a letter
or digit, where it would glue onto a word) until the answer starts, then the token that
continues the longest run of the target just written. A 135M model shown a fact in its
context copies it only about a third of the time when asked as a chat turn; pointing at the
target's tokens lets it state the fact in its own answer and then write on freely
(scripts/experiments/context_boost.py). Rows no edit routes to are never touched.

Rules shape a routed row's tokens once its target is written (whenever the tracker
touches logits at all, i.e. with the pointer or an end rule):
- close: right after the token that completes the target, a token that would continue its
  last word is ruled out ("Velmont" must not go on as "Velmontàs", which misses the target);
- restate (MEMOIR's `restate_target: false`): until the row ends, the target's first token
  (each spelling) is ruled out, so the answer cannot start the target again ("poet, poet,
  poet, ...");
- end (`end_after_answer`): once the sentence ("sentence") or line ("line") that states the
  target is over, the row ends (EOS). After a correct answer a 135M model goes on in quiz and
  list formats ("Korean War. / The answer is: / The answer is: ..."); a user reads the answer
  and the model stops (scripts/experiments/served_misses.py measures both).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from kmd.editors.answers import normalise


def _contains(words: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(words[i : i + n] == needle for i in range(len(words) - n + 1))


EndRule = Literal["sentence", "line", "off"]
END_RULES: tuple[str, ...] = ("sentence", "line", "off")
# "." after these words (or a number, or a single letter) does not end a sentence
_ABBREVIATIONS = frozenset({"st", "dr", "mr", "mrs", "ms", "jr", "sr", "vs", "etc", "no", "inc", "co", "ltd", "mt", "ft", "gen", "col", "lt"})
_CLOSING = re.compile(r"(\w*)([.!?])[\"')\]]*$")


def sentence_over(text: str) -> bool:
    """Does `text` end with a sentence's closing '.', '!' or '?' (a '.' after a number, an
    initial or a common abbreviation does not count)?"""
    m = _CLOSING.search(text)
    if m is None:
        return False
    word = m.group(1)
    if m.group(2) != "." or not word:
        return True
    return not (word[-1].isdigit() or (len(word) == 1 and word.isalpha()) or word.lower() in _ABBREVIATIONS)


def word_continuations(tokenizer: Any, vocab: int) -> torch.Tensor:
    """(vocab,) bool: the tokens whose text starts with a letter or digit, i.e. would continue
    the word before them. Found once per tokenizer (~0.6 s for 49k tokens) and kept on it."""
    cached = getattr(tokenizer, "_kmd_word_continuations", None)
    if cached is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        cached = torch.tensor([bool(t) and t[0].isalnum() for t in texts], dtype=torch.bool)
        tokenizer._kmd_word_continuations = cached
    if cached.numel() >= vocab:
        return cached[:vocab]
    return torch.cat([cached, torch.zeros(vocab - cached.numel(), dtype=torch.bool)])


class AnswerTracker:
    """Per hit row: the tokens written after the prompt, and whether they state the target."""

    def __init__(self, tokenizer: Any, targets: Sequence[str], boost: float = 0.0, end: EndRule = "off",
                 restate: bool = True) -> None:
        if end not in END_RULES:
            raise ValueError(f"end_after_answer must be one of {', '.join(END_RULES)}, not {end!r}")
        self.tokenizer = tokenizer
        self.needles = [normalise(t) for t in targets]  # per row: the target's words
        self.written: list[list[int]] = [[] for _ in targets]
        self.done = [False] * len(targets)
        self.boost = boost
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self.end = end if self.eos is not None else "off"
        self.restate = restate  # False: once written, the target may not be started again (restate rule)
        # per row: the written text, its length before the token that completed the target, the
        # number of tokens written by then, and whether the row has been ended
        self.text = [""] * len(targets)
        self.mark = [0] * len(targets)
        self.done_len = [0] * len(targets)
        self.ended = [False] * len(targets)
        # per row, per position of the forward in progress: "close", "restate", "end" or None (module doc)
        self.rules: list[list[str | None]] = [[] for _ in targets]
        # per row: the target's token ids after a space and at the start of a line, each with
        # whether it is the spelling that opens with a space
        self.spellings = [_spellings(tokenizer, t) for t in targets] if boost > 0 or not restate else []
        self.before: list[int | None] = [None] * len(targets)  # per row: its last prompt token
        self._word_end: dict[int, bool] = {}
        # per row, per position of the forward in progress: the token ids to boost there
        self.pointed: list[list[tuple[int, ...]]] = [[] for _ in targets]

    # what a tracker keeps per row (the rest is shared settings)
    _PER_ROW = ("needles", "written", "done", "text", "mark", "done_len", "ended", "rules", "before", "pointed")

    @classmethod
    def regrouped(cls, parts: Sequence[tuple[AnswerTracker, Sequence[int]]]) -> AnswerTracker:
        """A tracker of rows taken, in order, from others: (tracker, its rows) per part (a
        running batch regrouped, editors/regroup.py). Each row keeps its whole state."""
        first = parts[0][0]
        if any((t.boost, t.end, t.restate) != (first.boost, first.end, first.restate) for t, _ in parts):
            raise ValueError("cannot regroup answer trackers with different rules")
        tracker = copy.copy(first)  # shared: tokenizer, rules, EOS, the word-end cache
        names = cls._PER_ROW + (("spellings",) if first.spellings else ())
        for name in names:
            setattr(tracker, name, [copy.copy(getattr(t, name)[i]) for t, rows in parts for i in rows])
        return tracker

    @property
    def shapes_logits(self) -> bool:
        """Does the tracker change logits (pointer or end rule), not only where the edit acts?"""
        return self.boost > 0 or self.end != "off" or not self.restate

    def _push(self, row: int, token: int) -> bool:
        """Add one written token; True while the row is still answering (edit acts here)."""
        following = self.done[row] and self.shapes_logits and not self.ended[row]  # the rules still watch
        if not self.done[row] or following:
            self.written[row].append(token)
            needle = self.needles[row]
            if needle:
                text = self.tokenizer.decode(self.written[row], skip_special_tokens=True)
                if not self.done[row] and _contains(normalise(text), needle):
                    self.done[row], self.mark[row], self.done_len[row] = True, len(self.text[row]), len(self.written[row])
                self.text[row] = text
        return not self.done[row]

    def _rule(self, row: int) -> str | None:
        """What the row's next token is held to once its target is written (module doc)."""
        if not (self.done[row] and self.shapes_logits) or self.ended[row]:
            return None
        text = self.text[row]
        if self.end != "off" and ("\n" in text[self.mark[row] :] or (self.end == "sentence" and sentence_over(text))):
            self.ended[row] = True
            return "end"
        if len(self.written[row]) == self.done_len[row] and text[-1:].isalnum():
            return "close"
        return None if self.restate else "restate"

    def full(self, ids: torch.Tensor, last_prompt: torch.Tensor) -> torch.Tensor:
        """ids (Bh, T), last_prompt (Bh,) index of each row's last prompt token ->
        (Bh, T) bool: the positions where the edit acts (the prompt, then each written
        token up to and excluding the one that completes the target)."""
        active = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        rows = ids.tolist()
        for row, (tokens, last) in enumerate(zip(rows, last_prompt.tolist(), strict=True)):
            self.written[row], self.done[row], self.text[row], self.ended[row] = [], False, "", False
            self.before[row] = tokens[last] if 0 <= last < len(tokens) else None
            pointed = [()] * len(tokens)  # prompt positions predict prompt tokens: never boosted
            rules: list[str | None] = [None] * len(tokens)
            if 0 <= last < len(tokens):
                pointed[last] = self._next(row)
            for position in range(last + 1, len(tokens)):
                active[row, position] = self._push(row, tokens[position])
                pointed[position] = self._next(row)
                rules[position] = self._rule(row)
            self.pointed[row], self.rules[row] = pointed, rules
        return active

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """A decode step: ids (Bh, t) new tokens -> (Bh, t) bool, as `full` would give."""
        active = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        for row, tokens in enumerate(ids.tolist()):
            pointed, rules = [], []
            for offset, token in enumerate(tokens):
                active[row, offset] = self._push(row, token)
                pointed.append(self._next(row))
                rules.append(self._rule(row))
            self.pointed[row], self.rules[row] = pointed, rules
        return active

    def _next(self, row: int) -> tuple[int, ...]:
        """The token ids the row's next token is pointed to (none once the target is written)."""
        if not self.spellings or self.done[row]:
            return ()
        written, out = self.written[row], set()
        previous = written[-1] if written else self.before[row]
        glued = previous is not None and self._ends_in_word(previous)
        for spelling, spaced in self.spellings[row]:
            run = next((k for k in range(min(len(written), len(spelling) - 1), 0, -1) if written[-k:] == spelling[:k]), 0)
            if run == 0 and glued and not spaced:
                continue  # right after a word the answer starts with a space ("at piano", not "atpiano")
            out.add(spelling[run])
        return tuple(sorted(out))

    def _ends_in_word(self, token: int) -> bool:
        """Does the token's text end in a letter or digit (so a word written next would glue on)?"""
        if token not in self._word_end:
            text = self.tokenizer.decode([token])
            self._word_end[token] = bool(text) and text[-1].isalnum()
        return self._word_end[token]

    def point(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (Bh, Tl, V) of the forward in progress (its last Tl positions) -> the same
        with +boost on each row's pointed tokens and the close / end rules applied."""
        if not self.shapes_logits:
            return logits
        rows, positions, tokens = [], [], []
        held: list[tuple[int, int, str]] = []
        tl = logits.shape[1]
        for row, (pointed, rules) in enumerate(zip(self.pointed, self.rules, strict=True)):
            offset = tl - len(pointed)  # logits may cover only the last positions (logits_to_keep)
            for j, ids in enumerate(pointed):
                if j + offset >= 0:
                    rows += [row] * len(ids)
                    positions += [j + offset] * len(ids)
                    tokens += ids
            held += [(row, j + offset, rule) for j, rule in enumerate(rules) if rule and j + offset >= 0]
        if not rows and not held:
            return logits
        logits = logits.clone()
        if rows:
            index = tuple(torch.tensor(x, device=logits.device) for x in (rows, positions, tokens))
            logits[index] += self.boost
        floor = torch.finfo(logits.dtype).min
        for row, position, rule in held:
            if rule == "end":
                logits[row, position] = floor
                logits[row, position, self.eos] = 0.0
            elif rule == "restate":
                logits[row, position, sorted({spelling[0] for spelling, _ in self.spellings[row]})] = floor
            else:
                logits[row, position, word_continuations(self.tokenizer, logits.shape[-1]).to(logits.device)] = floor
        return logits


def pointer_hook(current: Callable[[], Any]) -> Callable:
    """A forward hook for the LM head: adds the answer pointer of the routed rows of the
    forward in progress (`current()` -> an Injection with a boosting tracker, or None)."""

    def hook(module, args, output):
        injection = current()
        tracker = getattr(injection, "tracker", None)
        if tracker is None or not tracker.shapes_logits:
            return None
        rows = injection.rows
        return output.index_copy(0, rows, tracker.point(output[rows]))

    return hook


def _spellings(tokenizer: Any, target: str) -> list[tuple[list[int], bool]]:
    """The target's token ids opening with a space, then as a line's start: (ids, spaced)."""
    out: list[tuple[list[int], bool]] = []
    for text, spaced in ((" " + target.strip(), True), (target.strip(), False)):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if ids and all(ids != seen for seen, _ in out):
            out.append((ids, spaced))
    return out


class RowPointer:
    """Stop-after-answer and the pointer for a backend that routes a whole row to one edit at
    one layer (GRACE, MEMOIR): the embedding hook keeps each forward's token ids, the backend
    calls `start` when it routes the prefill's rows, and the LM head hook points. State lives
    in the forward's routing context (`routing` is the editor's own `routing` method, bound
    when its hooks are made, so a fork's pointer reads the fork's), so concurrent requests
    never see each other's."""

    def __init__(self, name: str, tokenizer: Any, boost: float, end: EndRule = "off", restate: bool = True) -> None:
        self.key, self.tokenizer, self.boost, self.end, self.restate = f"{name}:answer", tokenizer, boost, end, restate

    def specs(self, layout: Any, routing: Callable[[], Any]) -> list:
        from kmd.editors.hooks import HookSpec

        def ids_hook(module, args, output):
            state = routing().decisions.setdefault(self.key, _RowState())
            if state.tracker is not None:  # a decode step of routed rows
                state.answering = state.tracker.step(args[0][state.rows])
            elif not state.started:
                state.ids = args[0]  # the prefill (or a full forward)
            return None

        return [HookSpec(layout.embed, ids_hook), HookSpec(layout.lm_head, pointer_hook(lambda: routing().decisions.get(self.key)))]

    def start(self, routing: Any, rows: torch.Tensor, targets: Sequence[str]) -> None:
        """The backend routed `rows` (Bh,) of the prefill to edits with these targets."""
        state = routing.decisions.setdefault(self.key, _RowState())
        state.started = True
        ids, state.ids = state.ids, None
        if ids is None or rows.numel() == 0:
            return
        batch, seq = ids.shape
        state.rows = rows
        state.tracker = AnswerTracker(self.tokenizer, targets, boost=self.boost, end=self.end, restate=self.restate)
        state.answering = state.tracker.full(ids[rows], routing.last_prompt_index(batch, seq, ids.device)[rows])

    def regroup(self, how: Any, decisions: list[dict[str, Any]]) -> dict[str, Any]:
        """The pointer's entry of a regrouped batch's decisions (`Editor._regroup`): each kept
        routed row keeps its tracker state. `how`: an `editors.regroup.Regroup`."""
        from kmd.editors.regroup import entries

        states = entries(decisions, self.key)
        if states is None:
            return {}
        if not all(s.started for s in states):
            raise ValueError("cannot regroup a batch before its prefill")
        rows, picks = how.routed([s.rows for s in states])
        state = _RowState()
        state.started = True
        live = [(s, p.tolist()) for s, p in zip(states, picks, strict=True) if p.numel()]
        if live and all(s.tracker is not None for s, _ in live):
            state.rows, state.tracker = rows, AnswerTracker.regrouped([(s.tracker, p) for s, p in live])
        return {self.key: state}

    def prompt_ids(self, routing: Any) -> torch.Tensor | None:
        """(B, T) the token ids of the prefill in progress, before `start` (None: not seen)."""
        state = routing.decisions.get(self.key)
        return None if state is None else state.ids

    def answering(self, routing: Any, tq: int) -> torch.Tensor | None:
        """(Bh, tq) bool for the forward in progress: the routed rows' positions up to the
        one that completes their target (None: no routed row)."""
        state = routing.decisions.get(self.key)
        if state is None or state.answering is None:
            return None
        return state.answering[:, -tq:]


class _RowState:
    def __init__(self) -> None:
        self.started = False
        self.ids: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.tracker: AnswerTracker | None = None
        self.answering: torch.Tensor | None = None
