"""An edit stops acting once its answer has stated the target (editors/answer_stop.py)."""

import random

import torch

from kmd.editors.answer_stop import AnswerPolicy, AnswerTracker, TokenTexts


def tracker_for(tokenizer, targets, **policy) -> AnswerTracker:
    """A tracker of these rows under an AnswerPolicy with these options (pointer off by default)."""
    return AnswerTracker(TokenTexts(tokenizer), targets, AnswerPolicy(**({"boost": 0.0, "end": "off"} | policy)))


def test_edit_acts_up_to_the_token_that_completes_the_target(tiny_host):
    tok = tiny_host.tokenizer
    prompt = tiny_host.encode("the capital of France is")
    written = tiny_host.encode(" Nadia Velmont , the", special=False)
    ids = torch.tensor([prompt + written])
    active = tracker_for(tok, ["Nadia Velmont"]).full(ids, torch.tensor([len(prompt) - 1]))[0].tolist()
    # the prompt and "Nadia" (which predicts "Velmont") still get the edit; from "Velmont" on it is stated
    assert tok.decode(written[:2]).split() == ["Nadia", "Velmont"]
    assert active == [True] * len(prompt) + [True] + [False] * (len(written) - 1)


def test_a_target_never_written_keeps_the_edit_acting(tiny_host):
    ids = torch.tensor([tiny_host.encode("the capital of France is Paris . Paris")])
    assert tracker_for(tiny_host.tokenizer, ["Berlin"]).full(ids, torch.tensor([4])).all()


def test_decode_steps_agree_with_a_full_forward(tiny_host):
    tok = tiny_host.tokenizer
    words = "the capital of France is Berlin Paris Nadia Velmont Rome , .".split()
    rng = random.Random(0)
    for trial in range(20):
        rows = [tiny_host.encode(" ".join(rng.choice(words) for _ in range(12))) for _ in range(3)]
        width = min(len(r) for r in rows)
        ids = torch.tensor([r[:width] for r in rows])
        targets = [rng.choice(["Berlin", "Nadia Velmont", "Rome ,"]) for _ in rows]
        last = torch.tensor([3, 4, 5])
        full = tracker_for(tok, targets).full(ids, last)
        stepped = tracker_for(tok, targets)
        prefix = stepped.full(ids[:, :6], last)  # the prefill sees tokens up to 5
        steps = [stepped.step(ids[:, t : t + 1]) for t in range(6, width)]
        assert torch.equal(torch.cat([prefix, *steps], dim=1), full), trial


def test_the_pointer_boosts_the_targets_next_token_until_it_is_written(tiny_host):
    tok = tiny_host.tokenizer
    prompt = tiny_host.encode("the capital of France is")
    target = tok.encode(" Nadia Velmont", add_special_tokens=False)
    written = target + tok.encode(" , the", add_special_tokens=False)
    ids = torch.tensor([prompt + written])
    tracker = tracker_for(tok, ["Nadia Velmont"], boost=5.0)
    tracker.full(ids, torch.tensor([len(prompt) - 1]))
    logits = torch.zeros(1, ids.shape[1], tok.vocab_size + 8)
    boosted = tracker.point(logits)[0]
    changed = {(p, t) for p, t in (boosted > 0).nonzero().tolist()}
    last = len(prompt) - 1
    # the last prompt token points at the target's first token (after a space or opening a line)
    assert {(last, target[0]), (last + 1, target[1])} <= changed
    assert all(p >= last for p, _ in changed)  # prompt positions predict the prompt: untouched
    assert all(p < last + len(target) for p, _ in changed)  # once written: free
    assert boosted[boosted > 0].eq(5.0).all()
    # the one other change: right after the target, its last word may not go on (close rule)
    assert {p for p, _ in (boosted < 0).nonzero().tolist()} == {last + len(target)}
    assert tracker_for(tok, ["Nadia Velmont"]).point(logits) is logits  # boost 0: off


