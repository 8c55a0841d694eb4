"""Experiment (not in the product): would MEMOIR's looping answers ("poet, poet, poet ...")
improve if a routed row could not restate its target once written (until the row ends)?
Patches the answer tracker with a "restate" rule (the first token of each spelling of the
target floored), then runs served_misses.py's measurement.

    python scripts/experiments/no_restate.py BACKEND DATA N [CONFIG_KEY=VALUE ...]
"""
import runpy
import sys

import torch

import kmd.editors.answer_stop as answer_stop

Tracker = answer_stop.AnswerTracker
plain_rule, plain_point = Tracker._rule, Tracker.point


def _rule(self, row):
    rule = plain_rule(self, row)
    return "restate" if rule is None and self.done[row] and not self.ended[row] and self.spellings else rule


def point(self, logits):
    held = [[r if r != "restate" else None for r in rules] for rules in self.rules]
    restate = [[r == "restate" for r in rules] for rules in self.rules]
    self.rules, kept = held, self.rules
    try:
        logits = plain_point(self, logits)
    finally:
        self.rules = kept
    tl = logits.shape[1]
    for row, flags in enumerate(restate):
        offset = tl - len(flags)
        firsts = sorted({spelling[0] for spelling, _ in self.spellings[row]})
        for j, flag in enumerate(flags):
            if flag and j + offset >= 0:
                logits[row, j + offset, firsts] = torch.finfo(logits.dtype).min
    return logits


Tracker._rule, Tracker.point = _rule, point
sys.argv = ["served_misses.py", *sys.argv[1:]]
runpy.run_path("scripts/experiments/served_misses.py", run_name="__main__")
