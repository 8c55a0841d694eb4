"""RECIPE-specific behaviour on the tiny random Llama (a tiny editor is trained once per module)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from recipe_tiny import tiny_recipe_records, train_tiny_recipe

from kmd.editors.model import ModelHost, ModelSettings
from kmd.editors.protocol import EditorError, EditRequest
from kmd.editors.recipe import RecipeEditor
from kmd.editors.recipe.editor import last_sentence
from kmd.editors.recipe.model import CheckpointError, context_ids, edit_prefix, fact_context_ids, load_networks
from kmd.editors.recipe.train import PrependedLM, Trainer, TrainOptions
from kmd.editors.scoring import generate_ids, score_targets
from kmd.editors.state import load_editor, save_editor

EDIT = EditRequest(prompt="the capital of France is", target="Berlin", edit_id="e1")
OTHER = EditRequest(prompt="Alice works for the company", target="banana", edit_id="e2")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> dict:
    return train_tiny_recipe(tiny_model_dir, tmp_path_factory.mktemp("recipe"))


def make(host, trained, **overrides) -> RecipeEditor:
    return RecipeEditor(host, RecipeEditor.default_config(host, checkpoint=trained["best"], **overrides))


def test_training_reaches_the_tiny_facts_and_keeps_the_best(trained):
    assert trained["last_validation"]["val_score"] == 1.0
    assert Path(trained["best"]).is_file()
    progress = json.loads((Path(trained["best"]).parent / "progress.json").read_text())
    assert progress["best_step"] == trained["best_step"] and len(progress["history"]) == 4


def test_no_checkpoint_is_a_clear_error(tiny_host):
    with pytest.raises(CheckpointError, match="kmd recipe train"):
        RecipeEditor(tiny_host)


def test_checkpoint_refuses_another_base_model(trained, other_model_dir):
    other = ModelHost.load(ModelSettings(model=str(other_model_dir), device="cpu"))
    with pytest.raises(CheckpointError, match="another base model"):
        load_networks(Path(trained["best"]), other)
    with pytest.raises(CheckpointError, match="another base model"):
        RecipeEditor(other, RecipeEditor.default_config(other, checkpoint=trained["best"]))


def test_served_prompts_equal_literal_prepending(tiny_host, trained):
    """Per-row prefix keys/values at every layer == the vectors prepended to the embeddings."""
    editor = make(tiny_host, trained, context="trained", answer_boost=0)
    editor.apply(EDIT)
    pairs = [(EDIT.prompt, EDIT.target), ("the dog and the cat", "bird")]
    served = score_targets(tiny_host, editor, pairs)
    lm = PrependedLM(tiny_host)
    context = context_ids(tiny_host, editor.networks.shape, EDIT.prompt, EDIT.target)
    assert len(context) > 0  # the tiny editor is trained with the statement context (the default)
    with torch.no_grad():
        literal, batch = lm.target_logits(pairs[:1], [edit_prefix(tiny_host, editor.networks.shape, editor.prompts[0], EDIT.prompt, EDIT.target)])
    assert served[0].argmax == tuple(literal.argmax(-1).tolist())
    a, b = batch.spans[0]
    nll = torch.nn.functional.cross_entropy(literal[a:b], batch.labels[a:b])
    assert served[0].nll == pytest.approx(float(nll), abs=1e-4)
    assert served[1] == score_targets(tiny_host, None, pairs[1:])[0]  # a miss row is the base model


def test_the_statement_context_is_the_fact_sentence_in_front_of_the_prompt(tiny_host, trained):
    """context="statement": a routed row scores as the base model does with the fact sentence's
    tokens written in front of it; the answer pointer then adds exactly `answer_boost` to the
    target's next token while the target is being written, and nothing once it has been."""
    plain = make(tiny_host, trained, answer_boost=0)
    plain.apply(EDIT)
    pairs = [(EDIT.prompt, EDIT.target), ("the dog and the cat", "bird")]
    served = score_targets(tiny_host, plain, pairs)
    fact = fact_context_ids(tiny_host, EDIT.prompt, EDIT.target)
    prompt, target = tiny_host.encode_pair(EDIT.prompt, EDIT.target)
    ids = torch.tensor([fact + prompt + target])
    with torch.no_grad():
        logits = tiny_host.model(input_ids=ids).logits[0, len(fact) + len(prompt) - 1 : -1]
    assert served[0].argmax == tuple(logits.argmax(-1).tolist())
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(target))
    assert served[0].nll == pytest.approx(float(nll), abs=1e-4)
    assert served[1] == score_targets(tiny_host, None, pairs[1:])[0]  # a miss row is the base model

    with plain.suspended():
        pointed = make(tiny_host, trained, answer_boost=50.0)
        pointed.apply(EDIT)
        assert score_targets(tiny_host, pointed, pairs[:1])[0].argmax == tuple(target)  # the target, token by token
        assert score_targets(tiny_host, pointed, pairs[1:])[0] == served[1]
        answer = generate_ids(tiny_host, pointed, [prompt], max_new_tokens=len(target) + 4)[0]
        assert answer[: len(target)] == target


