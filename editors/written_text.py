"""The text of a growing list of token ids, kept up to date one token at a time.

`tokenizer.decode(tokens, skip_special_tokens=True)` over everything written so far, redone
at every generated token, costs O(n) per token and O(n^2) per answer. `WrittenText` decodes
only the tokens not yet settled, in the context of the few before them, and keeps of the
text only what the answer rules read (editors/answer_stop.py): its length, its words, where
its last line break is, and its tail from the last word boundary on.

Why the pieces add up to the full decode (tests/unit/test_written_text.py checks it on
random and real token sequences):
- A token's bytes may end inside a UTF-8 character; the text then ends in U+FFFD until a
  later token completes it. Text is committed only when it does not end in U+FFFD, i.e. at a
  character boundary, so later tokens never change committed text.
- Some decoders drop a leading space of the first token of a decode call (SentencePiece's
  Strip). New tokens are therefore decoded together with the tokens of the last commit, and
  the text those give alone is cut off (as Hugging Face's TGI streams tokens).
- With `clean_up_tokenization_spaces` the decode joins " ." into "." and the like: patterns
  of up to four characters that start with a space. Text is committed only when a space is
  not among its last four characters, so no pattern straddles a commit.
- The words (`answers.normalise`: NFKC, lower case, punctuation to spaces) of text cut right
  after an ASCII space, tab or line break are the words of each side: no composition,
  case context or word crosses such a character.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kmd.editors.answers import normalise

Decode = Callable[[list[int]], str]  # token ids -> text, as decode(ids, skip_special_tokens=True)

_BREAKS = " \n\t"  # characters after which the words of a text split cleanly (module doc)
_CLEANUP_REACH = 4  # the longest clean-up pattern (" n't")


def word_boundary(text: str) -> int:
    """The last index i > 0 with text[i - 1] a space, tab or line break and text[i] not one
    (0: none): cut there, text[:i] and text[i:] have the words of text between them."""
    for i in range(len(text) - 1, 0, -1):
        if text[i - 1] in _BREAKS and text[i] not in _BREAKS:
            return i
    return 0


@dataclass
class WrittenText:
    """decode(tokens) for the tokens pushed so far, as far as the answer rules read it."""

    cleans_up_spaces: bool = False  # the tokenizer's clean_up_tokenization_spaces
    tokens: list[int] = field(default_factory=list)
    # tokens[:read] are decoded into committed text; tokens[context:read] are decoded again
    # with each new token (module doc), `context_text` being their text alone
    context: int = 0
    read: int = 0
    context_text: str = ""
    # committed text = text[:settled] + settled_tail; text[:settled] is kept only as its words
    # and the index of its last line break
    settled: int = 0
    settled_words: list[str] = field(default_factory=list)
    last_break: int = -1  # index in text of the last "\n" before `settled` (-1: none)
    settled_tail: str = ""
    fresh_words: int = 0  # how many of settled_words the last push settled
    pending: str = ""  # the text of tokens[read:], not committed yet

    @property
    def length(self) -> int:
        """len(text)."""
        return self.settled + len(self.settled_tail) + len(self.pending)

    @property
    def tail(self) -> str:
        """text[settled:]: the text from its last word boundary on (all of it if none). It
        holds the text's last word and any sentence end after it (sentence_over, isalnum)."""
        return self.settled_tail + self.pending

    def recent_words(self, before: int) -> list[str]:
        """normalise(text)[i:]: the words the last push added or changed, and `before` words
        ahead of them. A run of before + 1 words that the last push completed lies inside;
        one that lies wholly in words settled earlier was there at an earlier push."""
        start = max(0, len(self.settled_words) - self.fresh_words - before)
        return self.settled_words[start:] + normalise(self.tail)

    def breaks_line_since(self, start: int) -> bool:
        """'\\n' in text[start:]."""
        return self.last_break >= start or "\n" in self.tail[max(0, start - self.settled) :]

    def push(self, token: int, decode: Decode) -> None:
        """Add one token: decode it with the tokens since the last commit."""
        self.tokens.append(token)
        self.fresh_words = 0
        window = decode(self.tokens[self.context :])
        if not window.startswith(self.context_text):  # a decoder this scheme does not fit: stay exact
            self.pending = decode(self.tokens)[self.settled + len(self.settled_tail) :]
            return
        self.pending = window[len(self.context_text) :]
        if self._can_commit(self.pending):
            self.context, self.read = self.read, len(self.tokens)
            self.context_text = decode(self.tokens[self.context : self.read])
            self._settle(self.settled_tail + self.pending)
            self.pending = ""

    def _can_commit(self, text: str) -> bool:
        """May `text` (after the committed text) be committed: it ends a character, and (with
        the clean-up) no space lies in the last four characters of what would be committed."""
        if not text or text.endswith("\ufffd"):
            return False
        if not self.cleans_up_spaces:
            return True
        end = self.settled_tail + text
        return " " not in end[-_CLEANUP_REACH:] and (len(end) >= _CLEANUP_REACH or self.settled == 0)

    def _settle(self, committed: str) -> None:
        """Committed text after `settled`: keep only the words of what lies before its last word boundary."""
        cut = word_boundary(committed)
        if cut:
            head = committed[:cut]
            words = normalise(head)
            self.settled_words += words
            self.fresh_words = len(words)
            if "\n" in head:
                self.last_break = self.settled + head.rindex("\n")
            self.settled += cut
        self.settled_tail = committed[cut:]
