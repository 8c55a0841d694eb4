"""The lifelong (sequential) protocol (docs/benchmarks.md).

1. the first N records (file order, or a seeded shuffle, stated in the result);
2. the unedited model's locality outputs and answers are recorded (pre pass);
3. N edits are applied one after another to one model, never rolled back;
4. only after the last edit, every record is scored on the final model: served answers
   (`lifelong-served/v2`, editors/bench/served.py: the headline) and teacher-forced
   token accuracy (`rel`, `gen`, `loc`: a secondary diagnostic). With `served_every` K the
   served answers are asked for records 0, K, 2K, ... only (all N edits still applied).

A long sequence (`--distract`, 10,000 edits: hours) can keep its progress in a checkpoint
directory (`Checkpoint`): the editor's state and the edit times so far, every `every`
edits. A run given the same directory and the same sequence resumes after the last
checkpoint instead of starting over (the pre pass, on the unedited model, is run again).
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kmd.editors.bench import served
from kmd.editors.bench.data import EditRecord
from kmd.editors.protocol import EditRequest
from kmd.editors.scoring import generate, score_targets
from kmd.editors.state import reload_editor, save_editor, state_digest, write_atomic

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import Editor

PROTOCOL = "lifelong-sequential/v1: N edits in order, scored once after the last edit"
TEACHER_FORCED = "rel, gen, loc, ppl: teacher-forced (the target fed in, argmax checked per position)"

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class BenchOptions:
    batch_size: int = 16
    timing_prompts: int = 50  # prompts for the base-vs-edited forward latency
    timing_rounds: int = 3
    served: bool = True  # the served-answer pass (generated answers)
    # lifelong-served/v2 (every form, same-subject and portability questions); False: v1 only
    # (edit prompts and rephrases plain and chat, locality)
    served_v2: bool = True
    served_every: int = 1  # served answers for records 0, K, 2K, ... only (the served pass is the slow part)
    misses: bool = False  # also list every wrong served answer (not just `miss_sample`)
    # After everything else: K edits timed on the editor holding the whole sequence and on an
    # empty one, alternating (`_store_cost`); 0: not measured
    store_cost: int = 0


def _mean(values: Sequence[float]) -> float | None:
    return float(statistics.fmean(values)) if values else None


def _p95(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))])


def _starts_with(host: ModelHost, tokens: list[int], target: str) -> bool:
    text = host.tokenizer.decode(tokens, skip_special_tokens=True)
    return text.strip().startswith(target.strip())


def _target_lengths(host: ModelHost, pairs: Sequence[tuple[str, str]]) -> list[int]:
    return [len(host.encode_pair(p, t)[1]) for p, t in pairs]


@torch.no_grad()
def forward_ms(host: ModelHost, editor: Editor, prompts: Sequence[str], rounds: int) -> tuple[float, float]:
    """Mean ms per single-prompt forward, base (hooks removed) vs edited, same prompts.

    Blocks alternate and the best round of each is kept, to damp noise from other load.
    """
    encoded = [torch.tensor([host.encode(host.format_prompt(p))], device=host.device) for p in prompts]

    def block(edited: bool) -> float:
        start = time.perf_counter()
        for ids in encoded:
            if edited:
                with editor.query(None):
                    host.model(input_ids=ids)
            else:
                host.model(input_ids=ids)
        return (time.perf_counter() - start) * 1000 / len(encoded)

    base, edited = [], []
    for _ in range(rounds):
        with editor.suspended():
            base.append(block(False))
        edited.append(block(True))
    return min(base), min(edited)


class CheckpointError(Exception):
    """A checkpoint directory that belongs to another run, or does not match its state."""


@dataclass(frozen=True)
class Checkpoint:
    """Where a long edit sequence keeps its progress, every `every` edits.

    Two state slots alternate, and `progress.json` (replaced atomically, last) names the
    slot that holds its edits: a crash while a slot is written leaves the other one and
    the progress that goes with it."""

    path: Path
    every: int = 500

    PROGRESS = "progress.json"

    def resume(self, editor: Editor, fingerprint: str) -> list[float]:
        """Put `editor` at the last checkpoint of this sequence. -> the edit seconds so far
        ([] and the editor untouched when there is none yet)."""
        file = self.path / self.PROGRESS
        if not file.is_file():
            return []
        progress = json.loads(file.read_text())
        if progress.get("fingerprint") != fingerprint:
            raise CheckpointError(f"{self.path} holds the progress of another run (another backend, configuration, "
                                  "model or sequence of edits); give another checkpoint directory or remove it")  # fmt: skip
        reload_editor(editor, self.path / progress["slot"], digest=progress["digest"])
        seconds = [float(s) for s in progress["edit_seconds"]]
        if len(editor.edit_ids) != len(seconds):
            raise CheckpointError(f"{self.path}: the saved state has {len(editor.edit_ids)} edits, its progress {len(seconds)}")
        torch.set_rng_state(torch.tensor(progress["torch_rng"], dtype=torch.uint8))
        return seconds

    def due(self, done: int, total: int) -> bool:
        return done % self.every == 0 or done == total

    def save(self, editor: Editor, fingerprint: str, edit_seconds: Sequence[float]) -> None:
        file = self.path / self.PROGRESS
        previous = json.loads(file.read_text())["slot"] if file.is_file() else None
        slot = "state-b" if previous == "state-a" else "state-a"
        saved = save_editor(editor, self.path / slot)
        progress = {
            "fingerprint": fingerprint, "slot": slot, "digest": state_digest(saved),
            "edit_seconds": list(edit_seconds), "torch_rng": torch.get_rng_state().tolist(),
        }  # fmt: skip
        write_atomic(file, json.dumps(progress).encode())


def _store_cost(host: ModelHost, editor: Editor, sample: Sequence[EditRecord], blocks: int = 4) -> dict[str, Any]:
    """Seconds per edit with the whole store and with none, in one process: `sample`'s edits
    applied to `editor` (holding the sequence) and to a new editor of its backend and
    config, in alternating blocks. The first and last 1000 edits of a long sequence are
    hours apart, and whatever else the machine did meanwhile (the other core's work shares
    the memory bus) shows in their ratio; this one compares at the same moment. Both
    editors keep what they apply (a revert would make the next apply copy the store)."""
    empty = type(editor)(host, editor.config)
    times: dict[str, list[float]] = {"warm": [], "full": [], "empty": []}

    def timed(target: Editor, side: str, records: Sequence[EditRecord], offset: int) -> None:
        for i, record in enumerate(records, offset):
            request = EditRequest(prompt=record.prompt, target=record.target, subject=record.subject, edit_id=f"cost-{side}-{i}")
            start = time.perf_counter()
            target.apply(request)
            times[side].append(time.perf_counter() - start)

    with editor.suspended():  # the new editor's one-off set-up (LLP: statistics, prefixes), not timed
        timed(empty, "warm", sample[:1], 0)
    size = max(1, -(-len(sample) // blocks))
    for start in range(0, len(sample), size):  # neither editor's edits act on the other's optimisation
        with empty.suspended():
            timed(editor, "full", sample[start : start + size], start)
        with editor.suspended():
            timed(empty, "empty", sample[start : start + size], start)
    empty.retire()
    full, none = _mean(times["full"]), _mean(times["empty"])
    return {"store_cost_edits": len(sample), "edit_s_whole_store": full, "edit_s_empty_store": none,
            "edit_s_whole_over_empty": full / none if full and none else None}  # fmt: skip


def sequence_fingerprint(host: ModelHost, editor: Editor, sequence: Sequence[EditRecord], seed: int) -> str:
    """What a checkpoint must match to be resumed: the backend, its configuration (but the
    options that only change serving, `Editor.SERVING_ONLY`), the base model, the seed and
    every edit of the sequence, in order."""
    config = {k: v for k, v in editor.config_dict().items() if k not in editor.SERVING_ONLY}
    what = [editor.name, config, host.identity.name, seed,
            [(r.prompt, r.target, r.subject) for r in sequence]]  # fmt: skip
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _edit_time_figures(seconds: Sequence[float], window: int = 1000) -> dict[str, Any]:
    """Edit time over the whole sequence: the mean of the first and of the last `window`
    edits (the whole sequence when it is shorter than two windows: None)."""
    if len(seconds) < 2 * window:
        return {"edit_s_first_1000": None, "edit_s_last_1000": None, "edit_s_last_over_first": None}
    first, last = _mean(seconds[:window]), _mean(seconds[-window:])
    return {"edit_s_first_1000": first, "edit_s_last_1000": last, "edit_s_last_over_first": last / first if first else None}


def run_lifelong(
    host: ModelHost,
    editor: Editor,
    records: Sequence[EditRecord],
    *,
    seed: int = 0,
    shuffle: bool = False,
    options: BenchOptions = BenchOptions(),
    progress: Progress | None = None,
    distractors: Sequence[EditRecord] = (),
    checkpoint: Checkpoint | None = None,
) -> dict[str, Any]:
    """The protocol on `records`; with `distractors`, those are edited too, after the
    evaluated records and before anything is scored, so the evaluated edits must survive a
    long lifelong sequence (only the evaluated records are scored). With `checkpoint`, the
    sequence resumes from (and keeps) its progress there."""
    notify = progress or (lambda phase, done, total: None)
    records = list(records)
    if shuffle:
        random.Random(seed).shuffle(records)
    torch.manual_seed(seed)
    n = len(records)
    bs = options.batch_size
    loc_records = [r for r in records if r.loc_answer]  # records without a locality answer are not locality-scored
    loc_pairs = [(r.loc_prompt, r.loc_answer) for r in loc_records]
    loc_lengths = _target_lengths(host, loc_pairs)

    # 2. pre pass on the unedited model
    notify("pre pass", 0, 2)
    base_loc = score_targets(host, None, loc_pairs, bs)
    notify("pre pass", 1, 2)
    base_loc_gen = generate(host, None, [r.loc_prompt for r in loc_records], loc_lengths, bs)
    notify("pre pass", 2, 2)
    asked = records[:: options.served_every]
    served_base = served.run_pass(host, None, asked, bs, notify, "base answers", options.served_v2) if options.served else None

    # 3. sequential edits: the evaluated records, then the distractors
    sequence = [*records, *distractors]
    fingerprint = sequence_fingerprint(host, editor, sequence, seed) if checkpoint else ""
    edit_seconds: list[float] = checkpoint.resume(editor, fingerprint) if checkpoint else []
    resumed = len(edit_seconds)
    for index in range(resumed, len(sequence)):
        record = sequence[index]
        # the evaluated rephrases stay out of the request: a backend may fit its paraphrases
        # (RECIPE's per-edit bar), and the rephrase figures are of questions it never saw.
        # Ids follow the sequence, so a run is repeatable (LLP draws its prefixes by id).
        request = EditRequest(prompt=record.prompt, target=record.target, subject=record.subject, edit_id=f"bench-{index}")
        start = time.perf_counter()
        editor.apply(request)
        edit_seconds.append(time.perf_counter() - start)
        notify("editing", index + 1, len(sequence))
        if checkpoint and checkpoint.due(index + 1, len(sequence)):
            checkpoint.save(editor, fingerprint, edit_seconds)

    # 4. score everything on the final model
    rel_pairs = [(r.prompt, r.target) for r in records]
    gen_pairs = [(p, r.target) for r in records for p in r.rephrases]
    gen_owner = [i for i, r in enumerate(records) for _ in r.rephrases]
    steps = 6
    notify("scoring", 0, steps)
    rel = score_targets(host, editor, rel_pairs, bs)
    notify("scoring", 1, steps)
    gen = score_targets(host, editor, gen_pairs, bs) if gen_pairs else []
    notify("scoring", 2, steps)
    loc = score_targets(host, editor, loc_pairs, bs)
    notify("scoring", 3, steps)
    rel_tokens = generate(host, editor, [p for p, _ in rel_pairs], _target_lengths(host, rel_pairs), bs)
    notify("scoring", 4, steps)
    gen_tokens = generate(host, editor, [p for p, _ in gen_pairs], _target_lengths(host, gen_pairs), bs) if gen_pairs else []
    notify("scoring", 5, steps)
    loc_gen = generate(host, editor, [r.loc_prompt for r in loc_records], loc_lengths, bs)
    notify("scoring", 6, steps)

    served_figures = {}
    if served_base is not None:
        served_edited = served.run_pass(host, editor, asked, bs, notify, "answers", options.served_v2)
        served_figures = served.summarise(served_base, served_edited, asked)
        served_figures |= {"served_every": options.served_every, "n_served": len(asked)}
        if options.misses:
            served_figures["misses"] = served.misses(host, editor, served_base, served_edited, asked)

    def per_record(values: list[float], owners: list[int]) -> list[float]:
        # average over a record's rephrases first, then over records
        grouped: dict[int, list[float]] = {}
        for owner, value in zip(owners, values, strict=True):
            grouped.setdefault(owner, []).append(value)
        return [statistics.fmean(v) for v in grouped.values()]

    timing = records[: options.timing_prompts]
    forward_base, forward_edited = forward_ms(
        host, editor, [r.prompt for r in timing] + [r.loc_prompt for r in timing], options.timing_rounds
    )
    with tempfile.TemporaryDirectory() as tmp:
        saved = save_editor(editor, Path(tmp) / "state")
        state_bytes = sum(f.stat().st_size for f in saved.iterdir())

    store_cost = _store_cost(host, editor, records[: options.store_cost]) if options.store_cost else {}

    gen_ok = [float(_starts_with(host, t, gen_pairs[i][1])) for i, t in enumerate(gen_tokens)]
    return {
        "backend": editor.name,
        "model": host.identity.name,
        "dataset": None,  # filled in by the caller, which knows the path
        "n_edits": n,
        "n_loc": len(loc_records),
        "rel": _mean([s.accuracy for s in rel]),
        "gen": _mean(per_record([s.accuracy for s in gen], gen_owner)) if gen else None,
        "loc": _mean([e.agreement(b) for e, b in zip(loc, base_loc, strict=True)]),
        "rel_em": _mean([float(_starts_with(host, t, r.target)) for t, r in zip(rel_tokens, records, strict=True)]),
        "gen_em": _mean(per_record(gen_ok, gen_owner)) if gen_pairs else None,
        "loc_em": _mean([float(e == b) for e, b in zip(loc_gen, base_loc_gen, strict=True)]),
        "ppl": _mean([s.perplexity for s in rel]),
        "edit_s_mean": _mean(edit_seconds),
        "edit_s_p95": _p95(edit_seconds),
        "forward_ms_base": forward_base,
        "forward_ms_edited": forward_edited,
        "overhead_ratio": forward_edited / forward_base if forward_base else None,
        "state_bytes_per_edit": state_bytes / len(sequence) if sequence else None,
        "n_distractors": len(distractors),
        "resumed_after_edits": resumed,  # > 0: the edits before ran in an earlier process (peak RSS is this one's)
        **_edit_time_figures(edit_seconds),
        **store_cost,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **served_figures,
        "protocol": PROTOCOL,
        "teacher_forced": TEACHER_FORCED,
        "order": f"seeded shuffle (seed {seed})" if shuffle else "file order",
        "seed": seed,
        "backend_config": editor.config_dict(),
        "device": str(host.device),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
    }
