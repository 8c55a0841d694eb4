"""The served-answer rules (`lifelong-served/v1`) and generation in both forms."""

from kmd.editors.answers import Answer, answer_line, answers, hits, is_degenerate, normalise


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
