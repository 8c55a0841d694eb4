"""Served answers with the edit's statement in the context (oracle retrieval): an upper bound
for a retrieve-and-show backend.

    python scripts/experiments/context_answers.py N FORMAT[,FORMAT...] [DATA]

For N records, the base model answers the edit prompt and its first rephrase, plain and as a
chat turn, with the context text of FORMAT put in front of the whole input (before the chat
template's system turn). Prints correct / hit / degenerate per form and a few answers.
"""
import sys

import torch

from kmd.editors.answers import Answer, encode_as
from kmd.editors.bench.data import load_records
from kmd.editors.model import ModelHost
from kmd.editors.scoring import generate_ids

torch.set_num_threads(1)
N = int(sys.argv[1])
FORMATS = sys.argv[2].split(",")
DATA = sys.argv[3] if len(sys.argv) > 3 else "../shared/data/zsre-val.json"
host = ModelHost.load()
_, recs = load_records(DATA, limit=N)


def context(fmt, r):
    p, t = r.prompt.strip(), r.target.strip()
    return {
        "none": "",
        "thrice": f"{p} {t}\n" * 3,
        "once": f"{p} {t}.\n",
        "fact": f"Fact: {p} {t}.\n\n",
        "qa": f"Q: {p}\nA: {t}\n\n",
        "known": f"Known fact (current, verified): {p} {t}.\n\n",
        "qa2": f"Question: {p}\nAnswer: {t}.\n\n",
    }[fmt]


for fmt in FORMATS:
    rows = []
    for form in ("plain", "chat"):
        for kind in ("rel", "gen"):
            prompts = [r.prompt if kind == "rel" else r.rephrases[0] for r in recs]
            enc = [host.encode(context(fmt, r), special=False) + encode_as(host, q, form) if fmt != "none" else encode_as(host, q, form)
                   for r, q in zip(recs, prompts)]
            toks = generate_ids(host, None, enc, 32, 16)
            ans = [Answer(q, form, host.tokenizer.decode(t, skip_special_tokens=True), tuple(t), r.target) for q, t, r in zip(prompts, toks, recs)]
            rows.append((form, kind, ans))
    print(f"== {fmt}")
    for form, kind, ans in rows:
        n = len(ans)
        print(f"  {form:5} {kind}: correct {sum(a.correct for a in ans)/n:.2f} hit {sum(a.hit for a in ans)/n:.2f} degenerate {sum(a.degenerate for a in ans)/n:.2f}")
    for form, kind, ans in rows:
        if kind == "rel":
            for a in ans[:3]:
                print(f"    [{form}] {a.prompt!r} -> {a.text[:100]!r} (target {a.target!r})")
    sys.stdout.flush()
