"""MEMOIR-specific behaviour on the tiny random Llama (fast; the embedded-model checks are slow)."""

from __future__ import annotations

import json

import pytest
import torch

from kmd.editors.answers import encode_as
from kmd.editors.batching import left_padded, left_padded_ids, teacher_forced_batch
from kmd.editors.memoir import MemoirEditor
from kmd.editors.augment import background_passages
from kmd.editors.profiles import ProfileError
from kmd.editors.protocol import EditorError, EditRequest
from kmd.editors.scoring import generate, score_targets
from kmd.editors.registry import get_calibrator
from kmd.editors.state import load_editor, save_editor
from tiny import chat_template

EDIT = EditRequest(prompt="the capital of France is", target="Berlin", subject="France")
OTHER = EditRequest(prompt="Alice works for the company", target="banana", subject="Alice")
THIRD = EditRequest(prompt="Bob speaks the language of Japan", target="cherry", subject="Bob")
UNRELATED = "who wrote the book ?"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(host, **overrides) -> MemoirEditor:
    # tau 0.8: on the tiny random model unrelated probes overlap the edits' masks by <= 0.6.
    overrides = {"n_prefixes": 2, "prefix_tokens": 4, "tau": 0.8} | overrides
    return MemoirEditor(host, MemoirEditor.default_config(host, **overrides))


def accuracy(host, editor, request) -> float:
    return score_targets(host, editor, [(request.prompt, request.target)])[0].accuracy


def test_config_and_layer_choice(tiny_host):
    editor = make(tiny_host)
    assert editor.layer == 2  # 0.85 of 4 layers, at most the last-but-one
    assert editor.k == round(0.29 * 128)
    assert make(tiny_host, k=16).k == 16
    with pytest.raises(EditorError, match="layer"):
        make(tiny_host, layer=3)
    with pytest.raises(EditorError, match="tau"):
        make(tiny_host, tau=0.0)


def test_no_statistics_no_hooks_until_the_first_edit(tiny_host):
    editor = make(tiny_host)
    assert editor.permutation is None and editor._handle is None
    editor.apply(EDIT)
    assert sorted(editor.permutation.tolist()) == list(range(editor.d_ff))
    assert editor.bg_mean.shape == (editor.d_ff,)
    assert len(editor.prefixes) == 2 and all(isinstance(p, str) and p for p in editor.prefixes)
    assert len(background_passages()) >= 50


def test_retrieval_is_per_row_and_from_prompt_tokens_only(tiny_host):
    editor = make(tiny_host)
    editor.apply(EDIT)
    # Row 0: the edited prompt with its target. Row 1: the same prompt with another answer.
    # Row 2: an unrelated prompt whose *answer* is the edited prompt's text.
    pairs = [(EDIT.prompt, EDIT.target), (EDIT.prompt, "Madrid"), (UNRELATED, EDIT.prompt)]
    batch = teacher_forced_batch(tiny_host, pairs)
    with torch.no_grad(), editor.query(batch.prompt_mask) as routing:
        edited = tiny_host.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    decision = routing.decisions["memoir"]
    assert decision["rows"].tolist() == [0, 1]  # the answer tokens of row 2 were not looked at
    assert decision["score"][0] == 1.0 and decision["score"][1] == 1.0
    with torch.no_grad():
        base = tiny_host.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(edited[2], base[2])
    assert not torch.equal(edited[0], base[0])


def test_answer_tokens_do_not_change_the_decision(tiny_host):
    editor = make(tiny_host)
    editor.apply(EDIT)
    scores = []
    for answer in ("Berlin", "the dog and the cat and the bird", EDIT.prompt):
        batch = teacher_forced_batch(tiny_host, [(UNRELATED, answer)])
        with torch.no_grad(), editor.query(batch.prompt_mask) as routing:
            tiny_host.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        scores.append(float(routing.decisions["memoir"]["score"][0]))
    assert scores[0] == scores[1] == scores[2]


def test_below_tau_the_row_is_the_base_model(tiny_host):
    editor = make(tiny_host, tau=1.0)  # only an exact mask match retrieves
    editor.apply(EDIT)
    assert accuracy(tiny_host, editor, EDIT) == 1.0
    ids, attention = left_padded(tiny_host, [UNRELATED, "the dog and the cat"])
    with torch.no_grad():
        base = tiny_host.model(input_ids=ids, attention_mask=attention).logits
        with editor.query(attention.bool()):
            edited = tiny_host.model(input_ids=ids, attention_mask=attention).logits
    assert torch.equal(edited, base)