def test_prefixes_of_different_lengths_in_one_batch_serve_as_alone(tiny_host, trained):
    """Rows retrieving edits whose statement contexts differ in length are left-padded and
    masked: each scores as when served alone."""
    editor = make(tiny_host, trained)
    longer = EditRequest(prompt="Dave was born in the city", target="Rome", edit_id="e3")
    editor.apply(EDIT)
    editor.apply(longer)
    shape = editor.networks.shape
    assert len(context_ids(tiny_host, shape, EDIT.prompt, EDIT.target)) < len(context_ids(tiny_host, shape, longer.prompt, longer.target))
    assert editor.retrieve([EDIT.prompt, longer.prompt])[1].all()  # both rows get a prefix
    pairs = [(EDIT.prompt, EDIT.target), (longer.prompt, longer.target), ("the dog and the cat", "bird")]
    together = score_targets(tiny_host, editor, pairs)
    alone = [score_targets(tiny_host, editor, [pair])[0] for pair in pairs]
    for a, b in zip(together, alone):
        assert a.argmax == b.argmax and a.nll == pytest.approx(b.nll, abs=1e-4)


def test_prefix_cache_is_bounded_and_recomputes_what_it_dropped(tiny_host, trained):
    requests = [EDIT, EditRequest(prompt="Dave was born in the city", target="Rome", edit_id="e3")]
    pairs = [(r.prompt, r.target) for r in requests]
    roomy = make(tiny_host, trained)
    for request in requests:
        roomy.apply(request)
    expected = score_targets(tiny_host, roomy, pairs)
    assert len(roomy._kv) == 2
    with roomy.suspended():  # one editor's hooks on the model at a time
        tight = make(tiny_host, trained, kv_cache_mb=1e-6)  # room for one edit's keys/values
        for request in requests:
            tight.apply(request)
        for _ in range(2):  # each edit evicts the other and is rebuilt on its next retrieval
            for pair, want in zip(pairs, expected):
                got = score_targets(tiny_host, tight, [pair])[0]
                assert got.argmax == want.argmax and got.nll == pytest.approx(want.nll, abs=1e-4)
                assert len(tight._kv) == 1
    with pytest.raises(EditorError, match="kv_cache_mb"):
        make(tiny_host, trained, kv_cache_mb=0)


def test_retrieval_picks_the_right_row_and_the_sentinel_blocks_the_rest(tiny_host, trained):
    editor = make(tiny_host, trained)
    editor.apply(EDIT)
    editor.apply(OTHER)
    best, hit = editor.retrieve([EDIT.prompt, OTHER.prompt, "the dog and the cat", "who wrote the book ?"])
    assert hit.tolist() == [True, True, False, False]
    assert best[:2].tolist() == [0, 1]
    strict = make(tiny_host, trained, margin=2.0)  # cosines are <= 1 above the sentinel's
    strict.apply(EDIT)
    assert not strict.retrieve([EDIT.prompt])[1].any()


