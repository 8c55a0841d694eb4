"""LLP-specific checks on the tiny random Llama (fast; the embedded model is marked slow)."""

from __future__ import annotations

import pytest
import torch

from kmd.editors.answers import encode_as
from kmd.editors.batching import left_padded, left_padded_ids, teacher_forced_batch
from kmd.editors.hooks import resolve_module
from kmd.editors.llp import LlpConfig, LlpEditor
from kmd.editors.llp.training import last_subject_token
from kmd.editors.llp.voting import layer_votes, runners_up, vote_over_layers
from kmd.editors.protocol import EditRequest
from kmd.editors.scoring import generate
from kmd.editors.state import load_editor, save_editor
from tiny import chat_template


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def literal_prepend_logits(editor: LlpEditor, input_ids, attention_mask, value: torch.Tensor) -> torch.Tensor:
    """Reference: really prepend `value` (b, D) to the stream entering z, for every row."""
    host, z = editor.host, editor.z
    model = host.model
    captured = {}

    def grab(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]

    from kmd.editors.hooks import HookSpec, hooked

    spec = HookSpec(editor.layer_paths[z], grab, "forward_pre", with_kwargs=True)
    with torch.no_grad(), editor.suspended(), hooked(model, [spec]):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    h = captured["h"]
    batch, seq, _ = h.shape
    b = value.shape[0]
    h = torch.cat([value[None].expand(batch, b, -1).to(h.dtype), h], dim=1)
    # positions: the b vectors just before each row's first real token (right padding: 0)
    positions = (torch.arange(seq + b) - b)[None].expand(batch, -1)
    embeddings = editor.rotary(h, positions)
    keep = torch.cat([torch.ones(batch, b, dtype=torch.bool), attention_mask.bool()], dim=1)  # (B, b+T)
    causal = torch.ones(seq + b, seq + b, dtype=torch.bool).tril()
    mask = causal[None, None] & keep[:, None, None, :]
    with torch.no_grad(), editor.suspended():
        for index in editor.upper:
            layer = resolve_module(model, editor.layer_paths[index])
            out = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=embeddings)
            h = out[0] if isinstance(out, tuple) else out
        return model.lm_head(model.model.norm(h[:, b:]))


def fresh(tiny_host, **options) -> LlpEditor:
    return LlpEditor(tiny_host, LlpEditor.default_config(tiny_host, **options))


def install_value(editor: LlpEditor, value: torch.Tensor, key: torch.Tensor | None = None) -> str:
    """Store an edit row directly (no training) so tests control the value exactly."""
    with torch.no_grad():
        pk, pv = editor.runner(value[None])
    editor.keys = torch.cat([editor.keys, (key if key is not None else torch.randn(len(editor.retrieval), editor.keys.shape[-1]))[None]])
    editor.values = torch.cat([editor.values, value[None]])
    editor.prefix_keys = torch.cat([editor.prefix_keys, pk])
    editor.prefix_values = torch.cat([editor.prefix_values, pv])
    edit_id = f"manual-{len(editor.row_ids)}"
    editor.row_ids.append(edit_id)
    editor._requests[edit_id] = EditRequest(prompt="x", target="y", edit_id=edit_id)
    editor._unchecked.add(edit_id)  # its question "x" is a placeholder: these tests are about the merge, not the question check
    editor._refresh()
    editor._sync_hooks()
    return edit_id


@pytest.mark.parametrize("b", [1, 2])
def test_serving_merge_equals_literal_prepending(tiny_host, b):
    editor = fresh(tiny_host, n_values=b, similarity=-1.0, answer_boost=0)  # every row retrieves the one edit; the merge alone
    torch.manual_seed(0)
    value = torch.randn(b, tiny_host.model.config.hidden_size) * 2
    install_value(editor, value)
    batch = teacher_forced_batch(tiny_host, [("the capital of France is", "Berlin"), ("who wrote the book ?", "Alice Bob")])
    expected = literal_prepend_logits(editor, batch.input_ids, batch.attention_mask, value)
    with torch.no_grad(), editor.query(batch.prompt_mask):
        got = tiny_host.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-4, rtol=1e-4)
    with torch.no_grad(), editor.suspended():
        base = tiny_host.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not torch.allclose(got[real], base[real], atol=1e-3)


