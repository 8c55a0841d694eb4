"""Every backend: rows that join a running batch mid-way, and rows that leave it, generate
what they generate alone (continuous batching, `editors/decoding.py`; tiny random Llama)."""

from __future__ import annotations

import pytest
import torch

from kmd.editors.answers import encode_as
from kmd.editors.decoding import DecodeBatch
from kmd.editors.registry import backend_names, get_backend
from kmd.editors.scoring import generate_ids
from tiny import chat_template

from .conftest import backend_options
from .test_editor_contract import EDIT, OTHER, SERVED, THIRD


@pytest.fixture(params=backend_names())
def editor(request, tiny_host):
    cls = get_backend(request.param)
    options = backend_options(request.param, request)
    return cls(tiny_host, cls.default_config(tiny_host, **options)) if options else cls(tiny_host)


def continuous(host, editor, arrivals: dict[int, list[tuple[list[int], int]]]) -> list[list[int]]:
    """Greedy decoding the way the serving engine schedules it: at step s the rows
    `arrivals[s]` ((prompt ids, max new tokens) each) run their prefill together and join the
    running batch; a row leaves once it has its tokens or wrote EOS. Tokens per row, in
    arrival order."""
    eos = host.tokenizer.eos_token_id
    out: list[list[int]] = []
    running: DecodeBatch | None = None
    rows: list[int] = []  # which request each row of `running` is
    limits: list[int] = []
    step = 0
    while step <= max(arrivals) or rows:
        if step in arrivals:
            joining = DecodeBatch.prefill(host, editor, [ids for ids, _ in arrivals[step]])
            rows += list(range(len(out), len(out) + joining.size))
            out += [[] for _ in arrivals[step]]
            limits += [n for _, n in arrivals[step]]
            running = joining if running is None else DecodeBatch.regroup([(running, range(running.size)),
                                                                          (joining, range(joining.size))])  # fmt: skip
        if running is not None and rows:
            tokens = running.logits.argmax(-1)  # (B,)
            for row, token in zip(rows, tokens.tolist(), strict=True):
                out[row].append(token)
            staying = [i for i, row in enumerate(rows) if len(out[row]) < limits[row] and out[row][-1] != eos]
            running = DecodeBatch.regroup([(running, staying)])
            tokens, rows = tokens[staying], [rows[i] for i in staying]
            if running is not None:
                running.step(tokens)
        step += 1
    return out


def schedule(prompts: list[list[int]], limits: list[int]) -> dict[int, list[tuple[list[int], int]]]:
    """Two rows start, then pairs join at steps 2 and 5, and the rest one by one."""
    at = [0, 0, 2, 2, 5, 5] + list(range(6, 6 + max(0, len(prompts) - 6)))
    arrivals: dict[int, list[tuple[list[int], int]]] = {}
    for prompt, limit, step in zip(prompts, limits, at, strict=False):
        arrivals.setdefault(step, []).append((prompt, limit))
    return arrivals


def test_rows_joining_and_leaving_a_running_batch_generate_what_they_would_alone(tiny_host, editor):
    """Plain rows, then chat turns mixed with plain rows (one set of edits: they cost seconds)."""
    for request in (EDIT, OTHER, THIRD):
        editor.apply(request)
    prompts = [tiny_host.encode(p) for p in SERVED]
    limits = [10, 4, 10, 7, 10, 3]  # rows leave at different steps while others run on
    got = continuous(tiny_host, editor, schedule(prompts, limits))
    alone = [generate_ids(tiny_host, editor, [p], n)[0] for p, n in zip(prompts, limits, strict=True)]
    assert got == alone, "a row's tokens depend on when it joined the batch or who left it"
    with editor.suspended():
        base = generate_ids(tiny_host, None, [prompts[0]], limits[0])[0]
    assert alone[0] != base, "the edit must act on its own prompt for this check to mean anything"

    with chat_template(tiny_host):
        chats = [encode_as(tiny_host, p, form) for p in SERVED[:4] for form in ("chat", "plain")]
        limits = [10, 5, 10, 8, 3, 10, 6, 10]
        got = continuous(tiny_host, editor, schedule(chats, limits))
        alone = [generate_ids(tiny_host, editor, [p], n)[0] for p, n in zip(chats, limits, strict=True)]
    assert got == alone, "chat turns: a row's tokens depend on when it joined the batch"


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
