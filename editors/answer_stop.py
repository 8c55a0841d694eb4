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
(BENCHMARKS.md, sixth session). Rows no edit routes to are never touched.

The options are one `AnswerPolicy`, the `answer` field of each backend's config (RECIPE,
LLP, MEMOIR, GRACE; their old flat option names `answer_boost`, `end_after_answer`,
`stop_after_answer`, `restate_target` still load, `AnswerPolicy.FLAT_KEYS`). A backend
follows its routed rows through one adapter, `RoutedAnswers` (made at the prefill, stepped
at each decode step, regrouped with its rows); GRACE and MEMOIR, which route whole rows
at one layer, get it through `RowPointer`.

Rules shape a routed row's tokens once its target is written (whenever the tracker
touches logits at all, i.e. with the pointer or an end rule):
- close: right after the token that completes the target, a token that would continue its
  last word is ruled out ("Velmont" must not go on as "Velmontàs", which misses the target);
- restate (`restate: false`, MEMOIR's default): until the row ends, the target's first token
  (each spelling) is ruled out, so the answer cannot start the target again ("poet, poet,
  poet, ...");
- end (`end`): once the sentence ("sentence") or line ("line") that states the
  target is over, the row ends (EOS). After a correct answer a 135M model goes on in quiz and
  list formats ("Korean War. / The answer is: / The answer is: ..."); a user reads the answer
  and the model stops (`kmd bench --misses` lists the answers that still fail);
- clause (`end: clause`, the default): the sentence rule, and besides, at every position
  after the target a token that would open a new clause (",", ";", ":", "(", a spaced dash,
  a line break) gives way to EOS: EOS gets the best of their logits and they are ruled out.
  Once a 135M model has written an edited target it often goes on in a list that loops
  ("Russian State Duma, Russia, Russia, Russia, ..."; "intersex, intersexed, intersexed").
  The answer is the clause that states the target: "Russian State Duma".
"""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Literal

import torch

from kmd.editors.answers import normalise
from kmd.editors.hooks import HookSpec
from kmd.editors.regroup import entries
from kmd.editors.written_text import WrittenText

EndRule = Literal["clause", "sentence", "line", "off"]
END_RULES: tuple[str, ...] = typing.get_args(EndRule)


class Rule(str, Enum):
    """What a routed row's next token is held to once its target is written (module doc)."""

    CLOSE = "close"  # no token that continues the target's last word
    RESTATE = "restate"  # not the target's first token again
    CLAUSE = "clause"  # no token that opens a new clause (EOS in its place)
    END = "end"  # EOS only


@dataclass(frozen=True)
class AnswerPolicy:
    """How a backend's routed rows answer (module doc): the `answer` field of its config."""

    # The answer pointer: + this on the logit of the target's next token at a routed row's
    # positions until the target has been written; 0: off.
    boost: float = 6.0
    # Once the target is written and the clause ("clause"), sentence ("sentence") or line
    # ("line") stating it is over, the routed row ends (EOS) instead of going on in quiz and
    # list formats; "off": it writes on.
    end: EndRule = "clause"
    # A routed row gets its edit up to the token that completes the target's words, then runs
    # as the base model; False: on every later position too.
    stop_edit: bool = True
    # False: once a routed row has written its target it may not start it again until the row
    # ends (answers that loop on the target: "poet, poet, poet, ...").
    restate: bool = True

    # the names these options had as flat fields of each backend's config (still accepted)
    FLAT_KEYS: ClassVar[dict[str, str]] = {
        "answer_boost": "boost", "end_after_answer": "end", "stop_after_answer": "stop_edit", "restate_target": "restate",
    }  # fmt: skip

    def __post_init__(self) -> None:
        if not self.boost >= 0:
            raise ValueError(f"answer boost (answer_boost) must be >= 0, not {self.boost!r}")
        if self.end not in END_RULES:
            raise ValueError(f"answer end rule (end_after_answer) must be one of {', '.join(END_RULES)}, not {self.end!r}")

    @property
    def shapes_logits(self) -> bool:
        """Does it change logits (pointer, end or restate rule), not only where the edit acts?"""
        return self.boost > 0 or self.end != "off" or not self.restate

    @property
    def follows_rows(self) -> bool:
        """Is there anything to follow a routed row's answer for?"""
        return self.stop_edit or self.shapes_logits


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


_CLAUSE_MARKS = (",", ";", ":", "(", "\u2013", "\u2014", "\n", "\r")


def _opens_clause(token_text: str) -> bool:
    """Does a token with this text open a new clause (`TokenTexts.clause_openers`)?"""
    return token_text.lstrip(" ").startswith(_CLAUSE_MARKS) or token_text.startswith((" -", " \u2013"))


def _contains(words: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(words[i : i + n] == needle for i in range(len(words) - n + 1))


class TokenTexts:
    """What the answer rules need of a tokenizer: decoding, EOS, and facts about single
    tokens, each found once (one per editor, shared by its trackers)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos: int | None = getattr(tokenizer, "eos_token_id", None)
        self.cleans_up_spaces = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self._ends_in_word: dict[int, bool] = {}
        self._masks: dict[str, torch.Tensor] = {}  # (vocab,) bool per kind, built once

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def ends_in_word(self, token: int) -> bool:
        """Does the token's text end in a letter or digit (so a word written next would glue on)?"""
        if token not in self._ends_in_word:
            text = self.tokenizer.decode([token])
            self._ends_in_word[token] = bool(text) and text[-1].isalnum()
        return self._ends_in_word[token]

    def word_continuations(self, vocab: int) -> torch.Tensor:
        """(vocab,) bool: the tokens whose text starts with a letter or digit, i.e. would
        continue the word before them."""
        return self._mask("word", vocab)

    def clause_openers(self, vocab: int) -> torch.Tensor:
        """(vocab,) bool: the tokens whose text opens a new clause: after optional spaces a
        ",", ";", ":", "(", a dash or a line break; or a spaced hyphen (" -")."""
        return self._mask("clause", vocab)

    def _mask(self, kind: str, vocab: int) -> torch.Tensor:
        if not self._masks:  # ~0.6 s for 49k tokens, the first time
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            self._masks["word"] = torch.tensor([bool(t) and t[0].isalnum() for t in texts], dtype=torch.bool)
            self._masks["clause"] = torch.tensor([_opens_clause(t) for t in texts], dtype=torch.bool)
        known = self._masks[kind]
        if known.numel() >= vocab:
            return known[:vocab]
        return torch.cat([known, torch.zeros(vocab - known.numel(), dtype=torch.bool)])

    def spellings(self, target: str) -> list[tuple[list[int], bool]]:
        """The target's token ids opening with a space, then as a line's start: (ids, spaced)."""
        out: list[tuple[list[int], bool]] = []
        for text, spaced in ((" " + target.strip(), True), (target.strip(), False)):
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if ids and all(ids != seen for seen, _ in out):
                out.append((ids, spaced))
        return out


@dataclass
class AnswerRow:
    """One routed row's answer: what it has written, whether that states its target, and
    for the forward in progress what each position is pointed to and held to."""

    needle: list[str]  # the target's words (answers.normalise)
    # the target's token ids after a space and at the start of a line, each with whether it
    # is the spelling that opens with a space (empty: neither pointer nor restate rule is on)
    spellings: list[tuple[list[int], bool]]
    before: int | None = None  # its last prompt token
    written: list[int] = field(default_factory=list)  # the tokens after the prompt
    text: WrittenText = field(default_factory=WrittenText)  # their text (kept only with a needle)
    done: bool = False  # the target has been written
    mark: int = 0  # len(text) before the token that completed the target
    done_len: int = 0  # tokens written by then
    ended: bool = False  # the end rule has fired
    # per position of the forward in progress: the token ids pointed at, and the rule
    pointed: list[tuple[int, ...]] = field(default_factory=list)
    rules: list[Rule | None] = field(default_factory=list)

    def restarted(self, before: int | None, cleans_up_spaces: bool) -> AnswerRow:
        """The row as a new prefill finds it: nothing written after `before`."""
        return AnswerRow(self.needle, self.spellings, before, text=WrittenText(cleans_up_spaces))


class AnswerTracker:
    """Per routed row (Bh of them): the tokens written after the prompt, and whether they
    state the row's target. Each token is decoded once (editors/written_text.py)."""

    def __init__(self, texts: TokenTexts, targets: Sequence[str], policy: AnswerPolicy = AnswerPolicy()) -> None:
        self.texts = texts
        self.policy = policy
        self.end = policy.end if texts.eos is not None else "off"  # no EOS to end with: no end rule
        # does it change logits, not only where the edit acts (AnswerPolicy.shapes_logits, less
        # an end rule without EOS)?
        self.shapes_logits = policy.boost > 0 or self.end != "off" or not policy.restate
        pointing = policy.boost > 0 or not policy.restate
        self.rows = [AnswerRow(normalise(t), texts.spellings(t) if pointing else []) for t in targets]

    @classmethod
    def regrouped(cls, parts: Sequence[tuple[AnswerTracker, Sequence[int]]]) -> AnswerTracker:
        """A tracker of rows taken, in order, from others: (tracker, its rows) per part (a
        running batch regrouped, editors/regroup.py). Each row keeps its whole state."""
        first = parts[0][0]
        if any(t.policy != first.policy for t, _ in parts):
            raise ValueError("cannot regroup answer trackers with different rules")
        tracker = copy.copy(first)  # shared: the token texts, the policy
        tracker.rows = [copy.deepcopy(t.rows[i]) for t, rows in parts for i in rows]
        return tracker

    def _push(self, row: AnswerRow, token: int) -> bool:
        """Add one written token; True while the row is still answering (edit acts here)."""
        following = row.done and self.shapes_logits and not row.ended  # the rules still watch
        if not row.done or following:
            row.written.append(token)
            if row.needle:
                length = row.text.length
                row.text.push(token, self.texts.decode)
                if not row.done and _contains(row.text.recent_words(len(row.needle) - 1), row.needle):
                    row.done, row.mark, row.done_len = True, length, len(row.written)
        return not row.done

    def _rule(self, row: AnswerRow) -> Rule | None:
        """What the row's next token is held to once its target is written (module doc)."""
        if not (row.done and self.shapes_logits) or row.ended:
            return None
        # the text's tail holds its last word and any sentence end after it (written_text.py)
        tail = row.text.tail
        if self.end != "off" and (row.text.breaks_line_since(row.mark) or (self.end in ("sentence", "clause") and sentence_over(tail))):
            row.ended = True
            return Rule.END
        if len(row.written) == row.done_len and tail[-1:].isalnum():
            return Rule.CLOSE
        if not self.policy.restate:
            return Rule.RESTATE
        return Rule.CLAUSE if self.end == "clause" else None

    def full(self, ids: torch.Tensor, last_prompt: torch.Tensor) -> torch.Tensor:
        """ids (Bh, T), last_prompt (Bh,) index of each row's last prompt token ->
        (Bh, T) bool: the positions where the edit acts (the prompt, then each written
        token up to and excluding the one that completes the target)."""
        active = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        for index, (tokens, last) in enumerate(zip(ids.tolist(), last_prompt.tolist(), strict=True)):
            row = self.rows[index] = self.rows[index].restarted(tokens[last] if 0 <= last < len(tokens) else None,
                                                                self.texts.cleans_up_spaces)  # fmt: skip
            pointed: list[tuple[int, ...]] = [()] * len(tokens)  # prompt positions predict prompt tokens: never boosted
            rules: list[Rule | None] = [None] * len(tokens)
            if 0 <= last < len(tokens):
                pointed[last] = self._next(row)
            for position in range(last + 1, len(tokens)):
                active[index, position] = self._push(row, tokens[position])
                pointed[position] = self._next(row)
                rules[position] = self._rule(row)
            row.pointed, row.rules = pointed, rules
        return active

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """A decode step: ids (Bh, t) new tokens -> (Bh, t) bool, as `full` would give."""
        active = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        for index, (row, tokens) in enumerate(zip(self.rows, ids.tolist(), strict=True)):
            row.pointed, row.rules = [], []
            for offset, token in enumerate(tokens):
                active[index, offset] = self._push(row, token)
                row.pointed.append(self._next(row))
                row.rules.append(self._rule(row))
        return active

    def _next(self, row: AnswerRow) -> tuple[int, ...]:
        """The token ids the row's next token is pointed to (none once the target is written)."""
        if row.done or not row.spellings:
            return ()
        written, out = row.written, set()
        previous = written[-1] if written else row.before
        glued = previous is not None and self.texts.ends_in_word(previous)
        for spelling, spaced in row.spellings:
            run = next((k for k in range(min(len(written), len(spelling) - 1), 0, -1) if written[-k:] == spelling[:k]), 0)
            if run == 0 and glued and not spaced:
                continue  # right after a word the answer starts with a space ("at piano", not "atpiano")
            out.add(spelling[run])
        return tuple(sorted(out))

    def point(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (Bh, Tl, V) of the forward in progress (its last Tl positions) -> the same
        with +boost on each row's pointed tokens and the close / restate / end rules applied."""
        if not self.shapes_logits:
            return logits
        rows, positions, tokens = [], [], []
        held: list[tuple[int, int, Rule]] = []
        tl = logits.shape[1]
        for index, row in enumerate(self.rows):
            offset = tl - len(row.pointed)  # logits may cover only the last positions (logits_to_keep)
            for j, ids in enumerate(row.pointed):
                if j + offset >= 0:
                    rows += [index] * len(ids)
                    positions += [j + offset] * len(ids)
                    tokens += ids
            held += [(index, j + offset, rule) for j, rule in enumerate(row.rules) if rule and j + offset >= 0]
        if not rows and not held:
            return logits
        logits = logits.clone()
        if rows:
            where = tuple(torch.tensor(x, device=logits.device) for x in (rows, positions, tokens))
            logits[where] += self.policy.boost
        floor = torch.finfo(logits.dtype).min
        vocab = logits.shape[-1]
        # (V,) bool, once per forward: the clause rule holds at every held position but END
        openers = self.texts.clause_openers(vocab).to(logits.device) if self.end == "clause" and held else None
        if openers is not None and not openers.any():
            openers = None
        for index, position, rule in held:
            if rule is Rule.END:
                logits[index, position] = floor
                logits[index, position, self.texts.eos] = 0.0
                continue
            if rule is Rule.RESTATE:
                logits[index, position, sorted({spelling[0] for spelling, _ in self.rows[index].spellings})] = floor
            elif rule is Rule.CLOSE:
                logits[index, position, self.texts.word_continuations(vocab).to(logits.device)] = floor
            if openers is not None:  # at every position after the target, with the rule above
                scores = logits[index, position]  # (V,) a view
                scores[self.texts.eos] = torch.maximum(scores[self.texts.eos], scores[openers].max())
                scores[openers] = floor
        return logits


class RoutedAnswers:
    """The answers of one batch's routed rows, between a backend and its tracker: where
    the edit still acts (`answering`) and the logits the rules shape (`point`). Made at the
    prefill (`start`), stepped at each decode step, regrouped with its rows."""

    def __init__(self, rows: torch.Tensor, tracker: AnswerTracker, answering: torch.Tensor) -> None:
        self.rows = rows  # (Bh,) the routed rows' indices in the batch
        self.tracker = tracker
        self._answering = answering  # (Bh, T) of the forward in progress

    @staticmethod
    def start(texts: TokenTexts, policy: AnswerPolicy, rows: torch.Tensor, targets: Sequence[str],
              ids: torch.Tensor, last: torch.Tensor) -> RoutedAnswers | None:
        """rows (Bh,) of a prefill's ids (B, T), routed to edits with these targets; last (Bh,)
        each routed row's last prompt index. None: the policy has nothing to follow."""
        if not policy.follows_rows or rows.numel() == 0:
            return None
        tracker = AnswerTracker(texts, list(targets), policy)
        return RoutedAnswers(rows, tracker, tracker.full(ids[rows], last))

    def step(self, ids: torch.Tensor) -> None:
        """ids (B, t) a decode step's new tokens (the whole batch)."""
        self._answering = self.tracker.step(ids[self.rows])

    def answering(self, tq: int) -> torch.Tensor | None:
        """(Bh, tq) bool for the forward in progress' last tq positions: where the edit acts
        (up to the token that completes the target); None: everywhere (stop_edit off)."""
        return self._answering[:, -tq:] if self.tracker.policy.stop_edit else None

    def point(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, Tl, V) of the whole batch -> the routed rows' pointed and held."""
        if not self.tracker.shapes_logits:
            return logits
        return logits.index_copy(0, self.rows, self.tracker.point(logits[self.rows]))

    @staticmethod
    def regrouped(rows: torch.Tensor, parts: Sequence[tuple[RoutedAnswers | None, torch.Tensor]]) -> RoutedAnswers | None:
        """A regrouped batch's (editors/regroup.py): rows (Bh,) its routed rows; per part with
        routed rows kept, its answers and the positions of the kept ones in its `rows`."""
        if all(answers is None for answers, _ in parts):
            return None
        if any(answers is None for answers, _ in parts):
            raise ValueError("cannot regroup rows with and without answer tracking")
        tracker = AnswerTracker.regrouped([(a.tracker, picks.tolist()) for a, picks in parts])
        # the next forward is a decode step: it sets `answering` before anything reads it
        return RoutedAnswers(rows, tracker, torch.ones(len(rows), 0, dtype=torch.bool, device=rows.device))


def pointer_hook(current: Callable[[], RoutedAnswers | None]) -> Callable:
    """A forward hook for the LM head: points and holds the routed rows of the forward in
    progress (`current()`: their answers, None when no row is routed)."""

    def hook(module, args, output):
        answers = current()
        return None if answers is None else answers.point(output)

    return hook


class RowPointer:
    """Answer following for a backend that routes a whole row to one edit at one layer
    (GRACE, MEMOIR): the embedding hook keeps each forward's token ids, the backend calls
    `start` when it routes the prefill's rows, the LM head hook points. State lives in the
    forward's routing context (`routing` is the editor's own `routing` method, bound when its
    hooks are made, so a fork's pointer reads the fork's), so concurrent requests never see
    each other's."""

    def __init__(self, name: str, tokenizer: Any, policy: AnswerPolicy) -> None:
        self.key, self.texts, self.policy = f"{name}:answer", TokenTexts(tokenizer), policy

    def specs(self, layout: Any, routing: Callable[[], Any]) -> list[HookSpec]:
        def ids_hook(module, args, output):
            state = routing().decisions.setdefault(self.key, _PointerState())
            if state.answers is not None:  # a decode step of routed rows
                state.answers.step(args[0])
            elif not state.started:
                state.ids = args[0]  # the prefill (or a full forward)
            return None

        def current() -> RoutedAnswers | None:
            state = routing().decisions.get(self.key)
            return None if state is None else state.answers

        return [HookSpec(layout.embed, ids_hook), HookSpec(layout.lm_head, pointer_hook(current))]

    def start(self, routing: Any, rows: torch.Tensor, targets: Sequence[str]) -> None:
        """The backend routed `rows` (Bh,) of the prefill to edits with these targets."""
        state = routing.decisions.setdefault(self.key, _PointerState())
        state.started = True
        ids, state.ids = state.ids, None
        if ids is None:
            return
        batch, seq = ids.shape
        state.rows = rows
        last = routing.last_prompt_index(batch, seq, ids.device)[rows]
        state.answers = RoutedAnswers.start(self.texts, self.policy, rows, targets, ids, last)

    def regroup(self, how: Any, decisions: list[dict[str, Any]]) -> dict[str, Any]:
        """The pointer's entry of a regrouped batch's decisions (`Editor._regroup`): each kept
        routed row keeps its answer state. `how`: an `editors.regroup.Regroup`."""
        states = entries(decisions, self.key)
        if states is None:
            return {}
        if not all(s.started for s in states):
            raise ValueError("cannot regroup a batch before its prefill")
        rows, picks = how.routed([s.rows for s in states])
        state = _PointerState()
        state.started, state.rows = True, rows
        live = [(s.answers, p) for s, p in zip(states, picks, strict=True) if p.numel()]
        state.answers = RoutedAnswers.regrouped(rows, live)
        return {self.key: state}

    def prompt_ids(self, routing: Any) -> torch.Tensor | None:
        """(B, T) the token ids of the prefill in progress, before `start` (None: not seen)."""
        state = routing.decisions.get(self.key)
        return None if state is None else state.ids

    def answering(self, routing: Any, tq: int) -> torch.Tensor | None:
        """(Bh, tq) bool for the forward in progress: the routed rows' positions up to the
        one that completes their target (None: no routed row, or stop_edit off)."""
        state = routing.decisions.get(self.key)
        if state is None or state.answers is None:
            return None
        return state.answers.answering(tq)

    def routed_rows(self, routing: Any) -> torch.Tensor | None:
        """(Bh,) the rows `start` was given (None: before it)."""
        state = routing.decisions.get(self.key)
        return None if state is None else state.rows


@dataclass
class _PointerState:
    started: bool = False
    ids: torch.Tensor | None = None  # (B, T) the prefill's token ids, until `start`
    rows: torch.Tensor | None = None  # (Bh,) the routed rows
    answers: RoutedAnswers | None = None
