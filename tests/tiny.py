"""A tiny random Llama and a word-level tokenizer, built from code (no downloads).

Saved with `save_pretrained`, so a fresh process can load the very same model by path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WORDS = (
    "the a an of in is was who what where which city capital country language river "
    "France Paris Berlin Germany Rome Italy Spain Madrid London England Tokyo Japan "
    "team plays for born works speaks wrote painted mother father president company "
    "founded CEO apple banana cherry red green blue one two three four five six seven "
    "dog cat bird fish tree sky sun moon star ocean mountain book music song film "
    "Alice Bob Carol Dave Eve Zorbland Quexia Velmont Lutz Orin Pavel Nadia x y z"
).split()


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in WORDS + ["?", ".", ","]:
        for form in (word, "\u2581" + word):
            vocab.setdefault(form, len(vocab))
    vocab.setdefault("\u2581", len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never"), pre_tokenizers.Punctuation()]
    )
    core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def build_model(vocab_size: int, seed: int = 0, layers: int = 4):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.3,  # large enough that different prompts get different answers
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_byte_tokenizer(special_tokens: list[str], chat_template: str):
    """A byte-level tokenizer (one token per byte, no merges: any text round-trips) with these
    special tokens and chat template, for parsing the chat formats of other model families."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens})
    tokenizer.chat_template = chat_template
    return tokenizer


# A chat template in the tiny vocabulary (the tiny tokenizer has none of its own): the
# fixed text "<s>" before each message and " ?" after it, " x" opening the reply
# (`kmd.editors.chat` finds the latest user message between them).
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }} ?{% endfor %}{% if add_generation_prompt %} x{% endif %}"


@contextmanager
def chat_template(host, template: str = CHAT_TEMPLATE) -> Iterator[None]:
    """`host`'s tokenizer with `template` as its chat template for the block."""
    saved = getattr(host.tokenizer, "chat_template", None)
    host.tokenizer.chat_template = template
    try:
        yield
    finally:
        host.tokenizer.chat_template = saved
