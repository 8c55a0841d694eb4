"""Served answers: what a user reads, and how it is judged (`lifelong-served/v1`).

A prompt is asked in one of four forms (`lifelong-served/v2`, PROTOCOL.md): `plain` (the
text as is), `chat` (one user turn through the tokenizer's chat template, its default
system prompt, reply opened), `sys` (the same under an operator's own system prompt) and
`multi` (the question as the second user turn, after an unrelated first exchange). The
chat forms go through `editors/chat.py`, as the OpenAI endpoints do. The model answers
greedily with the KV cache, batched as the server batches, and the continuation is
judged by three rules:

- answer   the first non-empty line of the continuation;
- hit      the normalised target (lowercase, punctuation to spaces) occurs in the
           normalised answer as a whole-word sequence;
- degenerate  some word bigram occurs 3+ times in the whole continuation, or the
           target occurs 3+ times in it.

A prompt is correct when it hits and is not degenerate.

Decoding only as far as the verdict needs (`ask(..., decided=True)`, what the daemon's
probes use): a row stops once nothing later can change what its verdict reads, so the
verdict is exactly the one the whole continuation (up to `max_new_tokens`) would get:
- its EOS (as always);
- a row with a target: its first line is over (a line break follows non-blank text) and
  does not hold the target (a miss), or the words written so far, all but the last
  (which may go on), are already degenerate;
- a row without a target (a same-subject question, judged by its answer line): its
  first line is over.
A row whose target is written and that goes on is decoded to the end: a repetition later
would still make it degenerate (the backends' end rule closes such rows with EOS right
after the sentence that states the target). A stopped row's `text` and `tokens` are what
was written (a prefix of the whole continuation) and its verdict (`correct`) is the whole
continuation's; `line` and `hit` are too when it stopped on a finished line, and
`degenerate` reads the shorter text (`tests/unit/test_answers.py` compares verdicts with
and without stopping). A same-subject row stopped on its line keeps its answer line, so
comparing its tokens before and after an edit compares that line. Rows are first decoded with a small
budget (`FIRST_PASS` tokens, in which almost every served answer ends) and the few still
undecided are decoded again, from their prompts and together, to the full limit: a row's
tokens do not depend on its batch (the contract suite checks it), so they are the same
tokens, and a long row no longer holds a batch of short ones.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from kmd.editors.batching import left_padded_ids
from kmd.editors.scoring import generate_ids

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import Editor

Form = Literal["plain", "chat", "sys", "multi"]
CHAT_FORMS: tuple[Form, ...] = ("chat", "sys", "multi")
SERVED_PROTOCOL = "lifelong-served/v1"
# The `sys` form's system prompt: an operator's own, as every production deployment sets one.
OPERATOR_SYSTEM = "You are the assistant of a news desk. Answer questions briefly and factually."
# The `multi` form's first exchange, unrelated to any edit.
FIRST_EXCHANGE = ("What is the capital of France?", "The capital of France is Paris.")
MAX_NEW_TOKENS = 32
REPEAT_LIMIT = 3  # a bigram (or the target) this many times makes a continuation degenerate
FIRST_PASS = 12  # `decided` decoding: the first budget (tokens); undecided rows are decoded again to the limit

_PUNCT = re.compile(r"[^\w\s]|_", re.UNICODE)


def normalise(text: str) -> list[str]:
    """Lowercased words with punctuation turned into spaces (accents kept)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _PUNCT.sub(" ", text).split()


def answer_line(continuation: str) -> str:
    """The first non-empty line of a continuation (what a reader takes as the answer)."""
    for line in continuation.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _occurrences(words: Sequence[str], needle: Sequence[str]) -> int:
    n = len(needle)
    if n == 0:
        return 0
    return sum(1 for i in range(len(words) - n + 1) if list(words[i : i + n]) == list(needle))


def hits(answer: str, target: str) -> bool:
    return _occurrences(normalise(answer), normalise(target)) > 0


def is_degenerate(continuation: str, target: str | None = None) -> bool:
    return _repeats(normalise(continuation), target)


def _repeats(words: Sequence[str], target: str | None) -> bool:
    bigrams = Counter(zip(words, words[1:]))
    if bigrams and max(bigrams.values()) >= REPEAT_LIMIT:
        return True
    return bool(target) and _occurrences(words, normalise(target)) >= REPEAT_LIMIT


def first_line_over(text: str) -> bool:
    """Has the first non-empty line of `text` ended (a line break follows it)? Then no later
    token changes `answer_line`."""
    for line in text.splitlines(keepends=True):
        if line.strip():
            return line.splitlines()[0] != line  # it kept its line break
    return False


def verdict_fixed(text: str, target: str | None) -> bool:
    """Can no continuation of `text` change the verdict (module doc)? Without a target the
    verdict is the answer line; with one, the row is wrong already (a miss, or degenerate
    in the words that cannot change: all but the last, which a later token may extend)."""
    if target is None:
        return first_line_over(text)
    if first_line_over(text) and not hits(answer_line(text), target):
        return True
    return _repeats(normalise(text)[:-1], target)