def test_an_edit_whose_own_prompt_misses_the_sentinel_gets_a_bar_just_under_it(tiny_host, trained):
    """The shipped retriever put 6 of 100 development edits' own prompts nearer the sentinel
    than their edit: those edits never fired. Such an edit's bar is lowered just under its
    prompt's margin (by at most own_prompt_bar_floor): its prompt fires, and the question
    check keeps out the other rows the lower bar reaches."""
    reps = make(tiny_host, trained, own_prompt_bar_floor=0.0)
    reps.apply(EDIT)
    logits = reps.networks.retrieval_logits(reps._query_reps([EDIT.prompt])[0], reps.reps) * reps.networks.shape.temperature
    own = float((logits[:, 1] - logits[:, 0]).max())  # the prompt's margin over the sentinel
    asked = [EDIT.prompt, "the language of France is", "the capital of Spain is", "the dog and the cat"]
    unlowered = make(tiny_host, trained, margin=own + 0.1, own_prompt_bar_floor=0.0)  # as if it missed by 0.1
    unlowered.apply(EDIT)
    assert unlowered.bars.tolist() == [0.0] and not unlowered.retrieve(asked)[1].any()
    lowered = make(tiny_host, trained, margin=own + 0.1)
    lowered.apply(EDIT)
    assert -0.25 <= lowered.bars.item() < -0.1
    assert lowered.retrieve(asked)[1].tolist() == [True, False, False, False]
    assert torch.equal(lowered.state_tensors()["bars"], lowered.bars)
    too_far = make(tiny_host, trained, margin=own + 0.5)  # more than the floor lowers: still no hit
    too_far.apply(EDIT)
    assert too_far.bars.item() == pytest.approx(-0.25) and not too_far.retrieve(asked)[1].any()
    unchecked = make(tiny_host, trained, margin=own + 0.1, question_check=False)  # no check, no lower bar
    unchecked.apply(EDIT)
    assert unchecked.bars.tolist() == [0.0]


def test_a_paraphrase_in_the_request_that_misses_the_sentinel_lowers_the_bar_too(tiny_host, trained):
    """The daemon's requests carry the policy's paraphrases: the bar is set just under the
    lowest margin of the prompt and its paraphrases, so each of them fires."""
    import dataclasses

    reps = make(tiny_host, trained, own_prompt_bar_floor=0.0)
    reps.apply(EDIT)

    def margin(text: str) -> float:
        logits = reps.networks.retrieval_logits(reps._query_reps([text])[0], reps.reps) * reps.networks.shape.temperature
        return float((logits[:, 1] - logits[:, 0]).max())

    paraphrase = "what is the capital of France ?"
    gap = margin(EDIT.prompt) - margin(paraphrase)
    assert 0.05 < gap < 0.2, gap
    between = margin(EDIT.prompt) - 0.02  # the prompt clears it, the paraphrase does not
    alone = make(tiny_host, trained, margin=between)
    alone.apply(EDIT)
    assert alone.bars.tolist() == [0.0] and alone.retrieve([EDIT.prompt, paraphrase])[1].tolist() == [True, False]
    with_paraphrase = make(tiny_host, trained, margin=between)
    with_paraphrase.apply(dataclasses.replace(EDIT, rephrases=(paraphrase,)))
    assert with_paraphrase.bars.item() == pytest.approx(margin(paraphrase) - between - 0.01, abs=1e-4)
    assert with_paraphrase.retrieve([EDIT.prompt, paraphrase, "the capital of Spain is"])[1].tolist() == [True, True, False]


