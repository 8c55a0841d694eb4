"""Where to put an edit's statement in a chat-template prompt (oracle retrieval, text form).

    python scripts/experiments/context_chat.py N VARIANT[,VARIANT...]
"""
import sys

import torch

from kmd.editors.answers import Answer, format_as
from kmd.editors.bench.data import load_records
from kmd.editors.model import ModelHost
from kmd.editors.scoring import generate_ids

torch.set_num_threads(1)
N = int(sys.argv[1])
VARIANTS = sys.argv[2].split(",")
host = ModelHost.load()
_, recs = load_records(sys.argv[3] if len(sys.argv) > 3 else "../shared/data/zsre-val.json", limit=N)
tok = host.tokenizer


def chat(q):
    return format_as(host, q, "chat")


def text(variant, r, q):
    p, t = r.prompt.strip(), r.target.strip()
    turn = f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n{t}.<|im_end|>\n"
    c = chat(q)
    head, _, tail = c.partition("<|im_start|>user\n")
    sys_end = c.index("<|im_end|>")
    return {
        "front_known": f"Known fact (current, verified): {p} {t}.\n\n" + c,
        "front_turn": turn + c,
        "mid_turn": head + turn + "<|im_start|>user\n" + tail,
        "front_system": f"<|im_start|>system\nKnown fact (current, verified): {p} {t}.<|im_end|>\n" + c,
        "in_system": c[:sys_end] + f" Known fact (current, verified): {p} {t}." + c[sys_end:],
        "in_user": head + f"<|im_start|>user\nKnown fact: {p} {t}.\n\n" + tail,
        "front_turn_nosys": turn + "<|im_start|>user\n" + tail,
    }[variant]


for variant in VARIANTS:
    print(f"== {variant}")
    for kind in ("rel", "gen"):
        qs = [r.prompt if kind == "rel" else r.rephrases[0] for r in recs]
        enc = [host.encode(text(variant, r, q), special=False) for r, q in zip(recs, qs)]
        toks = generate_ids(host, None, enc, 32, 16)
        ans = [Answer(q, "chat", tok.decode(t, skip_special_tokens=True), tuple(t), r.target) for q, t, r in zip(qs, toks, recs)]
        n = len(ans)
        print(f"  chat {kind}: correct {sum(a.correct for a in ans)/n:.2f} hit {sum(a.hit for a in ans)/n:.2f} degenerate {sum(a.degenerate for a in ans)/n:.2f}")
        if kind == "rel":
            for a in ans[:4]:
                print(f"    {a.prompt!r} -> {a.text[:100]!r} (target {a.target!r})")
    sys.stdout.flush()
