"""Served answers after N sequential edits, asked for every K-th record only (a cheaper
stand-in for `kmd bench --limit N` when its full served pass does not fit the time).

    python scripts/experiments/served_after_n.py BACKEND DATA N K OUT.json

Applies the first N records' edits in file order, then runs the `lifelong-served/v1`
passes (editors/bench/served.py: base and edited answers, plain and chat, 32 tokens) on
records 0, K, 2K, ... and writes their summary and samples.
"""
import json
import sys
import time

import torch

from kmd.editors.bench.data import load_records
from kmd.editors.bench.served import run_pass, sample, summarise
from kmd.editors.model import ModelHost
from kmd.editors.protocol import EditRequest
from kmd.editors.registry import get_backend

torch.set_num_threads(1)
backend, data, n, k, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
host = ModelHost.load()
_, records = load_records(data, limit=n)
asked = records[::k]
say = lambda phase, done, total: print(f"{time.strftime('%H:%M:%S')} {phase} {done}/{total}", flush=True)  # noqa: E731
base = run_pass(host, None, asked, 16, say, "base answers")
editor = get_backend(backend)(host)
start = time.perf_counter()
for i, r in enumerate(records):
    editor.apply(EditRequest(prompt=r.prompt, target=r.target, subject=r.subject, rephrases=r.rephrases))
    if i % 100 == 0:
        say("editing", i, len(records))
edit_s = (time.perf_counter() - start) / len(records)
edited = run_pass(host, editor, asked, 16, say, "answers")
result = {"backend": backend, "dataset": data, "n_edits": len(records), "asked_every": k, "n_asked": len(asked),
          "edit_s_mean": edit_s, **summarise(base, edited, asked), "answers_sample": sample(base, edited, asked)}
with open(out, "w") as fh:
    json.dump(result, fh, indent=1)
print({key: value for key, value in result.items() if key != "answers_sample"})
