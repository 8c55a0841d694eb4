import json
import subprocess
import sys

import pytest

from typer.testing import CliRunner

from kmd.daemon.cli import app
from kmd.editors.bench.data import EditRecord
from kmd.editors.bench.harness import BenchOptions, run_lifelong
from kmd.editors.registry import backend_names, get_backend
from tiny import chat_template

REQUIRED = ("backend model dataset n_edits rel gen loc rel_em gen_em loc_em ppl edit_s_mean edit_s_p95 "
            "forward_ms_base forward_ms_edited overhead_ratio state_bytes_per_edit peak_rss_mb "
            "served_rel served_gen chat_rel chat_gen served_loc chat_loc degenerate degenerate_base answers_sample").split()
CHAT_TEMPLATE = "{% for m in messages %}<s> {{ m['content'] }} ?{% endfor %}{% if add_generation_prompt %} x{% endif %}"

RECORDS = [
    EditRecord("1", "the capital of France is", "Berlin", "France", ("France has the capital",), "the dog and the cat", "sky"),
    EditRecord("2", "Alice works for the company", "banana", "Alice", ("the company of Alice is",), "who wrote the book ?", "Bob"),
]


def test_backends_command_lists_the_registry_and_names_are_checked_against_it():
    """`kmd backends` prints the registered backends, one a line; a command given a name
    that is not one fails before any work, with the registry's suggestion."""
    result = CliRunner().invoke(app, ["backends"])
    assert result.exit_code == 0 and result.output.split() == backend_names()
    typo = CliRunner().invoke(app, ["calibrate", "--backend", "lpp", "--data", "no-such-file.json"])
    assert typo.exit_code == 2 and "unknown backend 'lpp'" in typo.output and "did you mean llp" in typo.output


def test_lifelong_protocol_reports_every_metric(tiny_host):
    editor = get_backend("grace")(tiny_host)
    result = run_lifelong(tiny_host, editor, RECORDS)
    assert set(REQUIRED) <= set(result)
    assert result["n_edits"] == 2 and result["rel"] == 1.0
    assert result["loc"] == 1.0 and result["loc_em"] == 1.0
    assert result["state_bytes_per_edit"] > 0 and result["overhead_ratio"] > 0


def test_served_answers_are_judged_from_generated_text(tiny_host):
    from kmd.editors.answers import answers

    with chat_template(tiny_host, CHAT_TEMPLATE):  # the tiny tokenizer has none of its own
        editor = get_backend("grace")(tiny_host)
        result = run_lifelong(tiny_host, editor, RECORDS)
        # the same judgement computed by hand on the final model
        plain = answers(tiny_host, editor, [r.prompt for r in RECORDS], "plain", [r.target for r in RECORDS])
        chat = answers(tiny_host, editor, [r.prompt for r in RECORDS], "chat", [r.target for r in RECORDS])
        assert result["served_rel"] == sum(a.correct for a in plain) / len(plain)
        assert result["chat_rel"] == sum(a.correct for a in chat) / len(chat)
        assert result["served_loc"] == 1.0 and result["chat_loc"] == 1.0  # GRACE fires on its own prompts only here
        assert 0.0 <= result["degenerate"] <= 1.0 and 0.0 <= result["degenerate_base"] <= 1.0
        first = result["answers_sample"][0]
        assert first["prompt"] == RECORDS[0].prompt and first["plain"]["edited"] == plain[0].text
        assert {"base", "edited", "correct", "rephrase_edited"} <= set(first["chat"])


def test_bench_command_writes_json(tiny_model_dir, tmp_path):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([
        {"case_id": i, "prompt": r.prompt, "target_new": r.target, "subject": r.subject,
         "ground_truth": "x", "rephrase_prompt": r.rephrases[0], "locality_prompt": r.loc_prompt,
         "locality_ground_truth": r.loc_answer}
        for i, r in enumerate(RECORDS)
    ]))
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "kmd.daemon.cli", "bench", "--backend", "grace", "--data", str(data),
           "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert set(REQUIRED) <= set(result) and result["format"] == "counterfact"
    assert "rel_em" in run.stdout and "served_rel" in run.stdout and "answers (first records)" in run.stdout


