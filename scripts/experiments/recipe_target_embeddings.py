"""Do prepended embeddings of the target's tokens make SmolLM2 emit the target? (RECIPE's `target_tokens`)

    python scripts/experiments/recipe_target_embeddings.py

Teacher-forced accuracy on 60 ZsRE val records (prompt and first rephrase), bare and with 3
prepended vectors: the target's first 3 token embeddings ("first") or their mean ("mean"),
at scale 1 and 3. Run from the repository root with ../shared/data present.
"""
import torch
from kmd.editors.model import ModelHost
from kmd.editors.bench.data import load_records
from kmd.editors.recipe.train import PrependedLM
torch.set_num_threads(1)
host = ModelHost.load()
_, recs = load_records("../shared/data/zsre-val.json", limit=60)
lm = PrependedLM(host)
E = lm.embed.weight
def acc(pairs, vecs):
    with torch.no_grad():
        lg, b = lm.target_logits(pairs, vecs)
    c = (lg.argmax(-1) == b.labels).float()
    return torch.stack([c[a:e].mean() for a, e in b.spans])
def target_vecs(r, n=3, mode="first"):
    ids = host.encode(" " + r.target, special=False)
    v = E[ids]
    if mode == "first":
        v = v[:n]
        if len(v) < n: v = torch.cat([v, v[-1:].expand(n - len(v), -1)])
    elif mode == "mean":
        v = v.mean(0, keepdim=True).expand(n, -1)
    return v
for name, pairs in (("rel", [(r.prompt, r.target) for r in recs]), ("gen", [(r.rephrases[0], r.target) for r in recs])):
    base = acc(pairs, None).mean().item()
    res = {"base": base}
    for mode in ("first", "mean"):
        for scale in (1.0, 3.0):
            vecs = torch.stack([target_vecs(r, mode=mode) for r in recs]) * scale
            res[f"{mode}x{scale}"] = acc(pairs, vecs).mean().item()
    print(name, {k: round(v, 3) for k, v in res.items()}, flush=True)
