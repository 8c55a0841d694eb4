"""Statement in the context plus a copy boost on the target's tokens (oracle retrieval).

    python scripts/experiments/context_boost.py N BETA[,BETA...] PLAIN_VARIANT CHAT_VARIANT [DATA]

At each generated position of a row, the logit of the target's next token (continuing the
longest run of the target already written, or its first token, with or without a leading
space) gets +BETA until the whole target has been written; then the model runs freely.
"""
import sys

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from kmd.editors.answers import Answer, encode_as, format_as
from kmd.editors.bench.data import load_records
from kmd.editors.model import ModelHost
from kmd.editors.scoring import left_padded_ids

torch.set_num_threads(1)
N = int(sys.argv[1])
BETAS = [float(b) for b in sys.argv[2].split(",")]
PV, CV = sys.argv[3], sys.argv[4]
host = ModelHost.load()
_, recs = load_records(sys.argv[5] if len(sys.argv) > 5 else "../shared/data/zsre-val.json", limit=N)
tok = host.tokenizer


def ctx_text(variant, r, q, form):
    p, t = r.prompt.strip(), r.target.strip()
    known = f"Known fact (current, verified): {p} {t}.\n\n"
    if form == "plain":
        return {"none": q, "known": known + q, "thrice": f"{p} {t}\n" * 3 + q}[variant]
    c = format_as(host, q, "chat")
    head, _, tail = c.partition("<|im_start|>user\n")
    sys_end = c.index("<|im_end|>")
    turn = f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n{t}.<|im_end|>\n"
    return {
        "none": c,
        "front_known": known + c,
        "front_turn": turn + c,
        "mid_turn": head + turn + "<|im_start|>user\n" + tail,
        "in_system": c[:sys_end] + f" Known fact (current, verified): {p} {t}." + c[sys_end:],
    }[variant]


class Boost(LogitsProcessor):
    def __init__(self, targets, start, beta):
        self.variants = [[tok.encode(" " + t, add_special_tokens=False), tok.encode(t, add_special_tokens=False)] for t in targets]
        self.start, self.beta, self.done = start, beta, [False] * len(targets)

    def __call__(self, input_ids, scores):
        for row, variants in enumerate(self.variants):
            gen = input_ids[row, self.start:].tolist()
            if self.done[row]:
                continue
            boost = set()
            for v in variants:
                if any(gen[i:i + len(v)] == v for i in range(len(gen) - len(v) + 1)):
                    self.done[row] = True
                    break
                k = max((k for k in range(1, len(v)) if gen[len(gen) - k:] == v[:k]), default=0) if gen else 0
                boost.add(v[k])
            if not self.done[row]:
                for t in boost:
                    scores[row, t] += self.beta
        return scores


def run(texts, targets, beta):
    out = []
    for s in range(0, len(texts), 16):
        enc = [host.encode(t, special=False) for t in texts[s:s + 16]]
        ids, att = left_padded_ids(host, enc)
        procs = LogitsProcessorList([Boost(targets[s:s + 16], ids.shape[1], beta)]) if beta else None
        g = host.model.generate(input_ids=ids, attention_mask=att, max_new_tokens=32, do_sample=False, use_cache=True,
                                pad_token_id=tok.pad_token_id, logits_processor=procs, temperature=None, top_p=None, top_k=None)
        for row in g[:, ids.shape[1]:].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            out.append(tok.decode(row, skip_special_tokens=True))
    return out


for beta in BETAS:
    print(f"== beta {beta} plain={PV} chat={CV}")
    for form, variant in (("plain", PV), ("chat", CV)):
        for kind in ("rel", "gen"):
            qs = [r.prompt if kind == "rel" else r.rephrases[0] for r in recs]
            texts = [ctx_text(variant, r, q, form) for r, q in zip(recs, qs)]
            gens = run(texts, [r.target.strip() for r in recs], beta)
            ans = [Answer(q, form, g, (), r.target) for q, g, r in zip(qs, gens, recs)]
            n = len(ans)
            print(f"  {form:5} {kind}: correct {sum(a.correct for a in ans)/n:.2f} hit {sum(a.hit for a in ans)/n:.2f} degenerate {sum(a.degenerate for a in ans)/n:.2f}")
            if kind == "rel":
                for a in ans[:4]:
                    print(f"    {a.prompt[:50]!r} -> {a.text[:90]!r} ({a.target!r})")
    sys.stdout.flush()