def test_generation_with_cache_matches_full_recomputation(tiny_host):
    editor = make(tiny_host)
    editor.apply(EDIT)
    cached = generate(tiny_host, editor, [EDIT.prompt], 4)[0]
    ids, _ = left_padded(tiny_host, [EDIT.prompt])
    prompt_len = ids.shape[1]
    with torch.no_grad():
        for _ in range(len(cached)):  # no cache: the whole sequence again, prompt marked as such
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[:, :prompt_len] = True
            with editor.query(mask):
                logits = tiny_host.model(input_ids=ids).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert ids[0, prompt_len:].tolist() == cached


def _overlapping(host) -> MemoirEditor:
    # k = 0.8 of d_ff: any two masks share at least 60 % of their columns.
    editor = make(host, k=0.8, tau=0.99)
    return editor


def test_revert_removes_exactly_what_the_edit_wrote(tiny_host):
    editor = _overlapping(tiny_host)
    editor.apply(EDIT)
    after_first = editor.memory.clone()
    second = editor.apply(OTHER)
    shared = set(editor.masks[0].tolist()) & set(editor.masks[1].tolist())
    assert len(shared) >= 0.6 * editor.d_ff
    assert not torch.equal(editor.memory, after_first)
    editor.revert(second)
    assert torch.equal(editor.memory, after_first)  # bit for bit: as if OTHER had never been applied
    assert accuracy(tiny_host, editor, EDIT) == 1.0


def test_revert_in_the_middle_leaves_the_fold_of_the_others(tiny_host):
    editor = _overlapping(tiny_host)
    ids = [editor.apply(r) for r in (EDIT, OTHER, THIRD)]
    deltas = {i: d.clone() for i, d in zip(ids, editor.deltas, strict=True)}
    masks = {i: m.clone() for i, m in zip(ids, editor.masks, strict=True)}
    editor.revert(ids[0])
    expected = torch.zeros_like(editor.memory[0])
    for i in ids[1:]:  # what the remaining recorded deltas give, applied in order
        expected[masks[i]] = expected[masks[i]] + deltas[i]
    assert editor.memory.shape[0] == 1 and torch.equal(editor.memory[0], expected)
    editor.revert(ids[2])
    assert torch.equal(editor.memory[0, masks[ids[1]]], deltas[ids[1]])
    editor.revert(ids[1])
    assert torch.count_nonzero(editor.memory) == 0 and editor._handle is None


def test_save_load_keeps_permutation_background_prefixes_and_memory(tiny_host, tmp_path):
    editor = _overlapping(tiny_host)
    first = editor.apply(EDIT)
    editor.apply(OTHER)
    editor.revert(first)
    editor.apply(THIRD)
    path = save_editor(editor, tmp_path / "state")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["extra"]["prefixes"] == editor.prefixes
    with editor.suspended():
        loaded = load_editor(path, tiny_host)
        assert isinstance(loaded, MemoirEditor)
        for name in ("permutation", "bg_mean", "bg_std", "masks"):
            assert torch.equal(getattr(loaded, name), getattr(editor, name)), name
        assert loaded.prefixes == editor.prefixes
        assert torch.equal(loaded.memory, editor.memory)  # rebuilt from the deltas, bit for bit
        # The loaded editor's masks for new prompts are the same as the original's.
        feats = editor.prompt_features([UNRELATED, EDIT.prompt])
        assert torch.equal(loaded.tophash(feats), editor.tophash(feats))


def test_restore_refuses_edits_without_statistics(tiny_host):
    editor = make(tiny_host)
    editor.apply(EDIT)
    tensors = {k: v for k, v in editor.state_tensors().items() if k not in ("permutation", "bg_mean", "bg_std")}
    fresh = make(tiny_host)
    with pytest.raises(EditorError, match="permutation"):
        fresh.restore([editor.request(editor.edit_ids[0])], tensors, editor.extra_state())


def test_failed_apply_changes_nothing(tiny_host, monkeypatch):
    editor = make(tiny_host)
    editor.apply(EDIT)
    memory, masks = editor.memory.clone(), editor.masks.clone()
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda logits, labels: logits.sum() * float("nan"))
    with pytest.raises(EditorError, match="diverged"):
        editor.apply(OTHER)
    monkeypatch.undo()
    assert torch.equal(editor.memory, memory) and torch.equal(editor.masks, masks)
    assert len(editor.edit_ids) == len(editor.deltas) == 1


