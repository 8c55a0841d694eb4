"""WISE-specific behaviour on the tiny random Llama (fast)."""

from __future__ import annotations

import pytest
import torch

from kmd.editors.profiles import ProfileError
from kmd.editors.protocol import EditorError, EditRequest
from kmd.editors.scoring import score_targets
from kmd.editors.wise import WiseEditor
from kmd.editors.wise.editor import activation
from kmd.editors.wise.merge import ties_merge, trim
from kmd.editors.state import load_editor, save_editor

EDIT = EditRequest(prompt="the capital of France is", target="Berlin", subject="France", edit_id="e1")
OTHER = EditRequest(prompt="Alice works for the company", target="banana", subject="Alice", edit_id="e2")
THIRD = EditRequest(prompt="Bob speaks the language of Japan", target="cherry", subject="Bob", edit_id="e3")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(host, **overrides) -> WiseEditor:
    overrides = {"max_steps": 30} | overrides
    return WiseEditor(host, WiseEditor.default_config(host, **overrides))


def accuracy(host, editor, request) -> float:
    return score_targets(host, editor, [(request.prompt, request.target)])[0].accuracy


def test_trim_keeps_the_largest_entries():
    task = torch.tensor([0.1, -3.0, 0.5, 2.0])
    assert torch.equal(trim(task, 0.5), torch.tensor([0.0, -3.0, 0.0, 2.0]))
    assert torch.equal(trim(task, 1.0), task)


def test_ties_merge_elects_signs_and_averages_agreeing_entries():
    a = torch.tensor([1.0, 2.0, 0.0, -1.0])
    b = torch.tensor([3.0, -1.0, 4.0, 0.0])
    merged = ties_merge([a, b], density=1.0)
    # element 0: both positive -> mean 2; element 1: sign of 2 - 1 is +, only a agrees -> 2;
    # element 2: only b -> 4; element 3: only a -> -1
    assert torch.equal(merged, torch.tensor([2.0, 2.0, 4.0, -1.0]))
    assert torch.equal(ties_merge([a], density=0.5), a)  # one shard is served as it is


def test_activation_skips_the_first_token_and_padding():
    extra = torch.zeros(2, 3, 4)
    extra[:, 0] = 100.0  # the first token: ignored
    extra[:, 1, 0] = 3.0
    extra[:, 2, 0] = 5.0
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert torch.allclose(activation(extra, mask), torch.tensor([4.0, 3.0]), atol=1e-5)


def test_revert_gives_exactly_the_shard_without_the_edit(tiny_host):
    editor = make(tiny_host)
    for request in (EDIT, OTHER, THIRD):
        editor.apply(request)
    editor.revert("e2")
    assert editor.last_revert["retrained"] == 2
    assert editor.last_revert["seconds"] > 0
    with editor.suspended():
        fresh = make(tiny_host)
        fresh.apply(EDIT)
        fresh.apply(THIRD)
    assert torch.equal(editor.memory_t, fresh.memory_t)
    # A revert re-measures every kept edit's activation under the new memory (the threshold).
    fresh._measure(["e1", "e3"])
    assert editor.acts == fresh.acts
    assert editor.shards[0].edit_ids == ["e1", "e3"]


def test_shards_are_merged_and_a_reverted_shard_is_dropped(tiny_host):
    editor = make(tiny_host, shard_size=1)
    for request in (EDIT, OTHER):
        editor.apply(request)
    assert [s.serial for s in editor.shards] == [0, 1]
    masks = [editor.mask(s.serial) for s in editor.shards]
    assert not torch.equal(masks[0], masks[1])
    assert all(((s.delta != 0) & ~m).sum() == 0 for s, m in zip(editor.shards, masks))  # only the mask trains
    editor.revert("e1")
    assert editor.last_revert["retrained"] == 0  # its shard held no other edit
    assert [s.serial for s in editor.shards] == [1]
    assert torch.equal(editor.memory_t, editor.shards[0].delta.T)
    editor.apply(THIRD)
    assert [s.serial for s in editor.shards] == [1, 2]  # serials (and masks) are never reused


