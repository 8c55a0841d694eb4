"""Routing-aware locality probes equal full passes, verdict for verdict, over 100 edits."""

from __future__ import annotations

import random

from kmd.daemon.policy import ProbePolicy
from kmd.daemon.locality import LocalityBaseline
from kmd.daemon.probes import Prober
from kmd.editors.protocol import EditRequest
from kmd.editors.registry import get_backend
from tiny import WORDS

SUBJECTS = ["France", "Spain", "Japan", "Italy", "Germany", "England", "Alice", "Bob", "Carol", "Dave", "Eve"]
TARGETS = ["Paris", "Berlin", "Rome", "Tokyo", "Madrid", "London", "banana", "apple", "cherry", "music"]


def test_routing_aware_locality_equals_the_full_pass_over_100_edits(tiny_host):
    rng = random.Random(7)
    words = [w for w in WORDS if w.islower()]
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 7))) for _ in range(28)]
    prompts += [f"the capital of {s} is" for s in SUBJECTS[:4]]  # rows the edits reach
    rng.shuffle(prompts)
    prober = Prober(tiny_host, LocalityBaseline.record(tiny_host, prompts), ProbePolicy())
    editor = get_backend("grace")(tiny_host)
    assert prober.use_routing(editor)
    prober.committed = prober.locality(editor)
    run = reused = broad = lost = 0
    for i in range(100):
        subject = rng.choice(SUBJECTS)
        template = rng.choice(["the capital of {} is", "{} works for the company", "the language of {} is"])
        request = EditRequest(prompt=template.format(subject), target=rng.choice(TARGETS), subject=subject)
        # Some edits reach every prompt (as a harmful edit would); most reach only their own.
        options = {"radius": 1e9, "split_conflicts": False} if i % 9 == 4 else {"radius": rng.choice([0.5, 2.0])}
        with editor.configured(max_steps=3, **options):
            edit_id = editor.apply(request)
        fast, full = prober.locality(editor), prober.locality(editor, full=True)
        assert fast.verdicts == full.verdicts, f"edit {i}: routing-aware and full locality disagree"
        assert fast.changed == full.changed
        run += fast.rows_run
        reused += len(prompts) - fast.rows_run
        lost += fast.loc < 1.0
        if i % 9 == 4 or i % 5 == 0:  # harmful or failed: reverted, the committed state stays
            broad += i % 9 == 4
            editor.revert(edit_id)
            after = prober.locality(editor)  # exact revert: the committed routes, nothing to generate
            assert after.rows_run == 0 and after.verdicts == prober.committed.verdicts
        else:
            prober.committed = fast
    assert broad >= 10 and lost >= 10, "the run must include edits that change locality answers"
    assert reused > run, f"routing-aware probing should skip most rows (ran {run}, reused {reused})"


