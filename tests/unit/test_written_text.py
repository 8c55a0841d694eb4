"""The answer tracker decodes each written token once (editors/written_text.py); what it reads
of the text must equal a full decode of everything written, after every token.

Checked on random token sequences (Hypothesis) for tokenizers of each kind the decoding
tricks are for: byte-level BPE (tokens end inside UTF-8 characters), a SentencePiece-style
decoder that drops the first token's leading space, the clean-up of spaces before
punctuation, the tiny word-level test tokenizer, and SmolLM2's own when it is cached. Then
the whole tracker (stop, pointer, end, close and restate rules) against the same tracker
re-decoding everything at every token.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kmd.editors.answer_stop as answer_stop
from kmd.editors.answer_stop import AnswerPolicy, AnswerTracker, TokenTexts, sentence_over
from kmd.editors.answers import normalise
from kmd.editors.written_text import WrittenText

CORPUS = (
    "The capital of France is Paris. Nadia Velmont runs Zorbland's café in São Paulo.\n"
    "Łódź, Kraków and Göteborg; 東京 and 北京 are cities. Don't stop: it's 1950, St. Louis!\n"
    "« Ça va ? » — naïve résumé, coöperate... 🙂🚀 emoji, tabs\tand\nnew lines. "
) * 4


def _byte_level(cleanup: bool = False):
    """A small byte-level BPE trained here (no download): many tokens end mid-character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", clean_up_tokenization_spaces=cleanup)


def _sentencepiece_like():
    """Metaspace with the leading space of a decode's first token dropped (Llama 2, Mistral)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])  # fmt: skip
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"] + [f"<0x{b:02X}>" for b in range(256)])
    core.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>")


def _tiny():
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tiny import build_tokenizer

    return build_tokenizer()


def _smollm2():
    found = sorted(Path.home().glob(".cache/kmd/models/smollm2-135m-instruct-*/tokenizer.json"))
    if not found:
        pytest.skip("SmolLM2's tokenizer is not cached here")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(found[0].parent)


TOKENIZERS = {"byte-level": _byte_level, "byte-level-cleanup": functools.partial(_byte_level, cleanup=True),
              "sentencepiece": _sentencepiece_like, "tiny": _tiny, "smollm2": _smollm2}  # fmt: skip


@functools.cache
def tokenizer(name: str):
    return TOKENIZERS[name]()


def _sequences(tok, draw_from: random.Random, count: int, length: int) -> list[list[int]]:
    """Token sequences: pieces of the corpus encoded (real text), random ids (anything,
    special tokens included), and both mixed."""
    real = tok.encode(CORPUS, add_special_tokens=False)
    out = []
    for _ in range(count):
        start = draw_from.randrange(len(real) - length)
        text = real[start : start + length]
        noise = [draw_from.randrange(len(tok)) for _ in range(length)]
        mixed = [t if draw_from.random() < 0.7 else n for t, n in zip(text, noise)]
        out += [text, noise, mixed]
    return out


def _assert_reads_like_a_full_decode(tok, tokens: list[int]) -> None:
    texts = TokenTexts(tok)
    written = WrittenText(texts.cleans_up_spaces)
    for n, token in enumerate(tokens, 1):
        written.push(token, texts.decode)
        full = texts.decode(tokens[:n])
        assert written.length == len(full), (tokens[:n], full)
        assert full.endswith(written.tail) and (written.tail or not full), (tokens[:n], full)
        assert written.settled_words + normalise(written.tail) == normalise(full), (tokens[:n], full)
        assert sentence_over(written.tail) == sentence_over(full)
        assert written.tail[-1:].isalnum() == full[-1:].isalnum()
        for start in {0, max(0, len(full) - 3), len(full) // 2, written.settled}:
            assert written.breaks_line_since(start) == ("\n" in full[start:]), (full, start)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_written_text_reads_like_a_full_decode(name):
    tok = tokenizer(name)
    for tokens in _sequences(tok, random.Random(0), count=8, length=40):
        _assert_reads_like_a_full_decode(tok, tokens)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["byte-level", "byte-level-cleanup", "sentencepiece"]), data=st.data())
def test_written_text_reads_like_a_full_decode_on_any_tokens(name, data):
    tok = tokenizer(name)
    tokens = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=30))
    _assert_reads_like_a_full_decode(tok, tokens)


class FullDecodeText:
    """The straightforward WrittenText: everything written decoded again at every token."""

    def __init__(self, cleans_up_spaces: bool = False) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self.settled = 0

    def push(self, token, decode) -> None:
        self.tokens.append(token)
        self.text = decode(self.tokens)

    @property
    def length(self) -> int:
        return len(self.text)

    @property
    def tail(self) -> str:
        return self.text

    def recent_words(self, before: int) -> list[str]:
        return normalise(self.text)

    def breaks_line_since(self, start: int) -> bool:
        return "\n" in self.text[start:]


def _run(tok, rows: list[list[int]], targets: list[str], policy: AnswerPolicy, prefill: int):
    """Everything a tracker gives a forward: where the edit acts, and the shaped logits of a
    prefill of `prefill` tokens and then each decode step."""
    ids = torch.tensor(rows)
    last = torch.full((len(rows),), 2)
    tracker = AnswerTracker(TokenTexts(tok), targets, policy)
    vocab = len(tok) + 3
    active = [tracker.full(ids[:, :prefill], last)]
    logits = [tracker.point(torch.zeros(len(rows), prefill, vocab))]
    for t in range(prefill, ids.shape[1]):
        active.append(tracker.step(ids[:, t : t + 1]))
        logits.append(tracker.point(torch.zeros(len(rows), 1, vocab)))
    return torch.cat(active, dim=1), torch.cat(logits, dim=1), [row.rules for row in tracker.rows]


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_the_tracker_gives_what_a_full_decode_at_every_token_gives(name, monkeypatch):
    tok = tokenizer(name)
    draw = random.Random(1)
    policies = [AnswerPolicy(), AnswerPolicy(boost=2.0, end="line", restate=False), AnswerPolicy(boost=0.0, end="off")]
    sequences = _sequences(tok, draw, count=6, length=30)
    checked = 0
    for start in range(0, len(sequences) - 2, 3):
        rows = sequences[start : start + 3]
        # targets the rows do write (a few words of their own text), and one they may not
        targets = [" ".join(tok.decode(row[5:]).split()[:2]) or "Paris" for row in rows[:2]] + ["Paris"]
        for policy in policies:
            incremental = _run(tok, rows, targets, policy, prefill=6)
            with monkeypatch.context() as patch:
                patch.setattr(answer_stop, "WrittenText", FullDecodeText)
                full = _run(tok, rows, targets, policy, prefill=6)
            assert torch.equal(incremental[0], full[0]) and torch.equal(incremental[1], full[1]), (rows, targets, policy)
            assert incremental[2] == full[2]
            checked += int(not incremental[0].all())
    assert checked, "no row ever wrote its target: the check would be empty"