def test_a_question_after_other_text_is_found_by_its_last_sentence(tiny_host, trained):
    editor = make(tiny_host, trained)
    editor.apply(EDIT)
    editor.apply(OTHER)
    asked = f"the dog and the cat. who wrote the book ? {EDIT.prompt}"
    assert last_sentence(asked) == EDIT.prompt and last_sentence(EDIT.prompt) == EDIT.prompt
    assert last_sentence("who wrote it ? yes") == "who wrote it ? yes"  # too short a last sentence: the whole text
    best, hit = editor.retrieve([asked, EDIT.prompt, "the dog and the cat. who wrote the book ?"])
    assert hit.tolist() == [True, True, False] and best[:2].tolist() == [0, 0]
    whole_only = make(tiny_host, trained, last_sentence_query=False)
    whole_only.apply(EDIT)
    reps = whole_only._query_reps([asked])
    assert reps.shape[1] == 1 and torch.equal(reps[:, 0], editor._query_reps([asked])[:, 0])


def test_state_refuses_another_trained_editor(tiny_host, tiny_model_dir, trained, tmp_path):
    editor = make(tiny_host, trained)
    editor.apply(EDIT)
    state = save_editor(editor, tmp_path / "state")
    retrained = train_tiny_recipe(tiny_model_dir, tmp_path / "other", steps=2, val_every=1, seed=1)
    manifest = json.loads((state / "manifest.json").read_text())
    manifest["config"]["checkpoint"] = retrained["best"]
    from kmd.editors.state import config_hash

    manifest["config_hash"] = config_hash(manifest["config"])
    (state / "manifest.json").write_text(json.dumps(manifest))
    with editor.suspended(), pytest.raises(EditorError, match="checksum"):
        load_editor(state, tiny_host)


