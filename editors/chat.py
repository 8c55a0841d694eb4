"""Conversations through a tokenizer's chat template, and the latest user message found
again in any rendered conversation.

Everything that turns messages into a prompt goes through `ChatFormat.render` (the
OpenAI endpoints, the benchmark's chat forms, the daemon's probes), and everything that
routes a chat prompt to an edit reads the question through `ChatFormat.turns`. Routing
keys on the latest user message, whatever the system prompt, the number of turns and the
model family's template.

How the message is found: the template's role structure is learnt once per template by
rendering conversations of sentinel messages (`Anatomy.learn`):

- `user_open`: the text that opens a user message ("<|im_start|>user\\n" in ChatML,
  "<|start_header_id|>user<|end_header_id|>\\n\\n" in Llama-3, "[INST] " in Mistral,
  "<start_of_turn>user\\n" in Gemma);
- `reply_open`: the text after the latest user message when the reply is opened (its
  close, then the assistant's header);
- `system_join`: for templates that write the system prompt into a user message
  (Mistral, Gemma, Llama-2), the text between the two ("\\n\\n").

A prompt is a chat turn when its text (token ids decoded with special tokens) ends with
`reply_open`; its question is the text between the last `user_open` before that and the
end (after the last `system_join` when the template merges the system prompt in). Marker
text is matched with any run of whitespace standing for any other (tokenizers differ in
the spaces they restore around special tokens). Rows that are not chat turns keep their
whole prompt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": text}
ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, or its template refused the messages."""


def _sentinel(name: str) -> str:
    return f"kmdsentinel{name}kmd"


@dataclass(frozen=True)
class Anatomy:
    """The fixed text a chat template writes around user messages (module doc)."""

    user_open: str
    reply_open: str
    system_join: str | None = None

    @classmethod
    def learn(cls, render, specials: Sequence[str] = ()) -> Anatomy | None:
        """From `render(messages) -> text` (reply opened) and the tokenizer's special tokens;
        None when the template does not show its structure (no user or reply marker, or
        messages it does not write)."""
        u1, a1, u2, s = (_sentinel(n) for n in ("userone", "assistantone", "usertwo", "system"))
        try:
            single = render([{"role": "user", "content": u1}])
            multi = render([{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                            {"role": "user", "content": u2}])  # fmt: skip
        except ChatTemplateError:
            return None
        if single.count(u1) != 1 or multi.count(u2) != 1 or a1 not in multi:
            return None
        reply_open = single[single.index(u1) + len(u1) :]
        if multi[multi.index(u2) + len(u2) :] != reply_open or not reply_open.strip():
            return None
        between = multi[multi.index(a1) + len(a1) : multi.index(u2)]
        user_open = _from_marker(_common_suffix(single[: single.index(u1)], between), specials)
        if not user_open.strip():
            return None
        system_join = None
        try:
            with_system = render([{"role": "system", "content": s}, {"role": "user", "content": u1}])
        except ChatTemplateError:
            with_system = ""
        if s in with_system and u1 in with_system:
            head = with_system[: with_system.index(u1)]
            opened = head.rfind(user_open)
            if opened >= 0 and s in head[opened:]:  # the system prompt is written into the user message
                system_join = head[head.index(s) + len(s) :]
        return cls(user_open=user_open, reply_open=reply_open, system_join=system_join or None)

    def question_span(self, text: str) -> tuple[int, int] | None:
        """(start, end) of the latest user message's question in a rendered prompt, or None
        when `text` is not a chat turn of this template."""
        tail = _loose(self.reply_open, end=True).search(text)
        if tail is None:
            return None
        opened = None
        for opened in _loose(self.user_open).finditer(text, 0, tail.start()):
            pass
        if opened is None:
            return None
        start, end = opened.end(), tail.start()
        if self.system_join:
            joins = list(_loose(self.system_join).finditer(text, start, end))
            if joins:
                start = joins[-1].end()
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        return (start, end) if end > start else None


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n :]


def _from_marker(text: str, specials: Sequence[str]) -> str:
    """`text` from its first special token on ("os>[INST] " -> "[INST] ": a common suffix
    can start inside the tokens that end the text before it)."""
    starts = [text.find(t) for t in specials if t and t in text]
    return text[min(starts) :] if starts else text


def _loose(marker: str, end: bool = False) -> re.Pattern[str]:
    """A pattern for `marker` where any run of whitespace (or none, at its ends) stands for
    any other: tokenizers differ in the spaces they restore around special tokens."""
    parts = [re.escape(p) for p in marker.split()]
    body = r"\s*" + r"\s+".join(parts) + r"\s*" if parts else re.escape(marker)  # whitespace alone: as written
    return re.compile(body + (r"\Z" if end else ""))


