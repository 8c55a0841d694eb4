"""GRACE's radii: kept up to date edit by edit, equal to what the entries alone give."""

from __future__ import annotations

import torch

from kmd.editors.protocol import EditRequest
from kmd.editors.registry import get_backend
from kmd.editors.state import load_editor, save_editor

FACTS = [("the capital of France is", "Paris"), ("the capital of Spain is", "Paris"), ("Alice works for", "banana"),
         ("the language of Japan is", "music"), ("Bob plays the", "banana"), ("the capital of Italy is", "Rome")]  # fmt: skip


def _editor(host, facts, split=True):
    editor = get_backend("grace")(host)
    for i, (prompt, target) in enumerate(facts):
        with editor.configured(max_steps=2, split_conflicts=split or i % 2 == 0):
            editor.apply(EditRequest(prompt=prompt, target=target, edit_id=f"g{prompt}"))
    return editor


def _all_pairs_halves(editor) -> torch.Tensor:
    """The definition: half the distance to the nearest entry with another target."""
    n = len(editor.row_ids)
    dist = torch.stack([(editor.keys - editor.keys[i]).pow(2).sum(-1).sqrt() for i in range(n)])
    other = torch.tensor([[a != b for b in editor.labels] for a in editor.labels], dtype=torch.bool)
    return torch.where(other, dist / 2, torch.inf).amin(1)


def test_radii_kept_edit_by_edit_equal_the_entries_alone_after_reverts_and_a_reload(tiny_host, tmp_path):
    """Each apply measures one key against the others, each revert re-measures only the
    rows it was nearest to; the radii are bit for bit those of an editor given only the
    remaining edits, and of the definition over all pairs; a saved state loads them."""
    editor = _editor(tiny_host, FACTS, split=False)
    assert torch.equal(editor.halves, _all_pairs_halves(editor))
    for gone in (1, 3):  # "Paris" (shared with France) and "music" (a target of its own)
        editor.revert(f"g{FACTS[gone][0]}")
    remaining = [f for i, f in enumerate(FACTS) if i not in (1, 3)]
    alone = _editor(tiny_host, remaining, split=False)
    assert editor.row_ids == alone.row_ids and torch.equal(editor.keys, alone.keys)
    assert torch.equal(editor.halves, alone.halves) and torch.equal(editor.radii, alone.radii)
    assert torch.equal(editor.halves, _all_pairs_halves(editor))
    loaded = load_editor(save_editor(editor, tmp_path / "state"), tiny_host)
    assert torch.equal(loaded.radii, editor.radii)
    for e in (editor, alone, loaded):
        e.retire()


def test_a_state_saved_without_halves_measures_them_on_load(tiny_host, tmp_path, monkeypatch):
    editor = _editor(tiny_host, FACTS)
    tensors = editor.state_tensors()
    monkeypatch.setattr(type(editor), "state_tensors", lambda self: {k: v for k, v in tensors.items() if k != "halves"})
    path = save_editor(editor, tmp_path / "old")
    monkeypatch.undo()
    loaded = load_editor(path, tiny_host)
    assert torch.equal(loaded.halves, editor.halves) and torch.equal(loaded.radii, editor.radii)
    editor.retire()
    loaded.retire()
