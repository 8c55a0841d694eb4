"""Served answers: what a user reads, and how it is judged (`lifelong-served/v1`).

A prompt is asked in one of two forms: `plain` (the text as is) or `chat` (a user turn
through the tokenizer's chat template, generation prompt added). The model answers
greedily with the KV cache, batched as the server batches, and the continuation is
judged by three rules:

- answer   the first non-empty line of the continuation;
- hit      the normalised target (lowercase, punctuation to spaces) occurs in the
           normalised answer as a whole-word sequence;
- degenerate  some word bigram occurs 3+ times in the whole continuation, or the
           target occurs 3+ times in it.

A prompt is correct when it hits and is not degenerate.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from kmd.editors.scoring import generate_ids

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import Editor

Form = Literal["plain", "chat"]
SERVED_PROTOCOL = "lifelong-served/v1"
MAX_NEW_TOKENS = 32
REPEAT_LIMIT = 3  # a bigram (or the target) this many times makes a continuation degenerate

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
    words = normalise(continuation)
    bigrams = Counter(zip(words, words[1:]))
    if bigrams and max(bigrams.values()) >= REPEAT_LIMIT:
        return True
    return bool(target) and _occurrences(words, normalise(target)) >= REPEAT_LIMIT


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
    return bool(getattr(host.tokenizer, "chat_template", None))


def format_as(host: ModelHost, prompt: str, form: Form) -> str:
    """The text the model sees for `prompt` asked in `form`."""
    if form == "plain":
        return prompt
    if not has_chat_template(host):
        raise ValueError(f"{host.identity.name_or_path}: the tokenizer has no chat template")
    return host.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def encode_as(host: ModelHost, prompt: str, form: Form) -> list[int]:
    # A chat template writes its own special tokens; do not add another BOS on top.
    return host.encode(format_as(host, prompt, form), special=form == "plain")


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
) -> list[Answer]:
    """Greedy answers to (prompt, form, target) questions, forms mixed in one batch (a row's
    tokens do not depend on its batch: the contract suite proves it)."""
    encoded = [encode_as(host, prompt, form) for prompt, form, _ in questions]
    tokens = generate_ids(host, editor, encoded, max_new_tokens, batch_size)
    return [
        Answer(prompt=p, form=form, text=host.tokenizer.decode(t, skip_special_tokens=True), tokens=tuple(t), target=target)
        for (p, form, target), t in zip(questions, tokens, strict=True)
    ]


ChatFrame = tuple[list[int], list[int]]  # token ids the chat template puts before / after a user message


def chat_frame(host: ModelHost) -> ChatFrame | None:
    """The chat template's fixed text around one user message, as token ids (None: no
    template, or one whose text does not tokenise apart from the message)."""
    if not has_chat_template(host):
        return None
    sentinel = "kmd-user-message"
    head, found, tail = format_as(host, sentinel, "chat").partition(sentinel)
    if not found:
        return None
    frame = (host.encode(head, special=False), host.encode(tail, special=False))
    probe = encode_as(host, "The capital of France is", "chat")
    if probe[: len(frame[0])] != frame[0] or probe[len(probe) - len(frame[1]) :] != frame[1]:
        return None
    return frame


def user_tokens(ids: torch.Tensor, prompt_mask: torch.Tensor, frame: ChatFrame | None) -> torch.Tensor:
    """ids, prompt_mask (B, T) -> (B, T) bool: the prompt tokens a user wrote. Rows whose prompt
    is a chat-template turn lose the template's fixed text (system prompt, role markers), so
    retrieval keys on the question, not on text every chat prompt shares; other rows keep
    their whole prompt."""
    out = prompt_mask.clone()
    if frame is None:
        return out
    head, tail = frame
    for row in range(ids.shape[0]):
        positions = prompt_mask[row].nonzero().flatten()
        tokens = ids[row, positions].tolist()
        if len(tokens) > len(head) + len(tail) and tokens[: len(head)] == head and tokens[len(tokens) - len(tail) :] == tail:
            out[row] = False
            out[row, positions[len(head) : len(tokens) - len(tail)]] = True
    return out


def chat_user_tokens(host: ModelHost, ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """`user_tokens` with the host's chat frame, found once per tokenizer and template (kept
    on the tokenizer, so every backend and fork shares it, and a new template is seen)."""
    tokenizer = host.tokenizer
    template = getattr(tokenizer, "chat_template", None)
    cached = getattr(tokenizer, "_kmd_chat_frame", None)
    if cached is None or cached[0] != template:
        cached = (template, chat_frame(host))
        tokenizer._kmd_chat_frame = cached
    return user_tokens(ids, prompt_mask, cached[1])


def chat_turn_messages(tokenizer, ids: torch.Tensor, prompt_mask: torch.Tensor, users: torch.Tensor) -> list[tuple[int, str]]:
    """(row, the user's message as text) for each chat-turn row of a batch: the rows whose
    `users` mask (from `user_tokens`) is narrower than their prompt. Backends that route a
    chat turn by its message run alone (as a bare prompt is when an edit is made) run these
    texts one at a time, so a row's decision never depends on its batch."""
    rows = (users != prompt_mask).any(dim=1).nonzero().flatten().tolist()
    return [(row, tokenizer.decode(ids[row, users[row]].tolist())) for row in rows]
