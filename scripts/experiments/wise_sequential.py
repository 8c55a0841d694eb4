"""WISE, N sequential ZsRE val edits, per-edit and final diagnostics (development tool).

    python scripts/experiments/wise_sequential.py N [KEY=VALUE ...]   # WiseConfig overrides

Prints after each edit its steps, NLL, activation and the routing threshold; at the end
each edit's reliability, the activations of the edit, rephrase and locality prompts and
per-record locality (agreement with the base model). Run from the repository root with
../shared/data present.
"""
import sys

import torch
from kmd.editors.model import ModelHost
from kmd.editors.bench.data import load_records
from kmd.editors.registry import get_backend
from kmd.editors.protocol import EditRequest
from kmd.editors.scoring import score_targets
from kmd.daemon.commands.bench import parse_overrides
torch.set_num_threads(1)
N = int(sys.argv[1])
overrides = parse_overrides(sys.argv[2:])  # as `kmd bench --set KEY=VALUE`
host = ModelHost.load()
_, recs = load_records("../shared/data/zsre-val.json", limit=N)
cls = get_backend("wise"); ed = cls(host, cls.default_config(host, **overrides))
ids = []
for r in recs:
    ids.append(ed.apply(EditRequest(prompt=r.prompt, target=r.target)))
    m = ed.meta[ids[-1]]
    acc = score_targets(host, ed, [(r.prompt, r.target)])[0].accuracy
    print(f"{len(ids)} steps {m['steps']} nll {m['nll_first']:.2f}->{m['nll']:.3f} margin {m['margin']:.2f} act {ed.acts[ids[-1]]:.1f} thr {ed.threshold:.1f} acc_now {acc:.2f}", flush=True)
rel = score_targets(host, ed, [(r.prompt, r.target) for r in recs])
loc = score_targets(host, ed, [(r.loc_prompt, r.loc_answer) for r in recs])
with ed.suspended():
    loc0 = score_targets(host, ed, [(r.loc_prompt, r.loc_answer) for r in recs])
print("final rel", [round(s.accuracy,2) for s in rel])
print("acts", [round(ed.acts[i],1) for i in ids], "thr", round(ed.threshold,1))
print("rel", sum(s.accuracy for s in rel)/N, "loc", sum(a.agreement(b) for a,b in zip(loc,loc0))/N)
from kmd.editors.wise.editor import activation
a, m = ed.layer_inputs([r.loc_prompt for r in recs])
la = activation((a - ed.center) @ ed.memory_t, m)
print("loc acts", [round(x,1) for x in la.tolist()])
a, m = ed.layer_inputs([r.rephrases[0] for r in recs])
print("gen acts", [round(x,1) for x in activation((a - ed.center) @ ed.memory_t, m).tolist()])
print("loc per", [round(a.agreement(b),2) for a,b in zip(loc,loc0)])