def test_bench_command_rejects_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--backend", "nope", "--data", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "unknown backend" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"src\": 1}]")
    result = runner.invoke(app, ["bench", "--backend", "grace", "--data", str(bad), "--format", "zsre"])
    assert result.exit_code == 2 and "record 0" in result.output


KNOWEDIT = [
    {"subject": "France", "prompt": "the capital of France is", "target_new": "Tokyo .", "ground_truth": "Paris",
     "portability": {"Subject_Aliasing": [{"prompt": "the capital of Spain is", "ground_truth": [["Tokyo"], ["Edo"]]}]},
     "locality": {"Relation_Specificity": [{"prompt": "the language of France is", "ground_truth": "French"}]}},
    {"subject": "Bob", "prompt": "the mother of Bob is", "target_new": "Carol .", "ground_truth": "Eve",
     "portability": {}, "locality": {"Relation_Specificity": [{"prompt": "Bob plays music", "ground_truth": "yes"}]}},
]


def test_knowedit_records_are_read_with_their_other_questions(tmp_path):
    from kmd.editors.bench.data import load_records

    path = tmp_path / "ke.json"
    path.write_text(json.dumps(KNOWEDIT))
    fmt, records = load_records(path)
    assert fmt == "knowedit" and records[0].target == "Tokyo ." and records[0].rephrases == ()
    assert [q.prompt for q in records[0].same_subject] == ["the language of France is"]
    assert records[0].portability[0].answers == ("Tokyo", "Edo") and records[0].portability[0].kind == "Subject_Aliasing"
    # no unrelated locality prompt in KnowEdit: another record's same-subject question stands in
    assert records[0].loc_prompt == "Bob plays music" and records[1].loc_prompt == "the language of France is"


def test_served_v2_counts_hijacks_and_unchanged_same_subject_answers(tiny_host, tmp_path):
    """lifelong-served/v2 on KnowEdit records: an edit that fires on its subject answers the
    other questions about it with its target (hijacked); a specific one leaves them as they were."""
    from kmd.editors.bench.data import load_records

    path = tmp_path / "ke.json"
    path.write_text(json.dumps(KNOWEDIT))
    _, records = load_records(path)
    with chat_template(tiny_host, CHAT_TEMPLATE):
        specific = run_lifelong(tiny_host, get_backend("fake")(tiny_host), records)
        broad_editor = get_backend("fake")(tiny_host)
        with broad_editor.configured(fires_on_subject=True):
            broad = run_lifelong(tiny_host, broad_editor, records)
    for key in ("edit_plain_ok", "edit_chat_ok", "edit_sys_ok", "edit_multi_ok", "same_plain_unchanged", "same_chat_hijack",
                "port_plain_ok", "port_plain_ok_base", "port_plain_ok_context", "loc_plain", "degenerate_all"):
        assert key in specific, key
    assert specific["served_protocol"] == "lifelong-served/v2"
    assert specific["same_plain_unchanged"] == 1.0 and specific["same_plain_hijack"] == 0.0 and not specific["hijack_sample"]
    assert broad["same_plain_hijack"] == 1.0 and broad["same_plain_unchanged"] == 0.0
    assert {h["question"] for h in broad["hijack_sample"]} == {"the language of France is", "Bob plays music"}
    assert broad["hijack_sample"][0]["edited"].strip().startswith(("Tokyo", "Carol"))
    first = broad["answers_sample"][0]
    assert first["plain"]["same"] == "the language of France is" and first["plain"]["same_hijacked"] is True
    assert {"base", "edited", "correct"} <= set(first["sys"]) and {"base", "edited", "correct"} <= set(first["multi"])
    for result in (specific, broad):  # every edit prompt answered wrong is listed, in its form
        for form in ("plain", "chat", "sys", "multi"):
            missed = [m for m in result["miss_sample"] if m["form"] == form]
            assert len(missed) == round((1 - result[f"edit_{form}_ok"]) * len(records)), (form, missed)
            assert all(not m["edited"].strip().startswith("Tokyo") for m in missed)