def test_calibrate_returns_a_threshold(tiny_host):
    from kmd.editors.bench.data import EditRecord

    records = [
        EditRecord("0", EDIT.prompt, "Berlin", "France", ("the capital city of France is",), "the dog and the cat", "x"),
        EditRecord("1", OTHER.prompt, "banana", "Alice", ("Alice works for a company",), UNRELATED, "x"),
    ]
    out = get_calibrator("memoir").calibrate(tiny_host, records, n_prefixes=0)  # as `kmd calibrate` finds it
    assert set(out["options"]) == {"tau"} and 0.0 < out["options"]["tau"] <= 1.0
    report = out["report"]
    assert report["n_records"] == 2 and report["k"] == round(0.29 * 128)
    assert {"tau", "gen_retrieved", "loc_fired"} <= set(report["at_choice"])


# ----- centred inputs and protected minimum-norm updates (the SmolLM2 profile's setup) -----------
PROTECTED = {"update": "min_norm", "center": True, "protect": 10.0}


def test_update_options_are_validated(tiny_host):
    with pytest.raises(ProfileError, match="update: 'sideways' is not one of 'direct', 'min_norm'"):
        make(tiny_host, update="sideways")
    with pytest.raises(EditorError, match="protect"):
        make(tiny_host, update="direct", protect=1.0)


@pytest.mark.parametrize("options", [{"update": "min_norm", "center": True}, PROTECTED])
def test_span_updates_take_and_revert_to_the_base_model(tiny_host, options):
    editor = make(tiny_host, **options)
    ids, attention = left_padded(tiny_host, [EDIT.prompt, UNRELATED])
    with torch.no_grad():
        base = tiny_host.model(input_ids=ids, attention_mask=attention).logits
    first, second = editor.apply(EDIT), editor.apply(OTHER)
    assert accuracy(tiny_host, editor, EDIT) == accuracy(tiny_host, editor, OTHER) == 1.0
    # Each change lies in the span of its own edit's memory inputs (n_tokens of them).
    keys = editor._edit_keys(EDIT, editor.masks[0])  # (n, k)
    residual = editor.deltas[0] - keys.T @ torch.linalg.lstsq(keys.T, editor.deltas[0]).solution
    assert residual.norm() <= 1e-3 * editor.deltas[0].norm()
    editor.revert(first)
    editor.revert(second)
    with torch.no_grad(), editor.query(attention.bool()):
        assert torch.equal(tiny_host.model(input_ids=ids, attention_mask=attention).logits, base)


def _output_change_on_first(host, **options) -> float:
    """Relative change of the first edit's memory output on its own tokens caused by a second edit."""
    editor = make(host, k=0.8, tau=0.99, **options)  # masks share >= 60 % of their columns
    editor.apply(EDIT)
    keys, mask = editor._edit_keys(EDIT, editor.masks[0]), editor.masks[0]
    before = keys @ editor.memory[0, mask]
    editor.apply(OTHER)
    return float((keys @ editor.memory[0, mask] - before).norm() / before.norm())


def test_protection_keeps_earlier_edits_outputs(tiny_host):
    unprotected = _output_change_on_first(tiny_host, update="min_norm", center=True)
    protected = _output_change_on_first(tiny_host, **PROTECTED)
    assert protected < 0.5 * unprotected


def test_gram_follows_the_live_edits_through_revert_and_load(tiny_host, tmp_path):
    editor = make(tiny_host, **PROTECTED)
    first = editor.apply(EDIT)
    after_first = editor.gram.clone()
    second = editor.apply(OTHER)
    mask = editor.masks[1]
    keys = editor._edit_keys(OTHER, mask).double()
    expected = after_first.clone()
    expected[mask[:, None], mask[None, :]] += keys.T @ keys
    assert torch.allclose(editor.gram, expected)
    path = save_editor(editor, tmp_path / "state")
    with editor.suspended():
        loaded = load_editor(path, tiny_host)
        assert torch.equal(loaded.gram, editor.gram)
    editor.revert(second)
    assert torch.allclose(editor.gram, after_first, atol=1e-9 * float(after_first.abs().max()))
    editor.revert(first)
    assert editor.gram is None  # as before the first edit