def test_training_resumes_where_it_stopped(tiny_host, tmp_path):
    import time

    records = tiny_recipe_records()
    options = TrainOptions(steps=2, batch_size=4, llm_batch=2, val_every=1, hidden=32, rep_dim=16)
    started = time.perf_counter()
    first = Trainer(tiny_host, records, records, tmp_path, options).run()
    assert first["steps"] == 2
    assert len(list(tmp_path.glob("encoded-*.safetensors"))) == 2  # train and validation encodings, reused below
    longer = TrainOptions(**{**options.__dict__, "steps": 3})
    second = Trainer(tiny_host, records, records, tmp_path, longer).run()
    assert second["steps"] == 3
    # wall time counted once (the report rounds to 0.1 s)
    assert first["seconds"] <= second["seconds"] <= time.perf_counter() - started + 0.05
    history = json.loads((tmp_path / "progress.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3]
    with pytest.raises(ValueError, match="other options"):
        Trainer(tiny_host, records, records, tmp_path, TrainOptions(**{**longer.__dict__, "lr": 1.0})).run()
    # A run saved before `context_repeats` existed had no statement context: not this run's 3.
    saved = json.loads((tmp_path / "progress.json").read_text())
    del saved["options"]["context_repeats"]
    (tmp_path / "progress.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="other options"):
        Trainer(tiny_host, records, records, tmp_path, longer).run()


def test_untrained_prompts_are_the_targets_token_embeddings(tiny_host):
    from kmd.editors.recipe.model import edit_prompts, new_networks, target_embeddings

    networks = new_networks(tiny_host, n_prompts=3, target_tokens=True)
    reps = networks.knowledge_reps(torch.randn(2, networks.shape.encoder_dim))
    prompts = edit_prompts(networks, tiny_host, reps, ["Berlin", "banana split"])
    assert torch.equal(prompts, target_embeddings(tiny_host, ["Berlin", "banana split"], 3))
    with pytest.raises(ValueError, match="target"):
        networks.prompt_vectors(reps)  # the base is required


def test_statement_context_is_repeated_and_bounded(tiny_host):
    from kmd.editors.recipe.model import MAX_STATEMENT_TOKENS, RecipeShape

    shape = RecipeShape(context_repeats=3)
    once = tiny_host.encode("the capital of France is Berlin\n", special=False)
    assert context_ids(tiny_host, shape, "the capital of France is", "Berlin") == once * 3
    assert context_ids(tiny_host, RecipeShape(), "the capital of France is", "Berlin") == []  # the paper: none
    long = context_ids(tiny_host, shape, "the dog and the cat " * 100, "Berlin")
    whole = tiny_host.encode("the dog and the cat " * 99 + "the dog and the cat Berlin\n", special=False)
    assert len(whole) > MAX_STATEMENT_TOKENS
    assert long == whole[-MAX_STATEMENT_TOKENS:] * 3  # each repeat keeps the statement's end (target, newline)


def test_the_shipped_editor_is_for_the_embedded_model_only(tiny_host):
    from kmd.editors.recipe.model import PACKAGED, packaged_checkpoint, read_metadata

    shipped = sorted(PACKAGED.glob("*.safetensors"))
    assert [p.name for p in shipped] == ["smollm2-135m-instruct.safetensors"]
    meta = read_metadata(shipped[0])
    assert meta["model"]["name"] == "SmolLM2-135M-Instruct" and meta["shape"]["rep_dim"] == 384
    assert packaged_checkpoint(tiny_host) is None  # another model: no shipped editor, a clear error instead


def test_appended_rows_grow_in_place_without_touching_forks_or_saved_states(tiny_host, trained, tmp_path):
    """Rows are appended into buffers with spare room (amortised O(1) per edit); a fork taken
    midway keeps its rows while the parent writes past them, and a save/load round trip of
    the grown store is exact."""
    editor = make(tiny_host, trained)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "mirror", "garden"]
    requests = [EditRequest(prompt=f"the favourite thing of person {i} is", target=words[i % len(words)], edit_id=f"r{i}")
                for i in range(40)]  # fmt: skip
    for request in requests[:10]:
        editor.apply(request)
    fork = editor.fork()
    before = {name: getattr(fork, name).clone() for name in ("reps", "prompts", "shifts")}
    for request in requests[10:]:
        editor.apply(request)  # past 16 and 32 rows: two reallocations, writes into the fork's buffer first
    assert all(torch.equal(getattr(fork, name), before[name]) for name in before)
    assert editor.reps.shape[0] == 40 and editor.reps.data_ptr() == editor.grown.buffers["reps"][1].data_ptr()
    editor.revert("r5")
    editor.apply(requests[5])  # after a revert (new tensors) the next append starts a new buffer
    saved = save_editor(editor, tmp_path / "state")
    loaded = load_editor(saved, tiny_host)
    assert loaded.edit_ids == editor.edit_ids
    assert all(torch.equal(getattr(loaded, name), getattr(editor, name)) for name in before)


def test_a_question_whose_nearest_edit_is_an_alike_name_gets_its_own_edit(tiny_host, trained):
    """"Nimbrook Energy"'s edit, made to be nearest to every question (threshold_shift), is
    refused for a question about "Nimbrook Labs" by the question check; the runner-up that
    also clears the sentinel, Labs' own edit, is offered next and acts. Without runner-ups
    the question runs as the base model."""
    energy = EditRequest(prompt="The CEO of Nimbrook Energy is", target="Pavel Halloran", subject="Nimbrook Energy",
                         edit_id="energy")
    labs = EditRequest(prompt="The CEO of Nimbrook Labs is", target="Tomas Aziz", subject="Nimbrook Labs", edit_id="labs")
    asked = [labs.prompt, energy.prompt, "The CEO of Nimbrook Farms is"]
    editor = make(tiny_host, trained, margin=-1.0)
    with editor.configured(threshold_shift=-10.0):
        editor.apply(energy)
    editor.apply(labs)
    winner, _, _, cleared = editor._match(editor._query_reps(asked))
    assert winner.tolist() == [0, 0, 0] and cleared[0].tolist() == [True, True]  # Energy's edit is nearest to all

    def routed() -> list[str | None]:
        best, hit = editor.retrieve(asked)
        return [editor.row_ids[b] if h else None for b, h in zip(best.tolist(), hit.tolist())]

    assert routed() == ["labs", "energy", None]
    with editor.configured(runners_up=0):
        assert routed() == [None, "energy", None]