def test_distractors_are_edited_after_the_evaluated_records_and_not_scored(tiny_host):
    """`kmd bench --distract FILE:K`: K more edits after the N evaluated ones; only the N are
    scored, on the model holding all N + K; cost figures cover the whole sequence."""
    distractors = [EditRecord(str(i), f"the {w} of Japan is", "cherry", "Japan", (), "the dog and the cat", "sky")
                   for i, w in enumerate(("river", "language", "capital"))]  # fmt: skip
    editor = get_backend("fake")(tiny_host)
    result = run_lifelong(tiny_host, editor, RECORDS, distractors=distractors)
    assert result["n_edits"] == 2 and result["n_distractors"] == 3 and len(editor.edit_ids) == 5
    assert result["rel"] == 1.0 and result["served_protocol"].startswith("lifelong-served/")
    assert result["edit_s_first_1000"] is None  # fewer than two windows of edits
    assert result["state_bytes_per_edit"] > 0


TIMINGS = ("edit_s_mean", "edit_s_p95", "forward_ms_base", "forward_ms_edited", "overhead_ratio", "peak_rss_mb",
           "resumed_after_edits", "edit_s_first_1000", "edit_s_last_1000", "edit_s_last_over_first")


def test_a_checkpointed_sequence_resumes_after_its_last_checkpoint_and_ends_as_an_unbroken_run(tiny_host, tmp_path):
    """`kmd bench --checkpoint DIR`: a run stopped mid-sequence resumes from the editor state
    and edit times it saved, and scores exactly as the run that never stopped (LLP: its
    prefixes are drawn by edit id, so the ids must follow the sequence too)."""
    from kmd.editors.bench.harness import Checkpoint

    distractors = [EditRecord(str(i), f"the {w} of Japan is", "cherry", "Japan", (), "the dog and the cat", "sky")
                   for i, w in enumerate(("river", "language", "capital"))]  # fmt: skip
    def llp():  # each run's editor leaves the shared model when the next one starts (a killed process would)
        for editor in editors:
            editor.retire()
        editors.append(get_backend("llp")(tiny_host))
        return editors[-1]

    editors: list = []
    unbroken = run_lifelong(tiny_host, llp(), RECORDS, distractors=distractors)

    class Killed(Exception):
        pass

    def killed_at_the_fourth_edit(phase: str, done: int, total: int) -> None:
        if phase == "editing" and done == 4:  # applied, its checkpoint not yet written: the last one holds 2
            raise Killed

    checkpoint = Checkpoint(tmp_path / "progress", every=2)
    checkpoint.path.mkdir()
    with pytest.raises(Killed):
        run_lifelong(tiny_host, llp(), RECORDS, distractors=distractors, checkpoint=checkpoint, progress=killed_at_the_fourth_edit)
    editor = llp()
    resumed = run_lifelong(tiny_host, editor, RECORDS, distractors=distractors, checkpoint=checkpoint)
    assert resumed["resumed_after_edits"] == 2 and editor.edit_ids == [f"bench-{i}" for i in range(5)]
    for key, value in unbroken.items():
        if key not in TIMINGS:
            assert resumed[key] == value, key
    editor.retire()


def test_store_cost_times_the_same_edits_on_the_whole_store_and_on_an_empty_editor(tiny_host):
    """`--store-cost K`: after everything is scored, K edits applied to the editor holding the
    sequence and to a new empty editor, alternating; the scored figures are those of a run
    without it (it comes last)."""
    distractors = [EditRecord(str(i), f"the {w} of Japan is", "cherry", "Japan", (), "the dog and the cat", "sky")
                   for i, w in enumerate(("river", "language", "capital"))]  # fmt: skip
    plain = get_backend("llp")(tiny_host)
    without = run_lifelong(tiny_host, plain, RECORDS, distractors=distractors, options=BenchOptions(served=False))
    plain.retire()
    editor = get_backend("llp")(tiny_host)
    result = run_lifelong(tiny_host, editor, RECORDS, distractors=distractors, options=BenchOptions(served=False, store_cost=2))
    assert result["store_cost_edits"] == 2 and result["edit_s_whole_store"] > 0 and result["edit_s_empty_store"] > 0
    assert result["edit_s_whole_over_empty"] == result["edit_s_whole_store"] / result["edit_s_empty_store"]
    assert editor.edit_ids[5:] == ["cost-full-0", "cost-full-1"]  # kept: a revert would make the next apply copy the store
    for key, value in without.items():
        if key not in TIMINGS:
            assert result[key] == value, key
    editor.retire()


