#!/usr/bin/env python
"""A saved editor state (a `kmd bench --checkpoint` slot, any `save_editor` state) read without re-editing:
the forward overhead `kmd bench` reports, and where the evaluated edits' prompts and
rephrases route (own edit, another evaluated edit, a later one, or none), so a lost
rephrase reads as a retrieval change. Edit ids must be `bench-{index}` (kmd bench).

    python scripts/saved-state-routes.py STATE DATA --limit 100 [--keep 100] [--answers]

--keep K (LLP only): route with the first K edits of the saved sequence, i.e. as the run
stood after K edits (its rows are in apply order and earlier keys never change).
"""
import argparse
import collections
from pathlib import Path

import torch

from kmd.editors.answers import ask, question_features
from kmd.editors.bench.data import load_records
from kmd.editors.bench.harness import forward_ms
from kmd.editors.model import ModelHost, ModelSettings
from kmd.editors.state import load_editor, read_state

LLP_ROWS = ("keys", "values", "prefix_keys", "prefix_values")


def keep_first(editor, path: Path, host: ModelHost, keep: int) -> None:
    if editor.name != "llp":
        raise SystemExit("--keep: LLP states only")
    manifest, tensors, requests = read_state(path, host)
    extra = dict(manifest["extra"])
    ids = extra["row_ids"][:keep]
    kept = set(ids)
    extra["row_ids"] = ids
    extra["meta"] = {k: v for k, v in extra.get("meta", {}).items() if k in kept}
    tensors = {k: (v[:keep] if k in LLP_ROWS else v) for k, v in tensors.items()}
    editor.restore([r for r in requests if r.edit_id in kept], tensors, extra, [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state", type=Path)
    parser.add_argument("data")
    parser.add_argument("--limit", type=int, default=100, help="the evaluated edits: the first N of DATA")
    parser.add_argument("--keep", type=int, help="LLP: only the first K edits of the saved sequence")
    parser.add_argument("--rounds", type=int, default=3, help="forward timing rounds (best kept)")
    parser.add_argument("--answers", action="store_true", help="also the served answers: the share correct per kind and form")
    args = parser.parse_args()
    torch.set_num_threads(1)
    host = ModelHost.load(ModelSettings(device="cpu"))
    editor = load_editor(args.state, host)
    if args.keep is not None:
        keep_first(editor, args.state, host, args.keep)
    _, records = load_records(args.data, limit=args.limit)
    n = len(records)
    print(f"{editor.name}: {len(editor.edit_ids)} edits")
    timing = records[:50]
    base, edited = forward_ms(host, editor, [r.prompt for r in timing] + [r.loc_prompt for r in timing], args.rounds)
    print(f"forward ms base {base:.1f} edited {edited:.1f} overhead {edited / base:.2f}x")
    asked = [(kind, i, p, form) for i, r in enumerate(records) for kind, ps in (("edit", [r.prompt]), ("reph", r.rephrases))
             for p in ps for form in ("plain", "chat")]  # fmt: skip
    count: collections.Counter = collections.Counter()
    with torch.no_grad():
        for start in range(0, len(asked), 16):
            part = asked[start : start + 16]
            routes = [r for f in question_features(host, editor, [(p, form) for _, _, p, form in part]) for r in editor.routes(f)]
            for (kind, i, prompt, form), route in zip(part, routes, strict=True):
                edit = route[0] if isinstance(route, tuple) else route  # MEMOIR: (edit, the edits sharing its columns)
                j = None if edit is None else int(str(edit).removeprefix("bench-"))
                where = "none" if j is None else "own" if j == i else "evaluated" if j < n else "later"
                count[(kind, form, where)] += 1
                if where in ("evaluated", "later"):
                    print(f"  {kind}/{form} of edit {i}: {prompt!r} -> {edit}")
    for key in sorted(count):
        print(*key, count[key])
    if args.answers:  # served v2's "edit" and "reph" questions, plain and chat (scoring as editors/bench/served.py)
        answers = ask(host, editor, [(p, form, records[i].target) for _, i, p, form in asked])
        right: collections.defaultdict = collections.defaultdict(list)
        for (kind, _, _, form), answer in zip(asked, answers, strict=True):
            right[(kind, form)].append(answer.correct)
        for (kind, form), hits in sorted(right.items()):
            print(f"correct {kind} {form}: {sum(hits) / len(hits):.2f} of {len(hits)}")


if __name__ == "__main__":
    main()