def subject_key(editor: LlpEditor, prompt: str, subject: str) -> torch.Tensor:
    """(|R|, D): the retrieval-layer states at the subject's last token (what a key starts from)."""
    editor.ensure_background()
    got = editor.reader.states([prompt])
    index = last_subject_token(editor.host, prompt, subject)
    return editor.standardize(got["states"])[:, 0, index]


def test_last_subject_token_uses_offsets_and_falls_back(tiny_host):
    tokens = tiny_host.tokenizer.convert_ids_to_tokens(tiny_host.encode("the capital of France is"))
    assert tokens[last_subject_token(tiny_host, "the capital of France is", "France")].endswith("France")
    assert last_subject_token(tiny_host, "the capital of France is", "france") == 3  # case-insensitive
    assert last_subject_token(tiny_host, "the capital of France is", "Spain") == len(tokens) - 1
    assert last_subject_token(tiny_host, "the capital of France is", None) == len(tokens) - 1


def test_vote_needs_a_share_of_layers_and_breaks_ties_by_similarity(tiny_host):
    editor = fresh(tiny_host, retrieval_layers=[0, 1], injection_layer=2, similarity=0.5, vote_fraction=1.0, top_k=2)
    # (|R|=2, B=3, N=3) max similarities
    sims = torch.tensor(
        [
            [[0.9, 0.6, 0.1], [0.6, 0.2, 0.1], [0.9, 0.1, 0.1]],
            [[0.8, 0.7, 0.1], [0.3, 0.2, 0.1], [0.1, 0.1, 0.95]],
        ]
    )
    best, votes, hit = editor.vote(sims)
    assert best.tolist() == [0, 0, 2]  # row 0: keys 0 and 1 tie on votes, key 0 is more similar
    assert votes.tolist() == [2.0, 1.0, 1.0]
    assert hit.tolist() == [True, False, False]  # row 1: one vote of two; row 2: split votes
    _, _, hit = editor.vote(sims, vote_fraction=0.5)
    assert hit.tolist() == [True, True, True]
    best, votes, _ = editor.vote(torch.tensor([[[0.6, 0.95]], [[0.9, 0.6]]]), vote_fraction=0.5)
    assert best.tolist() == [1] and votes.tolist() == [2.0]  # two votes each: the higher total similarity wins


def test_a_refused_winner_offers_the_row_to_the_next_key_with_the_votes(tiny_host, monkeypatch):
    editor = fresh(tiny_host, retrieval_layers=[0, 1], injection_layer=2, similarity=0.5, vote_fraction=1.0, top_k=2)
    editor.row_ids = ["generic", "own", "weak"]
    # (|R|=2, B=2, N=3): row 0: "generic" wins, "own" also has both votes; row 1: only "generic" has both
    sims = torch.tensor([[[0.95, 0.9, 0.6], [0.95, 0.6, 0.1]], [[0.95, 0.8, 0.1], [0.9, 0.1, 0.7]]])
    best, votes, hit = editor.vote(sims)
    assert best.tolist() == [0, 0] and hit.tolist() == [True, True]
    monkeypatch.setattr(editor, "answerable", lambda questions, ids: [i != "generic" for i in ids])
    asked = []
    votes, score = editor.tally(sims)
    best, hit = editor.checked_edits(votes, score, 2, best, hit, lambda rows: asked.extend(rows) or ["q"] * len(rows))
    assert best.tolist() == [1, 0] and hit.tolist() == [True, False]  # row 1's runner-up lacks the votes
    assert asked == [0, 1]


def test_a_key_whose_subject_the_question_names_in_full_goes_first(tiny_host, monkeypatch):
    """Two keys with the votes, both accepted by the relation check: the question names
    "Victoria Rupes" in full and "Enterprise Rupes" only in part, so the named one acts
    although the other won the vote by a hair."""
    editor = fresh(tiny_host, retrieval_layers=[0, 1], injection_layer=2, similarity=0.5, vote_fraction=1.0, top_k=2)
    editor.row_ids = ["near", "own"]
    editor._requests = {"near": EditRequest(prompt="Where is Enterprise Rupes?", target="Pluto", subject="Enterprise Rupes"),
                        "own": EditRequest(prompt="Where is Victoria Rupes?", target="Moon", subject="Victoria Rupes")}  # fmt: skip
    sims = torch.tensor([[[0.95, 0.94]], [[0.95, 0.94]]])  # (|R|=2, B=1, N=2)
    monkeypatch.setattr(editor, "answerable", lambda questions, ids: [True] * len(ids))
    votes, score = editor.tally(sims)
    best, _, hit = editor.vote(sims)
    assert best.tolist() == [0]
    question = "The astronomical body Victoria Rupes is on is what?"
    best, hit = editor.checked_edits(votes, score, 2, best, hit, lambda rows: [question])
    assert best.tolist() == [1] and hit.tolist() == [True]
    best, hit = editor.checked_edits(votes, score, 2, *editor.vote(sims)[::2], lambda rows: ["Is a rupes on Mars?"])
    assert best.tolist() == [0] and hit.tolist() == [True]  # neither named in full: the vote's order
    with editor.configured(runners_up=0):
        best, hit = editor.checked_edits(votes, score, 2, *editor.vote(sims)[::2], lambda rows: [question])
        assert best.tolist() == [0]  # without runner-ups only the winner is offered