def test_a_checkpoint_of_another_sequence_is_refused(tiny_host, tmp_path):
    from kmd.editors.bench.harness import Checkpoint, CheckpointError

    checkpoint = Checkpoint(tmp_path, every=1)
    first = get_backend("fake")(tiny_host)
    run_lifelong(tiny_host, first, RECORDS, checkpoint=checkpoint, options=BenchOptions(served=False))
    first.retire()
    editor = get_backend("fake")(tiny_host)
    with pytest.raises(CheckpointError, match="another run"):
        run_lifelong(tiny_host, editor, RECORDS[:1], checkpoint=checkpoint, options=BenchOptions(served=False))
    assert editor.edit_ids == []


def test_a_checkpoint_resumes_under_other_serving_options_only(tiny_host):
    """The fingerprint leaves out the options that only change serving (LLP's runner-ups and
    shortlist): the saved edits are the ones a run under them would apply."""
    from kmd.editors.bench.harness import sequence_fingerprint

    def fingerprint(**options) -> str:
        backend = get_backend("llp")
        editor = backend(tiny_host, backend.default_config(tiny_host, **options))
        try:
            return sequence_fingerprint(tiny_host, editor, RECORDS, seed=0)
        finally:
            editor.retire()

    plain = fingerprint()
    assert fingerprint(runners_up=0, shortlist_rank=0, shortlist_from=10) == plain
    assert fingerprint(key_steps=5) != plain


FOUR = [*RECORDS,
        EditRecord("3", "the language of Spain is", "music", "Spain", ("Spain speaks the language",), "the sky is", "blue"),
        EditRecord("4", "Bob plays the instrument", "cherry", "Bob", ("the instrument Bob plays is",), "the dog and the cat", "sky")]


def test_served_every_asks_every_kth_record_after_all_the_edits(tiny_host):
    """`kmd bench --served-every K`: every edit is applied and teacher-forced-scored, the
    served answers are asked of records 0, K, 2K, ... only, on the final model."""
    from kmd.editors.bench import served
    from kmd.editors.bench.harness import BenchOptions

    editor = get_backend("fake")(tiny_host)
    result = run_lifelong(tiny_host, editor, FOUR, options=BenchOptions(served_every=2))
    assert result["n_edits"] == 4 and len(editor.edit_ids) == 4 and result["rel"] == 1.0
    assert result["served_every"] == 2 and result["n_served"] == 2
    assert [row["case_id"] for row in result["answers_sample"]] == ["1", "3"]
    asked = FOUR[::2]  # the same passes by hand, on the model holding all four edits
    quiet = lambda *_: None  # noqa: E731
    with editor.suspended():
        base = served.run_pass(tiny_host, None, asked, 16, quiet, "base")
    expected = served.summarise(base, served.run_pass(tiny_host, editor, asked, 16, quiet, "edited"), asked)
    for key, value in expected.items():
        assert result[key] == value, key


