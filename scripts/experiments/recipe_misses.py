"""Why RECIPE's served answers miss: apply the first N records' edits, ask each edit prompt
and first rephrase plain and as a chat turn, and print every wrong answer with its kind
(not retrieved / wrong edit retrieved / degenerate after a hit / retrieved but missed).

    python scripts/experiments/recipe_misses.py DATA N [CONFIG_KEY=VALUE ...]
"""
import sys, time, torch
torch.set_num_threads(1)
from kmd.editors.bench.data import load_records
from kmd.editors.model import ModelHost
from kmd.editors.protocol import EditRequest
from kmd.editors.registry import get_backend
from kmd.editors.answers import ask
data, n = sys.argv[1], int(sys.argv[2])
opts = dict(a.split("=") for a in sys.argv[3:])
host = ModelHost.load()
_, records = load_records(data, limit=n)
cls = get_backend("recipe")
cfg = cls.default_config(host, **{k: (v if not v.replace('.','').replace('-','').isdigit() else float(v)) if v not in ("true","false") else v=="true" for k, v in opts.items()}) if opts else None
ed = cls(host, cfg) if cfg else cls(host)
ids = [ed.apply(EditRequest(prompt=r.prompt, target=r.target, subject=r.subject, rephrases=r.rephrases)) for r in records]
qs = [(r.prompt, f, r.target) for f in ("plain", "chat") for r in records] + [(r.rephrases[0], f, r.target) for f in ("plain","chat") for r in records if r.rephrases]
t = time.perf_counter(); ans = ask(host, ed, qs, batch_size=16); print("ask s", time.perf_counter() - t)
best, hit = ed.retrieve([q[0] for q in qs])
own = {r.prompt: i for i, r in enumerate(records)}
for i, r in enumerate(records):
    for p in r.rephrases[:1]: own[p] = i
fail = {"plain": 0, "chat": 0}
kinds = {}
for (p, f, tgt), a, b, h in zip(qs, ans, best.tolist(), hit.tolist()):
    if a.correct: continue
    kind = "not retrieved" if not h else ("wrong edit" if b != own[p] else ("degenerate" if a.hit else "retrieved, missed"))
    kinds[kind] = kinds.get(kind, 0) + 1
    print(f"[{f}] {kind}: {p!r} -> {tgt!r}: {a.text[:150]!r}")
n_ed = len(records)
for f in ("plain", "chat"):
    sel = [a for (p, ff, _), a in zip(qs, ans) if ff == f and p in [r.prompt for r in records]]
    print(f, "rel", sum(a.correct for a in sel) / len(sel))
print(kinds)
