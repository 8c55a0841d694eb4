"""An edit stops acting once its answer has stated the target (editors/answer_stop.py)."""

import random

import torch

from kmd.editors.answer_stop import AnswerTracker


def test_edit_acts_up_to_the_token_that_completes_the_target(tiny_host):
    tok = tiny_host.tokenizer
    prompt = tiny_host.encode("the capital of France is")
    written = tiny_host.encode(" Nadia Velmont , the", special=False)
    ids = torch.tensor([prompt + written])
    active = AnswerTracker(tok, ["Nadia Velmont"]).full(ids, torch.tensor([len(prompt) - 1]))[0].tolist()
    # the prompt and "Nadia" (which predicts "Velmont") still get the edit; from "Velmont" on it is stated
    assert tok.decode(written[:2]).split() == ["Nadia", "Velmont"]
    assert active == [True] * len(prompt) + [True] + [False] * (len(written) - 1)


def test_a_target_never_written_keeps_the_edit_acting(tiny_host):
    ids = torch.tensor([tiny_host.encode("the capital of France is Paris . Paris")])
    assert AnswerTracker(tiny_host.tokenizer, ["Berlin"]).full(ids, torch.tensor([4])).all()


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
        full = AnswerTracker(tok, targets).full(ids, last)
        stepped = AnswerTracker(tok, targets)
        prefix = stepped.full(ids[:, :6], last)  # the prefill sees tokens up to 5
        steps = [stepped.step(ids[:, t : t + 1]) for t in range(6, width)]
        assert torch.equal(torch.cat([prefix, *steps], dim=1), full), trial
