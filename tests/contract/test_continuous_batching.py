"""Rows that join a running batch mid-way and leave it (continuous batching,
`editors/decoding.py`): base-model rows beside installed edits, and what a regroup keeps.
That every backend's rows generate what they generate alone when they join mid-batch is
checked with the generation contract (test_editor_contract.py)."""

from __future__ import annotations

import torch

from kmd.editors.decoding import DecodeBatch
from kmd.editors.registry import get_backend
from kmd.editors.scoring import generate_ids

from .continuous import continuous, schedule
from .test_editor_contract import EDIT, OTHER, SERVED, THIRD


def test_base_model_rows_ignore_the_installed_edits(tiny_host):
    """`editor=None` rows run the base model while an editor's hooks stay installed (the
    console's "before" answers go through the serving engine beside edited rows). The gate
    is the protocol's, the same for every backend: the fake one shows it."""
    editor = get_backend("fake")(tiny_host)
    for request in (EDIT, OTHER, THIRD):
        editor.apply(request)
    prompts = [tiny_host.encode(p) for p in SERVED]
    limits = [10] * len(prompts)
    got = continuous(tiny_host, None, schedule(prompts, limits))
    assert editor._handle is not None, "the edits' hooks are installed meanwhile"
    assert got != [generate_ids(tiny_host, editor, [p], n)[0] for p, n in zip(prompts, limits, strict=True)]
    with editor.suspended():
        base = [generate_ids(tiny_host, None, [p], n)[0] for p, n in zip(prompts, limits, strict=True)]
    assert got == base


def test_leaving_rows_take_the_columns_only_they_needed(tiny_host):
    long, short = tiny_host.encode("the sky is blue and the sun is"), tiny_host.encode("the dog")
    batch = DecodeBatch.prefill(tiny_host, None, [long, short])
    assert batch.attention.shape == (2, len(long))
    assert DecodeBatch.regroup([(batch, [0, 1])]) is batch, "nothing joined or left: no copy"
    kept = DecodeBatch.regroup([(batch, [1])])
    assert kept.attention.shape == (1, len(short)) and bool(kept.attention.all())
    keys = kept.cache.layers[0].keys
    assert keys.shape[0] == 1 and keys.shape[2] == len(short)
    assert torch.equal(kept.logits, batch.logits[1:])
