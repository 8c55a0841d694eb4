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