@dataclass(frozen=True)
class Turns:
    """The chat turns of a batch: `mask` (B, T) bool, the tokens a question occupies in
    chat-turn rows and the whole prompt in other rows; `messages`, (row, question text) for
    each chat-turn row."""

    mask: torch.Tensor
    messages: list[tuple[int, str]]


class ChatFormat:
    """A tokenizer's chat template: render conversations, and find their latest user
    message in token ids. The anatomy is learnt again when the template changes."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._learnt: tuple[Any, Anatomy | None] | None = None

    @property
    def available(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as the model sees it, the reply opened (text, special tokens written)."""
        if not self.available:
            raise ChatTemplateError("this model's tokenizer has no chat template")
        conversation = []
        for index, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise ChatTemplateError(f"message {index}: needs a role ({', '.join(ROLES)}) and text content")
            conversation.append({"role": role, "content": content})
        if not conversation:
            raise ChatTemplateError("no messages")
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:  # e.g. roles that must alternate
            raise ChatTemplateError(f"the chat template refused these messages: {exc}") from exc

    def encode(self, messages: Sequence[Message]) -> list[int]:
        # The template writes its own special tokens: no second BOS on top.
        return self.tokenizer(self.render(messages), add_special_tokens=False).input_ids

    def anatomy(self) -> Anatomy | None:
        key = (getattr(self.tokenizer, "chat_template", None), self.tokenizer.bos_token, self.tokenizer.eos_token)
        if self._learnt is None or self._learnt[0] != key:
            specials = list(getattr(self.tokenizer, "all_special_tokens", []))
            self._learnt = (key, Anatomy.learn(self.render, specials) if self.available else None)
        return self._learnt[1]

    def question(self, ids: Sequence[int]) -> tuple[str, int, int] | None:
        """For one prompt's token ids: (the latest user message's question, its first and
        end token index), or None when the prompt is not a chat turn."""
        ids = list(ids)
        found = self._find(ids)
        if found is None:
            return None
        text, (start, end) = found
        first, stop = self._token_at(ids, start), self._token_at(ids, end - 1) + 1
        return text[start:end], first, stop

    def question_text(self, ids: Sequence[int]) -> str | None:
        """The latest user message's question in one prompt's token ids (None: not a chat turn)."""
        found = self._find(list(ids))
        return None if found is None else found[0][found[1][0] : found[1][1]]

    def _find(self, ids: list[int]) -> tuple[str, tuple[int, int]] | None:
        """(the prompt's decoded text, the question's character span in it) or None."""
        anatomy = self.anatomy()
        if anatomy is None or not ids:
            return None
        text = self._decode(ids)
        span = anatomy.question_span(text)
        return None if span is None else (text, span)

    def turns(self, ids: torch.Tensor, prompt_mask: torch.Tensor) -> Turns:
        """ids, prompt_mask (B, T) -> the batch's chat turns (`Turns`)."""
        mask = prompt_mask.clone()
        messages: list[tuple[int, str]] = []
        if self.anatomy() is None:
            return Turns(mask, messages)
        for row in range(ids.shape[0]):
            positions = prompt_mask[row].nonzero().flatten()
            found = self.question(ids[row, positions].tolist())
            if found is None:
                continue
            text, first, end = found
            mask[row] = False
            mask[row, positions[first:end]] = True
            messages.append((row, text))
        return Turns(mask, messages)

    def questions(self, ids: torch.Tensor, prompt_mask: torch.Tensor, rows: Sequence[int] | None = None) -> list[str]:
        """ids, prompt_mask (B, T) -> per row (of `rows`, default every row) the question it
        asks: a chat turn's latest user message, else its whole prompt as text."""
        rows = range(ids.shape[0]) if rows is None else rows
        out = []
        for row in rows:
            tokens = ids[row, prompt_mask[row]].tolist()
            text = self.question_text(tokens)
            text = text if text is not None else self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            out.append(text or " ")
        return out

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _token_at(self, ids: list[int], char: int) -> int:
        """The index of the token whose decoded text covers character `char` of the decoded
        prompt (binary search over decoded prefixes: log2(T) decodes)."""
        lo, hi = 0, len(ids) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self._decode(ids[: mid + 1])) > char:
                hi = mid
            else:
                lo = mid + 1
        return lo