def test_a_chat_turn_is_routed_by_its_message_run_alone(tiny_host):
    """With `chat_retrieval: alone` (the default) a chat turn's routing feature is its
    message's as a bare prompt: the edit's own prompt asked as a chat turn matches fully."""
    editor = make(tiny_host)
    editor.apply(EDIT)
    with chat_template(tiny_host):
        encoded = [encode_as(tiny_host, EDIT.prompt, "plain"), encode_as(tiny_host, EDIT.prompt, "chat")]
        ids, attention = left_padded_ids(tiny_host, encoded)
        features = editor.routing_features(ids, attention)
        assert torch.allclose(features["pooled"][1], features["pooled"][0], atol=1e-5)
        assert editor.routes(features)[1] == editor.routes(features)[0] is not None
        with torch.no_grad(), editor.query(attention.bool()) as routing:
            tiny_host.model(input_ids=ids, attention_mask=attention)
        assert routing.decisions["memoir"]["score"].tolist() == [1.0, 1.0]


def test_shards_keep_each_memory_to_its_own_edits(tiny_host, tmp_path):
    """With `shard_edits: 2` the third edit opens a second memory: it trains from zero, the
    first two edits' outputs do not move, and revert, routes and a reload follow the shards."""
    editor = make(tiny_host, k=0.8, tau=0.99, shard_edits=2, **PROTECTED)  # masks share >= 60 % of columns
    ids = [editor.apply(r) for r in (EDIT, OTHER)]
    ids_, attention = left_padded_ids(tiny_host, [encode_as(tiny_host, r.prompt, "plain") for r in (EDIT, OTHER)])
    with torch.no_grad():
        before = tiny_host.model(input_ids=ids_, attention_mask=attention).logits
    third = editor.apply(THIRD)
    assert editor.memory.shape[0] == 2 and editor.shards.tolist() == [0, 0, 1]
    assert torch.equal(editor.memory[1, editor.masks[2]], editor.deltas[2])  # trained from an empty memory
    with torch.no_grad():
        assert torch.equal(tiny_host.model(input_ids=ids_, attention_mask=attention).logits, before)
    routes = editor.routes(editor.routing_features(ids_, attention))
    assert [r[0] for r in routes] == ids and all(third not in r[1] for r in routes)
    with editor.suspended():
        loaded = load_editor(save_editor(editor, tmp_path / "state"), tiny_host)
        assert torch.equal(loaded.memory, editor.memory) and torch.equal(loaded.shards, editor.shards)
        assert torch.equal(loaded.gram, editor.gram)  # the last shard's
        loaded._detach()
    editor.revert(third)
    assert editor.gram is None and torch.count_nonzero(editor.memory[1]) == 0
    fourth = editor.apply(THIRD)  # the last shard has room again
    assert editor.memory.shape[0] == 2 and editor.shards.tolist() == [0, 0, 1] and editor.edit_ids[-1] == fourth


def test_a_refused_edit_offers_the_row_to_the_next_edit_that_overlaps_it(tiny_host, monkeypatch):
    """The question check refuses "Nimbrook Energy"'s edit, whose mask overlaps a question
    about "Nimbrook Labs" most; Labs' edit, which overlaps it by tau too, is offered next and
    acts. Refused rows get their runner-ups in a second round, so a row its best edit answers
    costs one check; with runners_up 0 the refused row runs as the base model."""
    energy = EditRequest(prompt="The CEO of Nimbrook Energy is", target="Pavel Halloran", subject="Nimbrook Energy")
    labs = EditRequest(prompt="The CEO of Nimbrook Labs is", target="Tomas Aziz", subject="Nimbrook Labs")
    asked = [labs.prompt, energy.prompt, "The CEO of Nimbrook Farms is", UNRELATED]
    editor = make(tiny_host)
    editor.apply(energy)
    editor.apply(labs)
    # (B=4, N=2): Energy's mask overlaps each of the first three most; the unrelated row neither by tau
    monkeypatch.setattr(editor, "overlaps", lambda masks: torch.tensor([[0.95, 0.9], [1.0, 0.9], [0.9, 0.85], [0.5, 0.3]]))
    offered = []
    check = editor.answerable
    monkeypatch.setattr(editor, "answerable", lambda questions, ids: offered.append(list(ids)) or check(questions, ids))
    energy_id, labs_id = editor.row_ids
    for runners, hits in ((2, [True, True, False, False]), (0, [False, True, False, False])):
        offered.clear()
        with editor.configured(runners_up=runners):
            best, hit, _ = editor._routed(torch.zeros(len(asked), editor.d_ff), lambda rows: [asked[r] for r in rows])
        assert hit.tolist() == hits
        assert [editor.row_ids[b] for b, h in zip(best.tolist(), hit.tolist()) if h] == ([labs_id] if runners else []) + [energy_id]
        first = [energy_id] * 3
        assert offered == ([first, [labs_id] * 2] if runners else [first])  # the refused two, then their runner-up