@dataclass(frozen=True)
class Answer:
    """One generated answer and its verdicts (`target` None: locality, no verdict)."""

    prompt: str
    form: Form
    text: str  # the whole continuation, special tokens removed
    tokens: tuple[int, ...]  # the new token ids (EOS included when it was produced)
    target: str | None = None

    @property
    def line(self) -> str:
        return answer_line(self.text)

    @property
    def hit(self) -> bool:
        return self.target is not None and hits(self.line, self.target)

    @property
    def degenerate(self) -> bool:
        return is_degenerate(self.text, self.target)

    @property
    def correct(self) -> bool:
        return self.hit and not self.degenerate


def has_chat_template(host: ModelHost) -> bool:
    return host.chat.available


def conversation(prompt: str, form: Form) -> list[dict[str, str]]:
    """The messages of `prompt` asked in a chat form."""
    question = {"role": "user", "content": prompt}
    if form == "chat":
        return [question]
    if form == "sys":
        return [{"role": "system", "content": OPERATOR_SYSTEM}, question]
    if form == "multi":
        first, reply = FIRST_EXCHANGE
        return [{"role": "user", "content": first}, {"role": "assistant", "content": reply}, question]
    raise ValueError(f"{form!r} is not a chat form ({', '.join(CHAT_FORMS)})")


def format_as(host: ModelHost, prompt: str, form: Form) -> str:
    """The text the model sees for `prompt` asked in `form`."""
    if form == "plain":
        return prompt
    return host.chat.render(conversation(prompt, form))


def encode_as(host: ModelHost, prompt: str, form: Form) -> list[int]:
    # A chat template writes its own special tokens; do not add another BOS on top.
    return host.encode(format_as(host, prompt, form), special=form == "plain")


def question_features(host: ModelHost, editor: Editor, questions: Sequence[tuple[str, Form]],
                      chunk: int = 32) -> list[dict[str, Any]] | None:  # fmt: skip
    """The routing features (`Editor.routing_features`) of (prompt, form) questions, one dict
    per `chunk` rows in order; None when the backend has none."""
    features = []
    for start in range(0, len(questions), chunk):
        encoded = [encode_as(host, prompt, form) for prompt, form in questions[start : start + chunk]]
        got = editor.routing_features(*left_padded_ids(host, encoded))
        if got is None:
            return None
        features.append(got)
    return features


def answers(
    host: ModelHost,
    editor: Editor | None,
    prompts: Sequence[str],
    form: Form,
    targets: Sequence[str | None] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 16,
) -> list[Answer]:
    """Greedy answers (KV cache, left-padded batches) to `prompts` asked in `form`."""
    targets = list(targets) if targets is not None else [None] * len(prompts)
    return ask(host, editor, [(p, form, t) for p, t in zip(prompts, targets, strict=True)], max_new_tokens, batch_size)


def ask(
    host: ModelHost,
    editor: Editor | None,
    questions: Sequence[tuple[str, Form, str | None]],
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 16,
    *,
    decided: bool = False,
) -> list[Answer]:
    """Greedy answers to (prompt, form, target) questions, forms mixed in one batch (a row's
    tokens do not depend on its batch: the contract suite proves it). `decided`: each row
    is decoded only as far as its verdict needs (module doc)."""
    encoded = [encode_as(host, prompt, form) for prompt, form, _ in questions]
    # Batched by length (less padding to run); a row's tokens do not depend on its batch.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    tokens: list[list[int]] = [[] for _ in encoded]
    if decided:
        targets = [questions[i][2] for i in order]
        generated = _decode_decided(host, editor, [encoded[i] for i in order], targets, max_new_tokens, batch_size)
    else:
        generated = generate_ids(host, editor, [encoded[i] for i in order], max_new_tokens, batch_size)
    for i, row in zip(order, generated, strict=True):
        tokens[i] = row
    return [
        Answer(prompt=p, form=form, text=host.tokenizer.decode(t, skip_special_tokens=True), tokens=tuple(t), target=target)
        for (p, form, target), t in zip(questions, tokens, strict=True)
    ]


def _decode_decided(host: ModelHost, editor: Editor | None, encoded: Sequence[list[int]], targets: Sequence[str | None],
                    max_new_tokens: int, batch_size: int) -> list[list[int]]:  # fmt: skip
    """Rows decoded until their verdict is fixed: a first pass of `FIRST_PASS` tokens, then
    the rows still undecided again, from their prompt, to `max_new_tokens` (module doc)."""
    decode = host.tokenizer.decode
    eos = host.tokenizer.eos_token_id

    def done(i: int, new: Sequence[int]) -> bool:
        return verdict_fixed(decode(new, skip_special_tokens=True), targets[i])

    first = min(FIRST_PASS, max_new_tokens)
    rows = generate_ids(host, editor, encoded, first, batch_size, done=done)
    again = [i for i, row in enumerate(rows) if len(row) == first and (eos is None or eos not in row) and not done(i, row)]
    if again and max_new_tokens > first:
        later = generate_ids(host, editor, [encoded[i] for i in again], max_new_tokens, batch_size,
                             done=lambda k, new: done(again[k], new))  # fmt: skip
        for i, row in zip(again, later, strict=True):
            rows[i] = row
    return rows