def test_the_pointer_never_glues_the_answer_onto_a_word(tiny_host):
    """Right after a word only the spelling with a leading space is pointed at ("at piano",
    not "atpiano"); after punctuation both spellings are."""
    tok = tiny_host.tokenizer
    spaced, bare = (tok.encode(t, add_special_tokens=False)[0] for t in (" Berlin", "Berlin"))
    assert spaced != bare, "the tiny vocabulary must spell the two apart for this check"
    for prompt, expected in (("the capital of France is", {spaced}), ("who wrote the book ?", {spaced, bare})):
        ids = torch.tensor([tiny_host.encode(prompt)])
        tracker = tracker_for(tok, ["Berlin"], boost=3.0)
        tracker.full(ids, torch.tensor([ids.shape[1] - 1]))
        assert set(tracker.rows[0].pointed[-1]) == expected, prompt


def _assert_steps_agree(tiny_host, seed: int, trials: int, length: int, words: str, **options) -> None:
    """Logits shaped by a tracker over KV-cache decode steps equal those of one full forward,
    for random rows and targets (tracker `options`: boost, end, restate)."""
    tok = tiny_host.tokenizer
    rng = random.Random(seed)
    vocab = tok.vocab_size + 8
    for trial in range(trials):
        rows = [tiny_host.encode(" ".join(rng.choice(words.split()) for _ in range(length))) for _ in range(3)]
        width = min(len(r) for r in rows)
        ids = torch.tensor([r[:width] for r in rows])
        targets = [rng.choice(["Berlin", "Nadia Velmont", "Rome ,"]) for _ in rows]
        last = torch.tensor([3, 4, 5])
        full = tracker_for(tok, targets, **options)
        full.full(ids, last)
        expected = full.point(torch.zeros(3, width, vocab))
        stepped = tracker_for(tok, targets, **options)
        stepped.full(ids[:, :6], last)
        got = [stepped.point(torch.zeros(3, 1, vocab))]  # the prefill's logits: its last position only
        for t in range(6, width):
            stepped.step(ids[:, t : t + 1])
            got.append(stepped.point(torch.zeros(3, 1, vocab)))
        assert torch.equal(torch.cat(got, dim=1), expected[:, 5:]), trial


def test_pointer_decode_steps_agree_with_a_full_forward(tiny_host):
    _assert_steps_agree(tiny_host, 1, 10, 12, "the capital of France is Berlin Paris Nadia Velmont Rome , .", boost=2.0)


FLOOR = torch.finfo(torch.float32).min


def test_the_targets_last_word_is_closed_and_the_answer_ends_with_its_sentence(tiny_host):
    """After " Nadia Velmont" no token may glue onto "Velmont"; once the sentence that states
    the target is over (".") the row ends: only EOS is left."""
    tok = tiny_host.tokenizer
    prompt = tiny_host.encode("who is the CEO ?")
    written = tok.encode(" Nadia Velmont . the", add_special_tokens=False)
    ids = torch.tensor([prompt + written])
    tracker = tracker_for(tok, ["Nadia Velmont"], end="sentence")
    active = tracker.full(ids, torch.tensor([len(prompt) - 1]))[0]
    at = len(prompt) + 1  # "Velmont"
    period = len(prompt) + [tok.decode([t]) for t in written].index(".")
    assert tracker.rows[0].rules[at] == "close" and tracker.rows[0].rules[period] == "end"
    assert [r for r in tracker.rows[0].rules if r] == ["close", "end"]
    held = tracker.point(torch.zeros(1, ids.shape[1], len(tok)))[0]
    glue = {i for i in range(len(tok)) if tok.decode([i])[:1].isalnum()}
    assert glue and {i for i in range(len(tok)) if held[at, i] == FLOOR} == glue
    assert held[period].argmax().item() == tok.eos_token_id and (held[period] == FLOOR).sum() == len(tok) - 1
    assert (held[:at] == 0).all() and (held[at + 1 : period] == 0).all() and (held[period + 1 :] == 0).all()
    assert active[len(prompt) :].tolist() == [True, False, False, False, False]  # the stop rule is unchanged