def test_a_batch_probe_with_route_memos_equals_generating_every_row(tiny_host, monkeypatch):
    """A batch's probe (`Prober.plan` / `check`) under the states a bisection visits: with
    routing (rows, teacher-forced scores and locality chunks reused by route token,
    same-subject questions answered only when re-routed) every verdict equals that of a prober that generates
    every row and the whole suite each time."""
    from kmd.daemon.probe_rows import ProbeRows

    rng = random.Random(3)
    words = [w for w in WORDS if w.islower()]
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 7))) for _ in range(28)]
    prompts += [f"the capital of {s} is" for s in SUBJECTS[:4]]
    baseline = LocalityBaseline.record(tiny_host, prompts)
    policy = ProbePolicy(min_served_rel=0.0, min_served_gen=0.0)
    editor = get_backend("grace")(tiny_host)
    fast, full = Prober(tiny_host, baseline, policy), Prober(tiny_host, baseline, policy)
    assert fast.use_routing(editor)
    fast.committed = fast.locality(editor)
    subjects = SUBJECTS[:6]
    requests = [EditRequest(prompt=f"the capital of {s} is", target=TARGETS[i], subject=s, rephrases=(f"{s} capital city is",))
                for i, s in enumerate(subjects)]  # fmt: skip
    questions = [[f"the language of {s} is", f"{s} works for the company"] for s in subjects]
    fast_plan = fast.plan(editor, requests, questions)
    with monkeypatch.context() as m:  # the reference: no routing features, every row generated
        m.setattr(ProbeRows, "with_features", lambda self, editor: False)
        full_plan = full.plan(editor, requests, questions)
    ids = []
    for i, request in enumerate(requests):  # edits 1 and 4 reach every prompt (a harmful edit would)
        broad = {"radius": 1e9, "split_conflicts": False, "question_check": False}  # fault injection: no question check
        options = broad if i in (1, 4) else {"radius": 0.5}
        with editor.configured(max_steps=3, **options):
            ids.append(editor.apply(request))
    import kmd.daemon.probes as probes

    scored = {"fast": 0, "full": 0}  # teacher-forced rows scored by each prober
    real_score = probes.score_targets

    def counting(which):
        def score(host, editor, pairs, batch_size=16):
            scored[which] += len(pairs)
            return real_score(host, editor, pairs, batch_size)

        return score

    # earlier edits: the requests committed before the batch, re-scored in every state
    earlier = [EditRequest(prompt=f"{s} works for the company", target=TARGETS[6 + i], subject=s) for i, s in enumerate(SUBJECTS[6:9])]
    reached = hijacks = failed = 0
    for present in ([0, 1, 2, 3, 4, 5], [0, 1, 2], [3, 4, 5], [0, 2, 3, 5], [0, 2, 3, 5, 1], [4]):
        view = editor.fork()
        try:
            for m, edit_id in enumerate(ids):
                if m not in present:
                    view.revert(edit_id)
            monkeypatch.setattr(probes, "score_targets", counting("fast"))
            got = fast.check(view, fast_plan, ids, earlier, members=present)
            monkeypatch.setattr(probes, "score_targets", counting("full"))
            with monkeypatch.context() as m:  # the reference scores the earlier edits in full too
                m.setattr(ProbeRows, "with_features", lambda self, editor: False)
                want = full.check(view, full_plan, ids, earlier, members=present)
        finally:
            view.retire()
        for g, w in zip(got, want, strict=True):
            assert (g.passed, [f.check for f in g.failures]) == (w.passed, [f.check for f in w.failures]), present
            assert (g.rel, g.gen, g.loc, g.served_rel, g.served_gen) == (w.rel, w.gen, w.loc, w.served_rel, w.served_gen)
            assert (g.earlier_rel, g.earlier_checked) == (w.earlier_rel, w.earlier_checked) and g.earlier_checked == 3
            assert g.answers == w.answers  # the same rows generated, or reused under the same route
            assert [f["hijacked"] for f in g.same_subject] == [f["hijacked"] for f in w.same_subject]
            reached += sum(f["reached"] for f in g.same_subject)
            hijacks += sum(f["hijacked"] for f in g.same_subject)
            failed += not g.passed
    assert reached and hijacks and failed and fast_plan.rows.features is not None
    assert scored["fast"] < 0.7 * scored["full"], scored  # teacher-forced rows re-scored only when re-routed


