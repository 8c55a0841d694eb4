"""RECIPE retrieval only: how often each prompt and rephrase retrieves its own edit, and how
often a locality prompt retrieves any, with the whole text as the query ("whole") and with
the last sentence too, keeping the query that clears the sentinel by more ("last", what
`last_sentence_query` does).

    python scripts/experiments/recipe_last_sentence.py DATA N
"""
import re, sys, torch
torch.set_num_threads(1)
from kmd.editors.bench.data import load_records
from kmd.editors.model import ModelHost
from kmd.editors.protocol import EditRequest
from kmd.editors.registry import get_backend
from kmd.editors.recipe.editor import encode_texts
data, n = sys.argv[1], int(sys.argv[2])
host = ModelHost.load()
_, recs = load_records(data, limit=n)
ed = get_backend("recipe")(host)
for r in recs:
    ed.apply(EditRequest(prompt=r.prompt, target=r.target, subject=r.subject, rephrases=r.rephrases))
def scores(texts):
    reps = ed.networks.query_reps(encode_texts(texts, host.device))
    logits = ed.networks.retrieval_logits(reps, ed.reps) * ed.networks.shape.temperature
    return logits[:, 1:] - ed.shifts[None, :], logits[:, 0] + ed.config.margin
def last_sentence(t):
    parts = re.split(r"(?<=[.!?])\s+", t.strip())
    return parts[-1] if len(parts) > 1 else t
def evaluate(texts, owners, mode):
    s, thr = scores(texts)
    if mode == "last":
        s2, thr2 = scores([last_sentence(t) for t in texts])
        margin1 = s.max(1).values - thr; margin2 = s2.max(1).values - thr2
        use2 = margin2 > margin1
        s = torch.where(use2[:, None], s2, s); thr = torch.where(use2, thr2, thr)
    best = s.argmax(1); hit = s.max(1).values > thr
    own = [(h and b == o) for h, b, o in zip(hit.tolist(), best.tolist(), owners)]
    return sum(own) / len(own), hit.float().mean().item()
prompts = [r.prompt for r in recs]; reph = [p for r in recs for p in r.rephrases]; reph_o = [i for i, r in enumerate(recs) for p in r.rephrases]
loc = [r.loc_prompt for r in recs]
for mode in ("whole", "last"):
    print(mode, "prompt own", evaluate(prompts, list(range(len(recs))), mode)[0], "rephrase own", evaluate(reph, reph_o, mode)[0],
          "loc false-hit", evaluate(loc, [-1] * len(loc), mode)[1])
print([last_sentence(t) for t in reph[:6]])
