"""Every backend: serving snapshots (`fork`) are independent of later changes, and
routing-aware locality probes agree with full passes (tiny random Llama)."""

from __future__ import annotations

import random

import pytest
import torch

from kmd.daemon.policy import ProbePolicy
from kmd.daemon.locality import LocalityBaseline
from kmd.daemon.probes import Prober
from kmd.editors.answers import encode_as
from kmd.editors.batching import left_padded_ids
from kmd.editors.protocol import EditRequest
from kmd.editors.registry import backend_names, get_backend
from tiny import WORDS, chat_template

from .conftest import backend_options
from .test_editor_contract import EDIT, OTHER, logits

THIRD = EditRequest(prompt="the language of Japan is", target="cherry", subject="Japan")


@pytest.fixture(params=backend_names())
def editor(request, tiny_host):
    cls = get_backend(request.param)
    options = backend_options(request.param, request)
    return cls(tiny_host, cls.default_config(tiny_host, **options)) if options else cls(tiny_host)


def suite(extra: list[str], n: int = 28, seed: int = 0) -> list[str]:
    """Random prompts in the tiny vocabulary with the edits' own prompts mixed in (rows that fire)."""
    rng = random.Random(seed)
    words = [w for w in WORDS if w.islower()]
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 7))) for _ in range(n)]
    for i, prompt in enumerate(extra):
        prompts.insert((i * 11) % len(prompts), prompt)
    return prompts


def test_fork_is_a_snapshot_unchanged_by_later_edits_and_reverts(tiny_host, editor):
    first = editor.apply(EDIT)
    snapshot = editor.fork()
    state = {k: v.clone() for k, v in snapshot.state_tensors().items()}
    served = logits(tiny_host, snapshot)
    assert torch.equal(served, logits(tiny_host, editor))
    editor.apply(OTHER)
    editor.revert(first)
    assert snapshot.edit_ids == [first] and editor.edit_ids != [first]
    assert torch.equal(logits(tiny_host, snapshot), served), "a later apply/revert leaked into the snapshot"
    assert all(torch.equal(v, state[k]) for k, v in snapshot.state_tensors().items())
    # a fork never acts on forwards outside its own query: the working editor's view is its own
    assert not torch.equal(logits(tiny_host, editor), served)
    snapshot.retire()
    assert snapshot._handle is None, "a retired snapshot with no request in flight keeps no hooks"
    assert torch.equal(logits(tiny_host, snapshot), served), "a retired snapshot still serves a late request"
    assert snapshot._handle is None


def test_routing_aware_locality_equals_the_full_pass(tiny_host, editor):
    prompts = suite([EDIT.prompt, OTHER.prompt, THIRD.prompt, "the capital of France is Paris"])
    prober = Prober(tiny_host, LocalityBaseline.record(tiny_host, prompts, chunk=8), ProbePolicy())
    if not prober.use_routing(editor):
        pytest.skip(f"{editor.name} has no routing features")
    prober.committed = prober.locality(editor)
    assert prober.committed.rows_run == 0 and prober.committed.loc == 1.0
    ids = []
    for request in (EDIT, OTHER, THIRD):
        ids.append(editor.apply(request))
        fast, full = prober.locality(editor), prober.locality(editor, full=True)
        assert fast.verdicts == full.verdicts
        assert fast.rows_run <= full.rows_run == len(prompts)  # tiny MEMOIR/WISE route every row
        prober.committed = fast
    assert any(r is not None for chunk in prober.routes(editor) for r in chunk), "the edit prompts must fire"
    assert prober.committed.loc < 1.0, "the edits change their own prompts' continuations"
    editor.revert(ids[1])
    fast, full = prober.locality(editor), prober.locality(editor, full=True)
    assert fast.verdicts == full.verdicts


def test_a_chat_turn_routes_as_its_message_does_alone(tiny_host, editor):
    """An edit's prompt asked as a chat turn, under an operator's system prompt, as the
    second user turn and as the fifth routes to the same edit as the bare prompt: routing
    reads the latest user message (editors/chat.py), whatever else the conversation holds."""
    if editor.config_dict().get("chat_retrieval", "alone") != "alone" or "question_check" not in editor.config_dict():
        pytest.skip(f"{editor.name} routes a chat turn in context")
    editor.apply(EDIT)
    with chat_template(tiny_host):
        if editor.routing_features(*left_padded_ids(tiny_host, [encode_as(tiny_host, EDIT.prompt, "plain")])) is None:
            pytest.skip(f"{editor.name} has no routing features")
        five = [m for i in range(4) for m in ({"role": "user", "content": f"the {WORDS[20 + i]} is"},
                                              {"role": "assistant", "content": "the sky"})]  # fmt: skip
        encoded = [encode_as(tiny_host, EDIT.prompt, form) for form in ("plain", "chat", "sys", "multi")]
        encoded.append(tiny_host.chat.encode([{"role": "system", "content": "Bob wrote the book"}, *five,
                                              {"role": "user", "content": EDIT.prompt}]))  # fmt: skip
        ids, attention = left_padded_ids(tiny_host, encoded)
        routes = editor.routes(editor.routing_features(ids, attention))
    assert routes[0] is not None, "the edit must route its own prompt for this check to mean anything"
    assert routes[1:] == [routes[0]] * 4


# Options under which a backend's own retrieval fires on any prompt about the edit's
# subject (and more), so that only the question check keeps other questions unedited.
BROAD = {"recipe": {"threshold_shift": -10.0}, "llp": {"layer_similarity": None, "similarity": -1.0},
         "memoir": {"tau": 1e-6}}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BROAD))
def test_an_edit_does_not_answer_another_question_about_its_subject(tiny_host, name, request, tmp_path):
    """The question check (editors/question_check): a routed edit acts on its own question
    and not on a question about its subject's other facts, even when the backend's own
    retrieval reaches both; without the check (per edit, kept in the saved state), the
    retrieval alone answers both."""
    from kmd.editors.answers import ask

    edit = EditRequest(prompt="the capital of France is", target="Tokyo", subject="France")
    other = "the language of France is"
    base = [a.tokens for a in ask(tiny_host, None, [(edit.prompt, "plain", None), (other, "plain", None)])]
    cls = get_backend(name)
    for check in (True, False):
        options = backend_options(name, request) | BROAD[name] | {"question_check": check}
        editor = cls(tiny_host, cls.default_config(tiny_host, **options))
        editor.apply(edit)
        own, asked = (a.tokens for a in ask(tiny_host, editor, [(edit.prompt, "plain", None), (other, "plain", None)]))
        assert own != base[0], "the edit must act on its own prompt"
        editor.revert_all()  # one live editor on the model at a time (a second one's edits would act on raw calls)
        if check:
            assert asked == base[1], "the edit acted on another question about its subject"
        else:
            assert asked != base[1], "without the check the retrieval must reach the other question (else the test shows nothing)"
