"""What a WISE revert costs on the embedded model: apply N ZsRE val edits (one shard), revert
one, and report the seconds, how many edits were retrained, and the kept edits' reliability
before and after (teacher-forced accuracy, as the benchmark scores it).

    python scripts/experiments/wise_revert_cost.py N [INDEX ...] [--set KEY=VALUE ...]

INDEX: which edits to revert, in this order (default: the first). Run from the repository
root with ../shared/data present.
"""

import json
import sys
import time

import torch

from kmd.daemon.commands.bench import parse_overrides
from kmd.editors.bench.data import load_records
from kmd.editors.model import ModelHost
from kmd.editors.protocol import EditRequest
from kmd.editors.registry import get_backend
from kmd.editors.scoring import score_targets

torch.set_num_threads(1)
args = sys.argv[1:]
sets = [a for i, a in enumerate(args) if i > 0 and args[i - 1] == "--set"]
plain = [a for i, a in enumerate(args) if a != "--set" and (i == 0 or args[i - 1] != "--set")]
n, indices = int(plain[0]), [int(i) for i in plain[1:]] or [0]
host = ModelHost.load()
_, records = load_records("../shared/data/zsre-val.json", limit=n)
cls = get_backend("wise")
editor = cls(host, cls.default_config(host, **parse_overrides(sets)))
ids = []
started = time.perf_counter()
for record in records:
    ids.append(editor.apply(EditRequest(prompt=record.prompt, target=record.target)))
apply_s = time.perf_counter() - started


def reliability(keep: list[int]) -> float:
    scores = score_targets(host, editor, [(records[i].prompt, records[i].target) for i in keep])
    return sum(s.accuracy for s in scores) / len(scores)


report = {"n_edits": n, "apply_s_mean": round(apply_s / n, 3), "reverts": []}
kept = list(range(n))
for index in indices:
    others = [i for i in kept if i != index]
    before = reliability(others)
    editor.revert(ids[index])
    kept = others
    report["reverts"].append(editor.last_revert | {"index": index, "rel_kept_before": round(before, 4), "rel_kept_after": round(reliability(kept), 4)})
print(json.dumps(report, indent=1))
