"""The question check (editors/question_check): the subject rule, the shipped network on the
questions a user asks after a news item, and training end to end on a small set."""

from __future__ import annotations

import random

import pytest
import torch

from kmd.editors.protocol import EditRequest
from kmd.editors.question_check import QuestionCheck, mask_subject, subject_named
from kmd.editors.bench.data import EditRecord, SideQuestion
from kmd.editors.question_check.data import MASK, load_relations, nearest_relations, relation_pairs, template_pairs
from kmd.editors.question_check.model import load_network
from kmd.editors.question_check.train import CheckTrainOptions, threshold_for, train


def test_subject_named_needs_half_the_words_and_allows_plurals():
    assert subject_named("Where is Zorbland Robotics headquartered?", "Zorbland Robotics")
    assert subject_named("Who runs Zorbland?", "Zorbland Robotics")  # half the words
    assert subject_named("Who founded the Karashimas?", "Karashima")  # a plural
    assert not subject_named("The gender of Marie Curie is", "Ingrīda Amantova")
    assert not subject_named("Who runs Rob?", "Zorbland Robotics")  # a prefix under 4 letters is no match
    assert subject_named("anything at all", None)  # no subject: nothing to check
    # a year tells alike subjects apart (LLP's locality misses on KnowEdit before this rule)
    edition = "2001 India International Badminton Championships – mixed doubles"
    assert not subject_named("The country of 1989 Belgian Junior Badminton Championships – mixed doubles is", edition)
    assert subject_named("Where were the 2001 India International Badminton Championships held?", edition)


def test_subject_named_refuses_another_name_that_shares_words():
    """RECIPE answered 29 % of such questions with the edit's target (one word of the edited
    subject replaced, 100 development-set edits)."""
    assert not subject_named("The gender of Darren L Castillo is", "Jose L Castillo")
    assert not subject_named("Who is the CEO of Apple Records?", "Apple Inc")
    assert not subject_named("boxing at the 2010 Asian Games – men's 69 Gasteiger is followed by",
                             "boxing at the 2010 Asian Games – men's 69 kg")  # fmt: skip
    assert not subject_named("The gender of 1981 John Gepp is", "Henry John Gepp")  # a number is a name too
    # the same subject, named in part, spelled otherwise, or with a word inserted
    assert subject_named("Who is the CEO of Apple?", "Apple Inc")
    assert subject_named("Where is Apple based?", "Apple Inc")
    assert subject_named("Is Castillo a woman?", "Jose Castillo")  # a capitalised question word is no name
    assert subject_named("What is Jose Castillo's gender?", "Jose L Castillo")
    assert subject_named("The occupation of Martin Solares is", "Martín Solares")  # accents
    assert subject_named("Where was İsmet Özel born?", "İsmet Özel")
    assert subject_named("The occupation of Douglas W Tallamy is", "Douglas Tallamy")  # a middle initial
    assert subject_named("The employer of F Ortis is", "Fernanda Ortis")  # an initial
    assert subject_named("The place of death of Raymond Walter Wietecha is", "Ray Wietecha")  # a long form
    assert subject_named("What is Khwaja Saeed Hais original country?", "Khwaja Saeed Hai")  # a possessive
    assert subject_named("The name of the capital city of canton of Bagnères-de-Bigorre is", "canton of Bagnères-de-Bigorre")
    assert not subject_named("The name of the capital city of Jae-Duk of Bagnères-de-Bigorre is", "canton of Bagnères-de-Bigorre")


def test_mask_subject_is_whole_and_case_insensitive():
    assert mask_subject("Who is the CEO of zorbland robotics?", "Zorbland Robotics") == f"Who is the CEO of {MASK}?"
    assert mask_subject("맦 is followed by", "맦") == f"{MASK} is followed by"  # a short subject, as a word
    assert mask_subject("U2's next album follows U2s", "U2") == f"{MASK}'s next album follows U2s"
    assert mask_subject("The CEO of Oxo is", "o") == "The CEO of Oxo is"  # never inside a word


