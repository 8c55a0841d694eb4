"""Which token prefix makes SmolLM2 emit an edit's target? (upper bound for RECIPE's prompts)

    python scripts/experiments/recipe_context_prefix.py [N]

Teacher-forced accuracy on N ZsRE val records (prompt and first rephrase), bare and with
the token embeddings of a text prepended (variable length, padded on the left with the
first vector): the target alone, the target's first 3 tokens, the statement "prompt
target", and the statement as a "Fact:" line. Run from the repository root with
../shared/data present.
"""
import sys

import torch

from kmd.editors.bench.data import load_records
from kmd.editors.model import ModelHost
from kmd.editors.recipe.train import PrependedLM

torch.set_num_threads(1)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 100
host = ModelHost.load()
_, recs = load_records("../shared/data/zsre-val.json", limit=N)
lm = PrependedLM(host)
E = lm.embed.weight


def acc(pairs, texts):
    out = []
    for s in range(0, len(pairs), 8):
        chunk, tchunk = pairs[s : s + 8], (texts[s : s + 8] if texts else None)
        vecs = None
        if tchunk:
            ids = [host.encode(t, special=False) for t in tchunk]
            width = max(map(len, ids))
            vecs = torch.stack([E[[i[0]] * (width - len(i)) + i] for i in ids])
        with torch.no_grad():
            lg, b = lm.target_logits(chunk, vecs)
        c = (lg.argmax(-1) == b.labels).float()
        out.append(torch.stack([c[a:e].mean() for a, e in b.spans]))
    return torch.cat(out).mean().item()


prefixes = {
    "none": None,
    "target": [" " + r.target.strip() for r in recs],
    "target3": [host.tokenizer.decode(host.encode(" " + r.target.strip(), special=False)[:3]) for r in recs],
    "statement": [f"{r.prompt.strip()} {r.target.strip()}\n" for r in recs],
    "fact": [f"Fact: {r.prompt.strip()} {r.target.strip()}\n" for r in recs],
    "twice": [f"{r.prompt.strip()} {r.target.strip()}\n{r.prompt.strip()} {r.target.strip()}\n" for r in recs],
    "thrice": [f"{r.prompt.strip()} {r.target.strip()}\n" * 3 for r in recs],
    "twice_target3": [f"{r.prompt.strip()} {r.target.strip()}\n" * 2 + host.tokenizer.decode(host.encode(" " + r.target.strip(), special=False)[:3]) for r in recs],
    "target3_twice": [host.tokenizer.decode(host.encode(" " + r.target.strip(), special=False)[:3]) + "\n" + f"{r.prompt.strip()} {r.target.strip()}\n" * 2 for r in recs],
    "answer": [f"{r.prompt.strip()} {r.target.strip()}. The answer is {r.target.strip()}.\n" for r in recs],
}
if len(sys.argv) > 2:
    prefixes = {k: v for k, v in prefixes.items() if k in sys.argv[2].split(",")}
for name, pairs in (("rel", [(r.prompt, r.target) for r in recs]), ("gen", [(r.rephrases[0], r.target) for r in recs])):
    print(name, {k: round(acc(pairs, v), 3) for k, v in prefixes.items()}, flush=True)
