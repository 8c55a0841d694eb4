"""Why a backend's served answers miss: apply the first N records' edits, ask each edit
prompt and first rephrase plain and as a chat turn, and print every wrong answer with its
kind (degenerate after a hit / missed; for RECIPE also not retrieved / wrong edit).

    python scripts/experiments/served_misses.py BACKEND DATA N [CONFIG_KEY=VALUE ...]
"""
import json, sys, time
from collections import Counter

import torch

torch.set_num_threads(1)
from kmd.editors.answers import ask
from kmd.editors.bench.data import load_records
from kmd.editors.model import ModelHost
from kmd.editors.protocol import EditRequest
from kmd.editors.registry import get_backend

backend, data, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
overrides = {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[4:])}
host = ModelHost.load()
_, records = load_records(data, limit=n)
cls = get_backend(backend)
editor = cls(host, cls.default_config(host, **overrides)) if overrides else cls(host)
t = time.perf_counter()
for r in records:
    editor.apply(EditRequest(prompt=r.prompt, target=r.target, subject=r.subject, rephrases=r.rephrases))
print(f"apply s/edit {(time.perf_counter() - t) / len(records):.2f}")
own = {r.prompt: i for i, r in enumerate(records)} | {r.rephrases[0]: i for i, r in enumerate(records) if r.rephrases}
questions = [(r.prompt, f, r.target) for f in ("plain", "chat") for r in records]
questions += [(r.rephrases[0], f, r.target) for f in ("plain", "chat") for r in records if r.rephrases]
t = time.perf_counter()
answers = ask(host, editor, questions, batch_size=16)
print(f"ask s {time.perf_counter() - t:.1f}")
retrieved = editor.retrieve([q[0] for q in questions]) if hasattr(editor, "retrieve") else None
import re

from kmd.editors.answers import hits, is_degenerate


def cut(text, target, at):
    """The text up to the first line end (at="line") or sentence end ("sentence") after the
    target's first occurrence (what an end-after-answer rule would leave)."""
    m = re.search(re.escape(target.strip()), text, flags=re.I)
    if not m:
        return text
    pattern = r"\n" if at == "line" else r"[.!?](?=\s)|\n"
    end = re.compile(pattern).search(text, m.end())
    return text if end is None else text[: end.end()]


def glued(text, target):
    m = re.search(re.escape(target.strip()), text, flags=re.I)
    return bool(m) and m.end() < len(text) and text[m.end()].isalnum() and target.strip()[-1:].isalnum()


kinds = Counter()
would = Counter()
for (prompt, form, target), a in zip(questions, answers):
    for at in ("line", "sentence"):
        short = cut(a.text, target, at)
        would[at, form, prompt in {r.prompt for r in records}] += hits(short.strip().splitlines()[0] if short.strip() else "", target) and not is_degenerate(short, target)
    would["glued", form, True] += glued(a.line, target)
for i, ((prompt, form, target), a) in enumerate(zip(questions, answers)):
    if a.correct:
        continue
    kind = "degenerate after a hit" if a.hit else "missed"
    if retrieved is not None:
        best, hit = retrieved[0][i].item(), retrieved[1][i].item()
        kind = "not retrieved" if not hit else ("wrong edit" if best != own[prompt] else kind)
    kinds[kind, form] += 1
    print(f"[{form}] {kind}: {prompt!r} -> {target!r}: {a.text[:160]!r}")
prompts = {r.prompt for r in records}
for form in ("plain", "chat"):
    for name, chosen in (("rel", True), ("gen", False)):
        sel = [a for (p, f, _), a in zip(questions, answers) if f == form and (p in prompts) == chosen]
        print(f"{form} {name} {sum(a.correct for a in sel) / max(len(sel), 1):.3f}")
print(dict(kinds))
print("correct if the answer ended after the target's line / sentence (rel: edit prompts; gen: rephrases), and answers glued onto the target:")
for (at, form, rel), v in sorted(would.items()):
    print(f"  {at} {form} {'rel' if rel else 'gen'} {v / len(records):.3f}")
