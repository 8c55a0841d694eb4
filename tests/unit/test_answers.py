"""The served-answer rules (`lifelong-served/v1`) and generation in both forms."""

import pytest

from kmd.editors.answers import Answer, answer_line, answers, ask, first_line_over, hits, is_degenerate, normalise, verdict_fixed
from kmd.editors.protocol import EditRequest


def test_normalise_lowercases_and_drops_punctuation():
    assert normalise("Nadia  Velmont, Jr.") == ["nadia", "velmont", "jr"]


def test_answer_is_the_first_non_empty_line():
    assert answer_line("\n  Fredville.\nQuestion: what") == "Fredville."


def test_hit_needs_the_whole_word_sequence():
    assert hits("The capital is Fredville.", "Fredville")
    assert hits("It is run by NADIA VELMONT", "Nadia Velmont")
    assert not hits("Fredvillevilleville", "Fredville")
    assert not hits("Nadia is the CEO", "Nadia Velmont")


def test_degenerate_repeats():
    assert is_degenerate("Rome of Rome of Rome of Rome of")
    assert is_degenerate("Korean War. Korean War, Korean War", "Korean War")
    assert not is_degenerate("The Eiffel Tower is in Rome, the capital of Italy.", "Rome")


def test_correct_is_hit_and_not_degenerate():
    good = Answer("p", "plain", " Rome, the capital of Italy.", (), target="Rome")
    bad = Answer("p", "plain", " Rome of Rome of Rome of", (), target="Rome")
    assert good.correct and bad.hit and not bad.correct


def test_answers_plain_match_generate(tiny_host):
    from kmd.editors.scoring import generate

    got = answers(tiny_host, None, ["the capital of France is", "who wrote the book ?"], "plain", max_new_tokens=5)
    assert [list(a.tokens) for a in got] == generate(tiny_host, None, ["the capital of France is", "who wrote the book ?"], 5)


# ----- decoding only as far as the verdict needs (`ask(..., decided=True)`) -----------------------


@pytest.fixture(scope="module")
def byte_host(tmp_path_factory):
    """A tiny random model on a byte-level tokenizer: a line break is a token, so answers
    have lines (the word-level tiny tokenizer has no line break)."""
    from kmd.editors.model import ModelHost, ModelSettings
    from tiny import build_byte_tokenizer, build_model

    directory = tmp_path_factory.mktemp("byte-model")
    tokenizer = build_byte_tokenizer([], "")
    build_model(len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return ModelHost.load(ModelSettings(model=str(directory), device="cpu"))


def test_decoding_as_far_as_the_verdict_needs_gives_the_full_decode_verdicts(byte_host):
    """A few fake edits force answers that hit and go on, miss on a finished line, repeat
    the target or a word pair; each row judged against several targets (and none, as a
    same-subject question is): the verdicts are those of the full decode, and the rows
    whose verdict was known early stopped early."""
    from kmd.editors.fake import FakeEditor

    editor = FakeEditor(byte_host)
    forced = {"the capital of France is": "Rome.\nQuestion: and then", "the motto of Spain is": "moon moon moon moon moon",
              "who wrote the book": "Alice wrote it.", "the river of Italy is": "Po, Po river, Po river, Po river"}  # fmt: skip
    for n, (prompt, target) in enumerate(forced.items(), 1):
        editor.apply(EditRequest(prompt=prompt, target=target, edit_id=str(n)))
    try:
        prompts = [*forced, "the sky is", "what is the capital of Japan"]
        judged = ["Rome", "Paris", "moon", "sun", "Alice", "Po", "blue", None]
        questions = [(p, form, t) for p in prompts for form in ("plain",) for t in judged]
        full = ask(byte_host, editor, questions)
        early = ask(byte_host, editor, questions, decided=True)
    finally:
        editor.revert_all()
    for f, e in zip(full, early, strict=True):
        assert e.correct == f.correct, (f.prompt, f.target, f.text, e.text)
        assert e.tokens == f.tokens[: len(e.tokens)]  # a prefix of the full decode
        if f.target is None or first_line_over(e.text):  # stopped on a finished line, or decoded on: its line
            assert e.line == f.line and e.hit == f.hit
    stopped = {(e.prompt, e.target) for f, e in zip(full, early, strict=True) if len(e.tokens) < len(f.tokens)}
    assert ("the capital of France is", "Paris") in stopped and ("the capital of France is", None) in stopped
    assert ("the motto of Spain is", "moon") in stopped and ("the river of Italy is", "Po") in stopped
    assert ("the capital of France is", "Rome") not in stopped  # a hit goes on: a repetition later would count


def test_a_verdict_is_fixed_only_when_no_continuation_can_change_it():
    assert verdict_fixed(" Rome.\n", "Paris") and not verdict_fixed(" Rome.\n", "Rome")
    assert not verdict_fixed(" Rome", "Paris")  # the line may go on: "Rome or Paris"
    assert verdict_fixed(" Rome.\nx", None) and not verdict_fixed(" Rome", None)
    assert verdict_fixed(" moon moon moon x", "moon")  # the target three times: degenerate whatever follows
    assert not verdict_fixed(" moon moon moo", "moon")  # the last word may still become "moon" or not