def test_misses_lists_every_wrong_served_answer(tiny_host):
    """`kmd bench --misses`: exactly the edit prompts and rephrases answered wrong, in every
    form asked, with both answers; a question no edit routes to has the unedited answer."""
    from kmd.editors.answers import ask
    from kmd.editors.bench.harness import BenchOptions
    from kmd.editors.bench.served import forms_of

    with chat_template(tiny_host, CHAT_TEMPLATE):
        editor = get_backend("grace")(tiny_host)
        result = run_lifelong(tiny_host, editor, FOUR, options=BenchOptions(misses=True))
        questions = [(r.prompt, f, r.target) for r in FOUR for f in forms_of(tiny_host)]
        questions += [(p, f, r.target) for r in FOUR for p in r.rephrases for f in ("plain", "chat")]
        edited = ask(tiny_host, editor, questions)
        with editor.suspended():
            base = ask(tiny_host, None, questions)
    wrong = {(q[0], q[1], e.text, b.text) for q, e, b in zip(questions, edited, base) if not e.correct}
    assert 0 < len(wrong) < len(questions), "the run must have right and wrong answers"
    misses = result["misses"]
    assert {(m["prompt"], m["form"], m["edited"], m["base"]) for m in misses} == wrong and len(misses) == len(wrong)
    assert {m["target"] for m in misses} <= {r.target for r in FOUR}
    assert all(isinstance(m["routed"], bool) for m in misses)  # GRACE tells which rows it routes
    assert any(not m["routed"] for m in misses)  # its rephrases here: a retrieval miss
    assert all(m["edited"] == m["base"] for m in misses if not m["routed"])
    assert result["miss_sample"] == [{k: v for k, v in m.items() if k != "routed"} for m in misses if m["kind"] == "edit"]


def test_bench_command_served_every_and_misses(tiny_model_dir, tmp_path):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([
        {"case_id": i, "prompt": r.prompt, "target_new": r.target, "subject": r.subject, "ground_truth": "x",
         "rephrase_prompt": r.rephrases[0], "locality_prompt": r.loc_prompt, "locality_ground_truth": r.loc_answer}
        for i, r in enumerate(FOUR)
    ]))
    out = tmp_path / "result.json"
    common = ["bench", "--backend", "fake", "--data", str(data), "--model", str(tiny_model_dir), "--device", "cpu"]
    run = CliRunner().invoke(app, [*common, "--served-every", "2", "--misses", "--out", str(out)], env={"COLUMNS": "400"})
    assert run.exit_code == 0, run.output
    result = json.loads(out.read_text())
    assert result["n_edits"] == 4 and result["served_every"] == 2 and result["n_served"] == 2
    assert result["misses"], "the fake backend does not reach the rephrases: they are answered wrong"
    assert "one in 2" in run.output and f"every wrong answer ({len(result['misses'])})" in run.output
    assert all(f"{m['prompt']} -> {m['target']}" in run.output for m in result["misses"])  # printed whole, one a row
    refused = CliRunner().invoke(app, [*common, "--no-served", "--misses"])
    assert refused.exit_code == 2 and "need the served pass" in refused.output


def test_near_subjects_swap_one_word_of_the_subject_for_another_subjects():
    """lifelong-served/v2's near-subject questions: the edit prompt about a subject that shares
    all but one word with the edit's, never a subject some record is about."""
    from kmd.editors.bench.data import EditRecord
    from kmd.editors.bench.served import near_subjects, plan

    def record(subject: str) -> EditRecord:
        return EditRecord(case_id="", prompt=f"The gender of {subject} is", target="x", subject=subject, rephrases=(),
                          loc_prompt="", loc_answer=None)  # fmt: skip

    subjects = ["Jose L Castillo", "Anna Sophie Gasteiger", "Zorbland", "Darren Smith", "Anna Smith"]
    records = [record(s) for s in subjects]
    near = near_subjects(records)
    assert 2 not in near  # one word: no near subject
    # the lender is NEAR_STEP (7) on among the four eligible records (0, 1, 3, 4): 0 <- 4, 1 <- 0, 3 <- 1, 4 <- 3
    assert near[0] == ("The gender of Jose L Smith is", "The gender of Anna L Castillo is")
    assert near[1] == ("The gender of Anna Sophie Castillo is", "The gender of Jose Sophie Gasteiger is")
    assert near[3] == ("The gender of Darren Gasteiger is",)  # "Anna Smith" is a record's own subject
    assert near[4] == ()  # the same last word, and "Darren Smith" is a record's own subject
    asked = plan(records, ("plain", "chat"), base=False)
    assert [q.prompt for q in asked if q.kind == "near" and q.record == 0 and q.form == "chat"] == list(near[0])
    assert not [q for q in plan(records, ("plain", "chat"), base=False, v2=False) if q.kind == "near"]