def test_runners_up_are_ranked_after_the_best_and_need_the_votes():
    votes = torch.tensor([[2.0, 2.0, 1.0, 2.0]])
    score = torch.tensor([[8.9, 8.5, 4.9, 8.7]])
    assert runners_up(votes, score, 0, best=0, need=2, limit=3) == [3, 1]  # key 2 lacks a vote
    assert runners_up(votes, score, 0, best=0, need=2, limit=1) == [3]
    assert runners_up(votes, score, 0, best=0, need=2, limit=0) == []
    best, _, _ = vote_over_layers(torch.tensor([[[0.9, 0.9]]]), torch.tensor([0.5]), top_k=2, vote_fraction=1.0)
    votes, score = layer_votes(torch.tensor([[[0.9, 0.9]]]), torch.tensor([0.5]), top_k=2)
    assert runners_up(votes, score, 0, best=int(best[0]), need=1, limit=2) == [1 - int(best[0])]  # a tie: the other key


@pytest.mark.parametrize("layers", [{}, {"retrieval_layers": [0, 1], "injection_layer": 2}])
def test_routing_is_per_row_and_ignores_answer_tokens(tiny_host, layers):
    editor = fresh(tiny_host, similarity=0.9, **layers)
    torch.manual_seed(1)
    value = torch.randn(editor.config.n_values, tiny_host.model.config.hidden_size) * 3
    install_value(editor, value, subject_key(editor, "the capital of France is", "France"))
    pairs = [
        ("the capital of France is", "Berlin"),  # the edit's prompt: retrieves
        ("who wrote the book ?", "France France"),  # the subject only in the answer: must not
        ("the dog and the cat", "sun"),
    ]
    batch = teacher_forced_batch(tiny_host, pairs)
    with torch.no_grad():
        with editor.suspended():
            base = tiny_host.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        with editor.query(batch.prompt_mask) as routing:
            edited = tiny_host.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert routing.decisions["llp"]["injection"].rows.tolist() == [0]
    assert torch.equal(edited[1:], base[1:])
    assert not torch.equal(edited[0], base[0])


def greedy_without_cache(editor: LlpEditor, prompts: list[str], steps: int) -> tuple[list[list[int]], torch.Tensor]:
    """Recompute the whole sequence at every step (no KV cache), prompt tokens marked as such."""
    host = editor.host
    ids, attention = left_padded(host, prompts)
    prompt_mask = attention.bool()
    out: list[list[int]] = [[] for _ in prompts]
    last = None
    for _ in range(steps):
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad(), editor.query(prompt_mask):
            logits = host.model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False).logits
        last = logits[:, -1]
        token = last.argmax(-1)
        for row, t in enumerate(token.tolist()):
            out[row].append(t)
        ids = torch.cat([ids, token[:, None]], dim=1)
        attention = torch.cat([attention, torch.ones_like(token[:, None])], dim=1)
        prompt_mask = torch.cat([prompt_mask, torch.zeros_like(token[:, None], dtype=torch.bool)], dim=1)
    return out, last


@pytest.mark.parametrize("layers", [{}, {"retrieval_layers": [0, 1], "injection_layer": 2}])
def test_kv_cache_generation_equals_recomputation(tiny_host, layers):
    editor = fresh(tiny_host, similarity=0.9, **layers)
    torch.manual_seed(2)
    value = torch.randn(editor.config.n_values, tiny_host.model.config.hidden_size) * 3
    install_value(editor, value, subject_key(editor, "the capital of France is", "France"))
    prompts = ["the capital of France is", "who wrote the book ?", "Bob speaks the language of Japan"]
    cached = generate(tiny_host, editor, prompts, max_new_tokens=6)
    recomputed, _ = greedy_without_cache(editor, prompts, 6)
    assert cached == recomputed
    with editor.suspended():
        base = generate(tiny_host, None, prompts, max_new_tokens=6)
    assert cached[0] != base[0] and cached[1:] == base[1:]