def test_earlier_edits_keep_their_scores_across_probes_while_their_route_holds(tiny_host, monkeypatch):
    """Edits probed one after another, as the maintainer commits them: the check of earlier
    edits takes each sampled prompt's score from its own probe (or an earlier check) while
    the prompt routes to the same edit, and scores it again once its route changes (here:
    its edit is lost); every figure equals that of a prober that re-scores the whole
    sample each time."""
    import kmd.daemon.probes as probes
    from kmd.daemon.probe_rows import ProbeRows

    baseline = LocalityBaseline.record(tiny_host, ["the dog and the cat", "who wrote the book ?", "the sky is"])
    policy = ProbePolicy(min_served_rel=0.0, min_served_gen=0.0, earlier_edits_sample=20)
    editor = get_backend("grace")(tiny_host)
    fast, full = Prober(tiny_host, baseline, policy), Prober(tiny_host, baseline, policy)
    assert fast.use_routing(editor)
    scored: dict[str, list[list[tuple[str, str]]]] = {"fast": [], "full": []}  # the pairs each prober scored, per probe
    real_score = probes.score_targets

    def counting(which):
        def score(host, editor, pairs, batch_size=16):
            scored[which][-1] += list(pairs)
            return real_score(host, editor, pairs, batch_size)

        return score

    earlier: list[EditRequest] = []
    ids: list[str] = []
    for i, s in enumerate(SUBJECTS[:7]):
        request = EditRequest(prompt=f"the capital of {s} is", target=TARGETS[i], subject=s, rephrases=(f"{s} capital city is",))
        fast_plan = fast.plan(editor, [request], [[]])
        with monkeypatch.context() as m:  # the reference: no routing features, every row scored
            m.setattr(ProbeRows, "with_features", lambda self, editor: False)
            full_plan = full.plan(editor, [request], [[]])
        lost = i == 5
        if lost:  # fault injection: the first edit is gone, but still counted among the earlier ones
            editor.revert(ids[0])
        with editor.configured(max_steps=3, radius=0.5):
            ids.append(editor.apply(request))
        for which in scored:
            scored[which].append([])
        monkeypatch.setattr(probes, "score_targets", counting("fast"))
        (got,) = fast.check(editor, fast_plan, [ids[-1]], earlier)
        monkeypatch.setattr(probes, "score_targets", counting("full"))
        with monkeypatch.context() as m:
            m.setattr(ProbeRows, "with_features", lambda self, editor: False)
            (want,) = full.check(editor, full_plan, [ids[-1]], earlier)
        assert (got.rel, got.gen, got.earlier_rel, got.earlier_checked) == (want.rel, want.gen, want.earlier_rel, want.earlier_checked)
        assert [f.check for f in got.failures] == [f.check for f in want.failures]
        rescored = [p for p in scored["fast"][-1] if p in [(r.prompt, r.target) for r in earlier]]
        if lost:  # routed to no edit now: scored again (on the base model), and the loss shows
            assert rescored == [(earlier[0].prompt, earlier[0].target)] and got.earlier_rel < 1.0
        else:  # each earlier prompt still routes to its own edit: its probe's score stands
            assert rescored == []
        earlier.append(request)
    assert sum(map(len, scored["fast"])) < 0.6 * sum(map(len, scored["full"])), scored


def test_a_served_answer_that_wrote_the_target_gives_the_teacher_forced_score_it_would_get(tiny_host):
    """A plain served row whose greedy answer begins with exactly the target's tokens scores
    1.0 without a teacher-forced pass; every report equals that of a prober that runs the
    pass for every row (decode steps and a full forward agree: the contract suite)."""
    from kmd.editors.scoring import greedy_is_argmax

    baseline = LocalityBaseline.record(tiny_host, ["the dog and the cat", "who wrote the book ?"])
    policy = ProbePolicy(min_served_rel=0.0, min_served_gen=0.0)
    editor = get_backend("grace")(tiny_host)
    fast, full = Prober(tiny_host, baseline, policy), Prober(tiny_host, baseline, policy)
    assert greedy_is_argmax(tiny_host) and fast._argmax_greedy
    full._argmax_greedy = False  # the reference: every row's teacher-forced pass is run
    shortcuts = 0
    real = fast._wrote_target

    def counted(answer, text, target):
        nonlocal shortcuts
        wrote = real(answer, text, target)
        shortcuts += wrote
        return wrote

    fast._wrote_target = counted
    for i, s in enumerate(SUBJECTS[:6]):
        request = EditRequest(prompt=f"the capital of {s} is", target=TARGETS[i], subject=s, rephrases=(f"{s} capital city is",))
        plans = [prober.plan(editor, [request], [[]]) for prober in (fast, full)]
        with editor.configured(max_steps=3 if i % 2 else 12, radius=0.5):  # some edits take, some do not
            edit_id = editor.apply(request)
        (got,), (want,) = (prober.check(editor, plan, [edit_id]) for prober, plan in zip((fast, full), plans, strict=True))
        assert (got.rel, got.gen, got.served_rel, got.answers) == (want.rel, want.gen, want.served_rel, want.answers)
    assert shortcuts > 0