CEO = EditRequest(prompt="The CEO of Zorbland Robotics is", target="Nadia Velmont", subject="Zorbland Robotics")
BORN = EditRequest(prompt="The place of birth of Ingrīda Amantova is", target="Riga", subject="Ingrīda Amantova")


@pytest.mark.parametrize(("question", "request_", "expected"), [
    ("Who is the CEO of Zorbland Robotics?", CEO, True),
    ("Who runs Zorbland Robotics as its chief executive?", CEO, True),
    ("The CEO of Zorbland Robotics is", CEO, True),
    ("Where is Zorbland Robotics headquartered?", CEO, False),  # same subject, another relation
    ("When was Zorbland Robotics founded?", CEO, False),
    ("Who is the CEO of Quillon Aerospace?", CEO, False),  # same relation, another subject
    ("Where was Ingrīda Amantova born?", BORN, True),
    ("The gender of Ingrīda Amantova is", BORN, False),  # the LLP hijack
    ("What is the occupation of Ingrīda Amantova?", BORN, False),
])  # fmt: skip
def test_the_shipped_check_keeps_an_edit_to_its_own_question(question, request_, expected):
    check = QuestionCheck.load()
    assert check.accepts([question], [request_]).tolist() == [expected]


def test_threshold_lets_the_asked_share_of_positives_through():
    logits = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0, 5.0, -4.0])
    labels = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    assert (logits[labels > 0.5] > threshold_for(logits, labels, 1.0)).all()
    assert (logits[labels > 0.5] > threshold_for(logits, labels, 0.8)).sum() == 4


def test_training_end_to_end_saves_a_check_that_loads_and_separates_relations(tmp_path):
    relations = {k: v for k, v in sorted(load_relations().items())[:12]}
    pairs = relation_pairs(relations, ["Ada Lovelace", "Quillon Aerospace"], 300, random.Random(0))
    info = train(pairs, tmp_path, CheckTrainOptions(epochs=8, batch_size=16, lr=3e-3, relation_pairs=0, cross_style=0, val_fraction=0.2, recall=0.9))
    network, threshold, stored = load_network(tmp_path / "question-check.safetensors")
    assert threshold == pytest.approx(info["threshold"]) and stored["best_epoch"] == info["best_epoch"]
    assert info["validation"]["recall"] >= 0.9  # the threshold was set for it
    assert info["validation"]["false_accept"] < 0.5  # and it tells relations apart better than chance
    check = QuestionCheck.load(tmp_path / "question-check.safetensors")
    assert check.threshold == pytest.approx(threshold)


def test_hard_negatives_pair_relations_that_read_alike():
    """The pairs that hijacked on the development set (the country which X is associated
    with / the capital city of X / the religion which X is associated with) come from the
    relations the encoder puts nearest, and from a KnowEdit file's templates."""
    relations = load_relations()
    near = nearest_relations(relations, 6)
    assert "capital" in near["country"] and "country" in near["capital"] and "religion" not in near["religion"]
    pairs = relation_pairs(relations, [], 400, random.Random(0), near)
    hard = [p for p in pairs if p.source == "relations:near"]
    assert hard and all(p.label == 0.0 for p in hard) and 60 < len(hard) < 140  # a quarter of the 400 negatives

    def record(subject: str, prompt: str, *others: str) -> EditRecord:
        return EditRecord(case_id=subject, prompt=prompt.format(subject), target="t", subject=subject, rephrases=(),
                          loc_prompt="", loc_answer=None,
                          same_subject=tuple(SideQuestion(o.format(subject), ("a",), "Relation_Specificity") for o in others))  # fmt: skip

    country, capital, rare = "The name of the country which {} is associated with is", "The name of the capital city of {} is", "{} follows"
    records = [record(s, country, capital) for s in ("Orcières", "Bigorre", "Lourdes")] + [record("맦", rare)]
    got = template_pairs(records, 2, "knowedit")
    masked = {country.format(MASK), capital.format(MASK)}
    assert {(p.question, p.prompt) for p in got} == {(a, b) for a in masked for b in masked if a != b}  # "follows": once only
    assert len(got) == 4 and all(p.label == 0.0 and p.source == "knowedit:template" for p in got)