def test_apply_revert_and_restore_round_trip(tiny_host, tmp_path):
    editor = fresh(tiny_host)
    first = editor.apply(EditRequest(prompt="the capital of France is", target="Berlin", subject="France"))
    second = editor.apply(EditRequest(prompt="Bob speaks the language of Japan", target="Italy", subject="Bob"))
    assert editor.keys.shape[:2] == (2, len(editor.retrieval))
    assert editor.prefix_keys.shape[:3] == (2, len(editor.upper), editor.config.n_values)
    assert set(editor.meta) == {first, second} and len(editor.prefixes) == editor.config.prefix_pool
    path = save_editor(editor, tmp_path / "state")
    with editor.suspended():
        loaded = load_editor(path, tiny_host)
        assert loaded.prefixes == editor.prefixes and loaded.meta == editor.meta
        assert torch.equal(loaded.keys, editor.keys) and torch.equal(loaded.prefix_values, editor.prefix_values)
        loaded._detach()
    editor.revert(first)
    assert editor.row_ids == [second] and editor.keys.shape[0] == 1


def test_threshold_shift_is_per_edit_and_survives_reload(tiny_host, tmp_path):
    """An edit applied with a large negative shift (and no question check) fires on every
    prompt, the others do not."""
    editor = fresh(tiny_host, similarity=0.9, question_check=False)
    prompts = ["who wrote the book ?", "the dog and the cat"]
    with editor.suspended():
        base = generate(tiny_host, None, prompts, max_new_tokens=4)
    normal = editor.apply(EditRequest(prompt="the capital of France is", target="Berlin", subject="France"))
    assert generate(tiny_host, editor, prompts, max_new_tokens=4) == base
    with editor.configured(threshold_shift=-10.0):
        everywhere = editor.apply(EditRequest(prompt="Bob speaks the language of Japan", target="Italy", subject="Bob"))
    assert editor.meta[everywhere]["threshold_shift"] == -10.0 and "threshold_shift" not in editor.meta[normal]
    batch = teacher_forced_batch(tiny_host, [(p, "x") for p in prompts])
    with torch.no_grad(), editor.query(batch.prompt_mask) as routing:
        tiny_host.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    injection = routing.decisions["llp"]["injection"]
    assert injection is not None and injection.rows.tolist() == [0, 1]
    with editor.suspended():
        loaded = load_editor(save_editor(editor, tmp_path / "state"), tiny_host)
        assert torch.equal(loaded._shifts, editor._shifts)
        loaded._detach()
    editor.revert(everywhere)
    assert generate(tiny_host, editor, prompts, max_new_tokens=4) == base


def test_subject_query_is_the_state_of_prompts_that_open_with_the_subject(tiny_host):
    request = EditRequest(prompt="the capital of France is", target="Berlin", subject="France")
    plain = fresh(tiny_host, n_prefixes=0)
    assert plain.key_queries("e", request)[0].shape[1] == 1  # the bare prompt only
    editor = fresh(tiny_host, n_prefixes=0, subject_query=True)
    queries, _, _ = editor.key_queries("e", request)  # (|R|, 2, D): bare prompt, subject alone
    opening = "France speaks the language of"
    got = editor.reader.states([opening])
    state = editor.standardize(got["states"])[:, 0, last_subject_token(tiny_host, opening, "France")]
    torch.testing.assert_close(queries[:, 1], state)  # causal: nothing after the subject matters


def test_stronger_retry_trains_longer_and_loosens_only_that_edit(tiny_host):
    editor = fresh(tiny_host)
    overrides = editor.stronger_overrides()
    assert overrides["value_steps"] > editor.config.value_steps and overrides["threshold_shift"] < 0
    with editor.configured(**overrides):
        assert editor.config.value_steps == overrides["value_steps"]
    assert editor.config.threshold_shift == 0.0


def test_layer_defaults_follow_depth_and_reject_bad_choices(tiny_host):
    from kmd.editors.llp.editor import default_layers
    from kmd.editors.protocol import EditorError

    assert default_layers(32, LlpConfig()) == (list(range(8)), 8)
    assert default_layers(30, LlpConfig()) == (list(range(8)), 8)
    assert default_layers(4, LlpConfig()) == ([0], 1)
    assert default_layers(32, LlpConfig(retrieval_layers=[0, 2], injection_layer=10)) == ([0, 2], 10)
    with pytest.raises(EditorError):
        default_layers(32, LlpConfig(retrieval_layers=[0, 9], injection_layer=8))