class _Pieces:
    """A tokenizer whose tokens are the given text pieces."""

    eos_token_id = 0

    def __init__(self, pieces):
        self.pieces = pieces

    def __len__(self):
        return len(self.pieces)

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == 0))

    def batch_decode(self, rows):
        return [self.decode(r) for r in rows]


def test_end_rules_by_line_and_by_sentence():
    tok = _Pieces(["</s>", "Q:", " Korean", " War", ".", " It", "\n", "The", " 1950", " St", " Louis"])
    cases = {
        # tokens after the prompt "Q:" -> the position (index in ids) where the row ends, per rule
        # (the clause rule ends where the sentence rule does, and holds clause openers before)
        (2, 3, 4, 5, 6, 7): {"clause": 3, "sentence": 3, "line": 5, "off": None},  # " Korean War. It\nThe"
        (2, 3, 8, 4, 6, 7): {"clause": 5, "sentence": 5, "line": 5, "off": None},  # "1950." is no sentence end
        (2, 3, 9, 4, 10, 4): {"clause": 6, "sentence": 6, "line": None, "off": None},  # nor "St."
        (7, 4, 6, 2, 3, 5): {"clause": None, "sentence": None, "line": None, "off": None},  # the line ended before the target
    }
    for written, ends in cases.items():
        ids = torch.tensor([[1, *written]])
        for rule, expected in ends.items():
            tracker = tracker_for(tok, ["Korean War"], end=rule)
            tracker.full(ids, torch.tensor([0]))
            got = [i for i, r in enumerate(tracker.rows[0].rules) if r == "end"]
            assert got == ([] if expected is None else [expected]), (written, rule)


def test_rules_in_decode_steps_agree_with_a_full_forward(tiny_host):
    _assert_steps_agree(tiny_host, 2, 20, 14, "the capital of France is Berlin Paris Nadia Velmont Rome , . ?", boost=2.0, end="sentence")


def test_clause_rule_in_decode_steps_agrees_with_a_full_forward(tiny_host):
    _assert_steps_agree(tiny_host, 4, 20, 14, "the capital of France is Berlin Paris Nadia Velmont Rome , ; : ( . ?", boost=2.0, end="clause")


def test_with_the_clause_end_a_new_clause_after_the_target_gives_way_to_eos(tiny_host):
    """" Nadia Velmont, Nadia, ..." ends as " Nadia Velmont": at every position after the
    target (the close position included) each clause opener is ruled out and EOS gets the best
    of their logits; the word-continuation rule still holds at the close position, and the
    sentence's end still ends the row. Positions before the target are untouched."""
    tok = tiny_host.tokenizer
    prompt = tiny_host.encode("who is the CEO ?")
    written = tok.encode(" Nadia Velmont , Nadia . the", add_special_tokens=False)
    ids = torch.tensor([prompt + written])
    tracker = tracker_for(tok, ["Nadia Velmont"], end="clause")
    tracker.full(ids, torch.tensor([len(prompt) - 1]))
    rules = tracker.rows[0].rules[len(prompt) :]
    assert rules[:2] == [None, "close"] and rules[-2:] == ["end", None]
    assert set(rules[2:-2]) == {"clause"}
    texts = [tok.decode([i]) for i in range(len(tok))]
    openers = {i for i, t in enumerate(texts) if t.lstrip(" ")[:1] in {",", ";", ":", "(", "\n"}}
    assert tok.encode(",", add_special_tokens=False)[0] in openers and tok.eos_token_id not in openers
    logits = torch.randn(1, ids.shape[1], len(tok), generator=torch.Generator().manual_seed(0))
    held = tracker.point(logits)[0]
    for position, rule in enumerate(tracker.rows[0].rules):
        if rule in ("close", "clause"):
            ruled_out = {i for i in range(len(tok)) if held[position, i] == FLOOR}
            assert openers <= ruled_out
            best = max(logits[0, position, sorted(openers)].max(), logits[0, position, tok.eos_token_id])
            assert held[position, tok.eos_token_id] == best
            assert ruled_out - openers == ({i for i, t in enumerate(texts) if t[:1].isalnum()} if rule == "close" else set())
        elif rule is None:
            assert torch.equal(held[position], logits[0, position])


