"""Per-edit rows grown in place (editors/rows.py) and the backends that keep them: LLP,
MEMOIR and GRACE here, RECIPE in test_recipe.py. Each backend's tensors must be what a
torch.cat per edit gave, and forks, reverts and saved states must not see the buffers."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from kmd.editors.protocol import EditRequest
from kmd.editors.registry import get_backend
from kmd.editors.rows import GrowingRows
from kmd.editors.scoring import score_targets
from kmd.editors.state import load_editor, save_editor


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Owner:
    def __init__(self) -> None:
        self.rows = torch.empty(0, 3)  # (N, 3)
        self.grown = GrowingRows()


def test_appends_equal_torch_cat_and_reallocate_by_doubling():
    owner, expected = Owner(), torch.empty(0, 3)
    for i in range(40):
        row = torch.randn(1, 3)
        owner.grown.append(owner, "rows", row)
        expected = torch.cat([expected, row])
        assert torch.equal(owner.rows, expected) and owner.rows.dtype == expected.dtype
    buffer = owner.grown.buffers["rows"][1]
    assert buffer.shape[0] == 70 and owner.rows.data_ptr() == buffer.data_ptr()  # 16, then 34, then 70 rows
    owner.grown.append(owner, "rows", torch.ones(2, 3, dtype=torch.long))  # several rows; a type torch.cat keeps float
    assert torch.equal(owner.rows, torch.cat([expected, torch.ones(2, 3, dtype=torch.long)])) and owner.rows.dtype == torch.float32
    with pytest.raises(ValueError, match="do not fit"):
        owner.grown.append(owner, "rows", torch.ones(1, 3, dtype=torch.float64))  # torch.cat would promote
    with pytest.raises(ValueError, match="do not fit"):
        owner.grown.append(owner, "rows", torch.ones(1, 4))


def test_rows_grow_along_another_axis():
    owner, expected = Owner(), torch.empty(3, 0, 2)
    owner.rows = expected.clone()  # (3, N, 2): the edits on axis 1
    for _ in range(20):
        row = torch.randn(3, 1, 2)
        owner.grown.append(owner, "rows", row, dim=1)
        expected = torch.cat([expected, row], dim=1)
    assert torch.equal(owner.rows, expected) and owner.grown.buffers["rows"][1].shape == (3, 34, 2)


def test_a_copy_or_a_replaced_tensor_never_writes_into_rows_others_hold():
    parent = Owner()
    for _ in range(5):
        parent.grown.append(parent, "rows", torch.randn(1, 3))
    fork = copy.copy(parent)  # shares the view, as an editor's fork does
    fork.grown = copy.copy(parent.grown)
    fork.grown.buffers = dict(parent.grown.buffers)
    held = parent.rows.clone()
    fork.grown.append(fork, "rows", torch.full((1, 3), 7.0))  # not its buffer: copies
    parent.grown.append(parent, "rows", torch.full((1, 3), 9.0))  # its buffer: writes row 5, which only it sees
    assert torch.equal(fork.rows, torch.cat([held, torch.full((1, 3), 7.0)]))
    assert torch.equal(parent.rows, torch.cat([held, torch.full((1, 3), 9.0)]))
    assert fork.rows.data_ptr() != parent.rows.data_ptr()
    shorter = parent.rows[:3]  # a view of the buffer, as a careless revert might make
    parent.rows = shorter
    parent.grown.append(parent, "rows", torch.zeros(1, 3))
    assert torch.equal(shorter, held[:3]) and parent.rows.data_ptr() != shorter.data_ptr()


# the tensors each backend grows per edit, and options that keep 40 edits on the tiny model quick
GROWN = {
    "llp": (("keys", "values", "prefix_keys", "prefix_values"),
            {"key_steps": 2, "value_steps": 2, "background_texts": 4, "prefix_pool": 3, "n_prefixes": 1}),
    "memoir": (("masks", "owners"), {"max_steps": 2, "n_prefixes": 1, "prefix_tokens": 4, "tau": 0.8}),
    "grace": (("keys", "values", "spans", "scales", "splits"), {"max_steps": 2}),
}  # fmt: skip
# words of the tiny model's vocabulary (tests/tiny.py): 48 distinct prompts, targets varying with them
SUBJECTS = ["Alice", "Bob", "Carol", "Dave", "Eve", "Zorbland", "Quexia", "Velmont", "Lutz", "Orin", "Pavel", "Nadia"]
RELATIONS = ["works for the company", "speaks the language of", "was born in the city", "plays for the team"]
TARGETS = ["Paris", "Berlin", "Rome", "Madrid", "London", "Tokyo", "apple", "banana", "cherry", "red", "green", "blue", "dog"]


def request(i: int) -> EditRequest:
    subject = SUBJECTS[i % len(SUBJECTS)]
    return EditRequest(prompt=f"{subject} {RELATIONS[i // len(SUBJECTS) % len(RELATIONS)]}",
                       target=TARGETS[i % len(TARGETS)], subject=subject, edit_id=f"r{i}")  # fmt: skip


@pytest.mark.parametrize("backend", sorted(GROWN))
def test_forty_edits_grow_like_torch_cat_with_a_fork_a_revert_and_a_save(tiny_host, tmp_path, backend):
    """40 edits (the buffers reallocate at 16 and 34 rows): every grown tensor equals the
    torch.cat of the rows each edit appended; a fork taken after 20 keeps its tensors and
    outputs while the parent writes past its rows, and its own edit does not touch the
    parent's rows; reverting edit 10 leaves exactly the other rows; a save holds the N rows
    and loads exactly."""
    names, options = GROWN[backend]
    cls = get_backend(backend)
    editor = cls(tiny_host, cls.default_config(tiny_host, question_check=False, **options))
    empty = {name: getattr(editor, name).clone() for name in names}
    written: dict[str, list[torch.Tensor]] = {name: [] for name in names}  # each edit's rows, as appended

    def apply(target, i: int) -> None:
        target.apply(request(i))
        if target is editor:
            for name in names:
                written[name].append(getattr(editor, name)[-1:].clone())

    def assert_rows(target, skip: frozenset[int] = frozenset()) -> None:
        for name in names:
            expected = torch.cat([empty[name], *(r for i, r in enumerate(written[name]) if i not in skip)])
            got = getattr(target, name)
            assert (got.dtype, got.device, got.shape) == (expected.dtype, expected.device, expected.shape), name
            assert torch.equal(got, expected), name

    probes = [(request(i).prompt, request(i).target) for i in range(0, 20, 3)] + [("who wrote the book ?", "Alice")]
    for i in range(20):
        apply(editor, i)
    fork = editor.fork()
    assert all(getattr(fork, n).data_ptr() == getattr(editor, n).data_ptr() for n in names)  # shared, not copied
    held = {name: getattr(fork, name).clone() for name in names}
    fork_scores = score_targets(tiny_host, fork, probes)
    for i in range(20, 30):
        apply(editor, i)  # into the buffer (34 rows) the fork's views are prefixes of, past their rows
    assert all(torch.equal(getattr(fork, n), held[n]) for n in names)
    assert score_targets(tiny_host, fork, probes) == fork_scores
    with editor.suspended():
        apply(fork, 40)  # not the fork's buffer: copies (writing its row 20 would overwrite the parent's)
    assert_rows(editor)
    assert all(torch.equal(getattr(fork, n)[:20], held[n]) and getattr(fork, n).shape[0] == 21 for n in names)
    held = {name: getattr(fork, name).clone() for name in names}
    fork_scores = score_targets(tiny_host, fork, probes)  # with its own edit
    for i in range(30, 40):
        apply(editor, i)  # past 34 rows: a new buffer
    assert_rows(editor)
    for name in names:
        buffer = editor.grown.buffers[name][1]
        assert buffer.shape[0] == 70 and getattr(editor, name).data_ptr() == buffer.data_ptr(), name
        assert torch.equal(getattr(fork, name), held[name]), name

    if backend == "llp":  # serving's unit keys (|R|, N, D) and shifts (N,), grown per edit: what all rows give
        unit, shifts = editor._unit_keys.clone(), editor._shifts.clone()
        editor._refresh()
        assert torch.equal(editor._unit_keys, unit) and torch.equal(editor._shifts, shifts)

    editor.revert("r10")
    assert_rows(editor, skip=frozenset({10}))
    assert score_targets(tiny_host, fork, probes) == fork_scores
    apply(editor, 10)  # after a revert (new tensors) the next append copies them into a new buffer
    assert_rows(editor, skip=frozenset({10}))

    saved = save_editor(editor, tmp_path / "state")
    stored = load_file(next(saved.glob("tensors-*.safetensors")))
    for name in set(names) & set(stored):
        assert torch.equal(stored[name], getattr(editor, name)), name  # N rows, not the buffer
    with editor.suspended():
        loaded = load_editor(saved, tiny_host)
    assert loaded.edit_ids == editor.edit_ids
    assert_rows(loaded, skip=frozenset({10}))
    assert score_targets(tiny_host, loaded, probes) == score_targets(tiny_host, editor, probes)
    for target in (editor, fork, loaded):
        target.retire()
