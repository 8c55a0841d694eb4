"""Routing-aware locality probes against full passes on a real model, after every edit.

    python scripts/experiments/routing_agreement.py BACKEND DATA N OUT.json

Applies N edits one at a time: the first records of DATA (zsre-val style), except that
every 10th edit is made on a prompt of the shipped locality suite itself (target
"Zorbland"), so suite rows fire and their continuations change. After each edit the
daemon's routing-aware probe (`Prober.locality`) and the full pass (`full=True`, every
suite prompt generated) are compared verdict for verdict, as the tiny-model test
`tests/unit/test_routing_probes.py` does. Edits that lower locality are reverted (as the
daemon would) and the committed state is probed again.
"""

import json
import sys
import time

import torch

from kmd.daemon.locality import LocalityBaseline, read_suite
from kmd.daemon.policy import ProbePolicy
from kmd.daemon.probes import Prober
from kmd.editors.bench.data import load_records
from kmd.editors.model import ModelHost
from kmd.editors.protocol import EditRequest
from kmd.editors.registry import get_backend

torch.set_num_threads(1)
backend, data, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
host = ModelHost.load()
suite = read_suite(None)
_, records = load_records(data, limit=n)
prober = Prober(host, LocalityBaseline.record(host, suite), ProbePolicy())
editor = get_backend(backend)(host)
if not prober.use_routing(editor):
    sys.exit(f"{backend} has no routing features")
prober.committed = prober.locality(editor)
rows, disagreements = [], 0
fast_s = full_s = 0.0
for i in range(n):
    if i % 10 == 9:
        request = EditRequest(prompt=suite[(i * 37) % len(suite)], target="Zorbland")
    else:
        r = records[i]
        request = EditRequest(prompt=r.prompt, target=r.target, subject=r.subject, rephrases=r.rephrases)
    edit_id = editor.apply(request)
    t0 = time.perf_counter()
    fast = prober.locality(editor)
    t1 = time.perf_counter()
    full = prober.locality(editor, full=True)
    t2 = time.perf_counter()
    fast_s, full_s = fast_s + t1 - t0, full_s + t2 - t1
    agree = fast.verdicts == full.verdicts and fast.changed == full.changed
    disagreements += not agree
    reverted = fast.loc < prober.committed.loc
    rows.append({"edit": i, "on_suite_prompt": i % 10 == 9, "agree": agree, "loc_fast": fast.loc, "loc_full": full.loc,
                 "rows_run_fast": fast.rows_run, "rows_run_full": full.rows_run, "reverted": reverted})
    if reverted:
        editor.revert(edit_id)
        after, again = prober.locality(editor), prober.locality(editor, full=True)
        rows[-1]["agree_after_revert"] = after.verdicts == again.verdicts
        disagreements += after.verdicts != again.verdicts
    else:
        prober.committed = fast
    print(f"{time.strftime('%H:%M:%S')} edit {i}: agree {agree}, loc {fast.loc:.4f}, rows run {fast.rows_run}"
          f"{' (reverted)' if reverted else ''}", flush=True)
result = {"backend": backend, "dataset": data, "edits": n, "suite_prompts": len(suite), "disagreements": disagreements,
          "edits_that_changed_locality": sum(r["loc_full"] < 1.0 for r in rows), "reverted": sum(r["reverted"] for r in rows),
          "rows_run_fast_total": sum(r["rows_run_fast"] for r in rows), "rows_run_full_total": sum(r["rows_run_full"] for r in rows),
          "fast_s_total": round(fast_s, 1), "full_s_total": round(full_s, 1), "rows": rows}
with open(out, "w") as fh:
    json.dump(result, fh, indent=1)
print({k: v for k, v in result.items() if k != "rows"})