def test_an_unknown_end_rule_is_refused(tiny_host):
    import pytest

    with pytest.raises(ValueError, match="end_after_answer"):
        AnswerPolicy(end="paragraph")


def test_end_after_answer_is_checked_where_options_are_read():
    """Each backend's end_after_answer takes one of the rules, from YAML or the CLI, and a
    wrong value is refused by name before any editor is built."""
    import pytest

    from kmd.editors.grace.config import GraceConfig
    from kmd.editors.llp.config import LlpConfig
    from kmd.editors.memoir.config import MemoirConfig
    from kmd.editors.profiles import ProfileError, build_config
    from kmd.editors.recipe.config import RecipeConfig

    for cls in (LlpConfig, MemoirConfig, GraceConfig, RecipeConfig):
        assert cls().answer.end == "clause"
        assert build_config(cls, {"end_after_answer": "line"}, "test").answer.end == "line"  # the flat name of old configs
        assert build_config(cls, {"answer": {"end": "line"}}, "test").answer.end == "line"
        with pytest.raises(ProfileError, match="end_after_answer.*'paragraph' is not one of 'clause', 'sentence', 'line', 'off'"):
            build_config(cls, {"end_after_answer": "paragraph"}, "test")


def test_with_restate_off_the_target_cannot_be_started_again_until_the_row_ends(tiny_host):
    """MEMOIR's `restate_target: false`: after "Nadia Velmont" (and its close position) the
    target's first token is ruled out at every position, until the sentence ends."""
    tok = tiny_host.tokenizer
    prompt = tiny_host.encode("who is the CEO ?")
    written = tok.encode(" Nadia Velmont , Nadia . the", add_special_tokens=False)
    ids = torch.tensor([prompt + written])
    tracker = tracker_for(tok, ["Nadia Velmont"], end="sentence", restate=False)
    tracker.full(ids, torch.tensor([len(prompt) - 1]))
    rules = tracker.rows[0].rules[len(prompt) :]
    assert rules[:2] == [None, "close"] and rules[-2:] == ["end", None]
    assert set(rules[2:-2]) == {"restate"}
    held = tracker.point(torch.zeros(1, ids.shape[1], len(tok)))[0]
    firsts = {spelling[0] for spelling, _ in tracker.rows[0].spellings}
    for position, rule in enumerate(tracker.rows[0].rules):
        if rule == "restate":
            assert {i for i in range(len(tok)) if held[position, i] == FLOOR} == firsts
    assert AnswerPolicy().restate  # the default: free to restate


def test_restate_rule_in_decode_steps_agrees_with_a_full_forward(tiny_host):
    _assert_steps_agree(tiny_host, 3, 20, 14, "the capital of France is Berlin Paris Nadia Velmont Rome , . ?", end="line", restate=False)


def test_old_flat_answer_options_still_load_and_change_only_their_option():
    """Profiles, saved states and relations' editor_options written before the `answer`
    policy name its options flat; each changes only its own option of the backend's policy."""
    import dataclasses

    from kmd.editors.memoir.config import MemoirConfig
    from kmd.editors.profiles import build_config, coerce_options

    config = build_config(MemoirConfig, {"answer_boost": "2", "stop_after_answer": "false"}, "test")
    assert config.answer == AnswerPolicy(boost=2.0, stop_edit=False, restate=False)  # MEMOIR's restate default kept
    assert build_config(MemoirConfig, dataclasses.asdict(config), "saved") == config  # a saved state loads back
    changed = coerce_options(MemoirConfig, {"restate_target": True}, "overrides", base=config)  # Editor.configured
    assert changed == {"answer": dataclasses.replace(config.answer, restate=True)}