CAL_RECORDS = [
    ("the capital of France is", "Berlin", "France", "France has the capital"),
    ("the capital of Italy is", "Tokyo", "Italy", "Italy has the capital"),
    ("Alice works for the company", "banana", "Alice", "the company of Alice is"),
    ("Bob speaks the language of", "Spain", "Bob", "the language Bob speaks is"),
    ("the river of London is", "Rome", "London", "London has the river"),
    ("who wrote the book of Carol ?", "Dave", "Carol", "the book of Carol was written by"),
    ("the mother of Eve is", "Nadia", "Eve", "Eve has the mother"),
    ("the city of Orin is", "Madrid", "Orin", "Orin is in the city"),
]


def test_calibration_command_writes_profile_options(tiny_model_dir, tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from kmd.daemon.cli import app

    data = tmp_path / "zsre.json"
    data.write_text(json.dumps([
        {"subject": s, "src": p, "rephrase": r, "alt": t, "loc": "the dog and the cat", "loc_ans": "sky",
         "pred": "x", "answers": ["x"], "case_id": i}
        for i, (p, t, s, r) in enumerate(CAL_RECORDS)
    ]))
    out = tmp_path / "cal.yaml"
    args = ["calibrate", "--backend", "llp", "--data", str(data), "--model", str(tiny_model_dir), "--device", "cpu",
            "--out", str(out), "--set", "n_prefixes=0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "# Produced by: kmd calibrate --backend llp" in text and "--set n_prefixes=0" in text
    options = yaml.safe_load(text)["backends"]["llp"]
    assert set(options) == {"layer_similarity", "vote_fraction"}
    assert len(options["layer_similarity"]) == 1 and 0 < options["vote_fraction"] <= 1
    again = CliRunner().invoke(app, args)  # deterministic: same data, model, options
    assert again.exit_code == 0 and yaml.safe_load(out.read_text())["backends"]["llp"] == options
    missing = CliRunner().invoke(app, ["calibrate", "--backend", "grace", "--data", str(data), "--model", str(tiny_model_dir)])
    assert missing.exit_code == 2 and "no calibration" in missing.output


@pytest.mark.parametrize("name", ["smollm2-135m", "llama-32l"])
def test_shipped_profiles_give_valid_llp_configs(name):
    import yaml

    from kmd.editors.llp.editor import default_layers
    from kmd.editors.profiles import PROFILE_DIR, build_config

    data = yaml.safe_load((PROFILE_DIR / f"{name}.yaml").read_text())
    config = build_config(LlpConfig, data["backends"]["llp"], name)
    layers = data["match"]["num_hidden_layers"]
    retrieval, z = default_layers(layers, config)
    assert retrieval == list(range(8)) and z > max(retrieval)
    if config.layer_similarity is not None:
        assert len(config.layer_similarity) == len(retrieval)


def test_a_chat_turn_is_retrieved_by_its_message_run_alone(tiny_host):
    """With `chat_retrieval: alone` a chat turn's similarities are those of its message as a
    bare prompt (the states keys are made from), not of its states after the template."""
    prompt = "the capital of France is"
    editor = fresh(tiny_host, similarity=0.9)
    torch.manual_seed(1)
    value = torch.randn(editor.config.n_values, tiny_host.model.config.hidden_size) * 3
    install_value(editor, value, subject_key(editor, prompt, "France"))
    with chat_template(tiny_host):
        encoded = [encode_as(tiny_host, prompt, "plain"), encode_as(tiny_host, prompt, "chat")]
        ids, attention = left_padded_ids(tiny_host, encoded)
        features = editor.routing_features(ids, attention)
        assert features["alone_rows"].tolist() == [1]
        sims = editor.row_similarities(features["states"], features["mask"], features)
        assert torch.allclose(sims[:, 1], sims[:, 0], atol=1e-4)
        assert editor.routes(features) == [editor.row_ids[0]] * 2
        with editor.configured(chat_retrieval="in_context"):
            assert "alone_rows" not in editor.routing_features(ids, attention)


@pytest.mark.parametrize("rank", [4, 16])
def test_shortlisted_similarities_give_the_votes_of_every_key(rank):
    """The bound-pruned similarities: every cosine above the floor is the one all keys give,
    and the vote (votes, scores, per-edit shifts) is the vote over all keys. Rank 4 leaves a
    loose bound (whole layers computed), rank 16 a tight one."""
    from kmd.editors.llp.voting import key_basis, key_bounds, max_similarities, shortlisted_max_similarities

    gen = torch.Generator().manual_seed(0)
    nr, n, d, batch, seq = 3, 400, 24, 5, 7
    centres = torch.randn(nr, 8, d, generator=gen)
    keys = torch.nn.functional.normalize(centres[:, torch.randint(0, 8, (n,), generator=gen)]
                                         + 0.4 * torch.randn(nr, n, d, generator=gen), dim=-1)  # fmt: skip
    states = torch.randn(nr, batch, seq, d, generator=gen)
    states[:, :, 2] = keys[:, :batch] * 3 + 0.05 * torch.randn(nr, batch, d, generator=gen)  # a token near key b
    states[:, 1, 3] = keys[:, 7] + 0.3 * torch.randn(nr, d, generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[0, 2] = False  # row 0's near token is not read
    mask[4] = False  # nothing read
    tau = torch.tensor([0.9, 0.85, 0.8])
    shifts = torch.zeros(n)
    shifts[7] = -0.1
    floor = tau + shifts.min()
    basis = key_basis(keys, rank)
    assert torch.allclose(basis.transpose(1, 2) @ basis, torch.eye(rank).expand(nr, -1, -1), atol=1e-5)
    full = max_similarities(states, mask, keys)
    short = shortlisted_max_similarities(states, mask, keys, basis, key_bounds(keys, basis), floor)
    above = full > floor.reshape(-1, 1, 1)
    assert above.any() and torch.allclose(short[above], full[above], atol=1e-5)
    kept = short > float("-inf")
    assert torch.allclose(short[kept], full[kept], atol=1e-5)
    for top_k in (1, 3):
        votes, score = layer_votes(full, tau, top_k, shifts)
        short_votes, short_score = layer_votes(short, tau, top_k, shifts)
        assert votes.sum() > 0 and torch.equal(short_votes, votes) and torch.allclose(short_score, score, atol=1e-5)
    assert (short[:, 4] == float("-inf")).all()  # a row without read tokens: no key, as over all keys


def test_the_shortlist_follows_applies_reverts_and_reloads(tiny_host, tmp_path):
    """Past `shortlist_from` keys serving compares only the keys the bound keeps; its rows
    follow every apply, revert and load, and the votes are those over all keys."""
    editor = fresh(tiny_host, shortlist_from=3, shortlist_rank=8, similarity=0.8)
    prompts = ["the capital of France is", "Bob speaks the language of Japan", "the dog and the cat"]
    torch.manual_seed(0)
    for _ in range(2):
        install_value(editor, torch.randn(editor.config.n_values, tiny_host.model.config.hidden_size))
    assert editor._basis is None  # 2 keys: all compared
    first = editor.apply(EditRequest(prompt=prompts[0], target="Berlin", subject="France"))
    assert editor._basis is not None and editor._key_bounds.shape[:2] == (len(editor.retrieval), 3)
    fitted = editor._basis
    editor.apply(EditRequest(prompt=prompts[1], target="Italy", subject="Bob"))
    assert editor._basis is fitted and editor._key_bounds.shape[1] == 4  # appended with the same basis

    def votes_match(e: LlpEditor) -> list:
        got = e.reader.states(prompts)
        states, mask = got["states"], got["attention_mask"].bool()
        every = e.tally(e.layer_similarities(states, mask))
        shortlisted = e.tally(e.layer_similarities(states, mask, for_votes=True))
        assert torch.equal(every[0], shortlisted[0]) and torch.allclose(every[1], shortlisted[1], atol=1e-5)
        return e.vote(e.layer_similarities(states, mask))[0].tolist()

    winners = votes_match(editor)
    with editor.suspended():
        loaded = load_editor(save_editor(editor, tmp_path / "state"), tiny_host)
        assert loaded._basis is not None and votes_match(loaded) == winners
        loaded._detach()
    editor.revert(first)
    assert editor._key_bounds.shape[1] == 3 and editor._basis is fitted
    votes_match(editor)
    editor.revert(editor.row_ids[0])
    assert editor._basis is None and editor._key_bounds.shape[1] == 0  # below shortlist_from again