def test_memory_stays_within_the_clamp(tiny_host):
    editor = make(tiny_host, clamp=0.01)
    editor.apply(EDIT)
    assert float(editor.shards[0].delta.abs().max()) <= 0.01


def test_revert_after_a_restart_uses_the_saved_history(tiny_host, tmp_path):
    editor = make(tiny_host)
    for request in (EDIT, OTHER, THIRD):
        editor.apply(request)
    path = save_editor(editor, tmp_path / "state")
    expected_memory = editor.memory_t.clone()
    editor.revert("e1")
    after_revert = editor.memory_t.clone()
    with editor.suspended():
        reloaded = load_editor(path, tiny_host)
        assert torch.equal(reloaded.memory_t, expected_memory)
        reloaded.revert("e1")  # prompt inputs are recomputed from the saved requests
        assert torch.equal(reloaded.memory_t, after_revert)
        assert reloaded.acts == editor.acts


def test_layout_options_cannot_change_between_edits(tiny_host):
    editor = make(tiny_host)
    editor.apply(EDIT)
    with pytest.raises(EditorError, match="mask_ratio"), editor.configured(mask_ratio=0.5):
        editor.apply(OTHER)
    assert editor.edit_ids == ["e1"]


def test_retried_edit_options_are_replayed_on_revert(tiny_host):
    editor = make(tiny_host)
    editor.apply(EDIT)
    with editor.configured(**editor.stronger_overrides()):
        editor.apply(OTHER)
    assert editor.meta["e2"]["options"]["max_steps"] == 60
    editor.apply(THIRD)
    editor.revert("e1")
    with editor.suspended():
        fresh = make(tiny_host)
        with fresh.configured(max_steps=60, stop_loss=fresh.config.stop_loss / 2):
            fresh.apply(OTHER)
        fresh.apply(THIRD)
    assert torch.equal(editor.memory_t, fresh.memory_t)


MIN_NORM = {"update": "min_norm", "protect": 10.0, "protect_background": 1.0}


def test_min_norm_change_keeps_the_edits_output_within_each_rows_mask(tiny_host):
    editor = make(tiny_host)
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(6, editor.d_ff, generator=gen)
    mask = editor.mask(0)
    change = torch.randn(editor.d_model, editor.d_ff, generator=gen) * mask
    earlier = torch.randn(9, editor.d_ff, generator=gen).double()
    for protected in (None, 10.0 * earlier.T @ earlier):
        result = editor._min_norm(keys, change, mask, protected)
        assert ((result != 0) & ~mask).sum() == 0  # only the shard's elements
        assert torch.allclose(keys @ result.T, keys @ change.T, atol=1e-3 * float((keys @ change.T).abs().max()))
        assert result.norm() <= change.norm()


def test_min_norm_edits_revert_and_reload_exactly(tiny_host, tmp_path):
    editor = make(tiny_host, **MIN_NORM)
    for request in (EDIT, OTHER, THIRD):
        editor.apply(request)
    assert editor.shards[0].gram is not None
    path = save_editor(editor, tmp_path / "state")
    saved_gram = editor.shards[0].gram.clone()
    editor.revert("e2")
    with editor.suspended():
        fresh = make(tiny_host, **MIN_NORM)
        fresh.apply(EDIT)
        fresh.apply(THIRD)
        assert torch.equal(editor.memory_t, fresh.memory_t)  # replayed with the shard's Gram rebuilt
        assert torch.equal(editor.shards[0].gram, fresh.shards[0].gram)
    with editor.suspended(), fresh.suspended():  # one editor's hooks on the model at a time
        reloaded = load_editor(path, tiny_host)
        assert torch.equal(reloaded.shards[0].gram, saved_gram)
        reloaded.revert("e2")
        assert torch.equal(reloaded.memory_t, editor.memory_t)


def test_protect_needs_min_norm(tiny_host):
    with pytest.raises(EditorError, match="protect"):
        make(tiny_host, protect=1.0)
    with pytest.raises(ProfileError, match="update: 'sideways' is not one of 'direct', 'min_norm'"):
        make(tiny_host, update="sideways")
