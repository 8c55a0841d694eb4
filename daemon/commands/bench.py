"""`kmd bench`: score a backend with the lifelong protocol on an edit dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kmd.daemon.commands.common import ChatOpt, DeviceOpt, DtypeOpt, ModelOpt, ProfileOpt, fail, load_host

SERVED = ("served_rel", "served_gen", "chat_rel", "chat_gen", "served_loc", "chat_loc", "degenerate", "degenerate_base")
FORMS = ("plain", "chat", "sys", "multi")
SERVED_V2 = (
    *(f"edit_{f}_ok" for f in FORMS), *(f"reph_{f}_ok" for f in FORMS[:2]),
    *(f"{k}_{f}_{m}" for k in ("same", "near") for f in FORMS[:2] for m in ("unchanged", "hijack")),
    *(f"port_{f}_ok{b}" for f in FORMS[:2] for b in ("", "_base", "_context")),
    *(f"loc_{f}" for f in FORMS[:2]), "degenerate_all", "degenerate_all_base",
)
METRICS = ("rel", "gen", "loc", "rel_em", "gen_em", "loc_em", "ppl")  # teacher-forced (and *_em: short greedy)
COSTS = (
    "edit_s_mean", "edit_s_p95", "edit_s_first_1000", "edit_s_last_1000", "edit_s_last_over_first", "forward_ms_base",
    "forward_ms_edited", "overhead_ratio", "state_bytes_per_edit", "n_distractors", "resumed_after_edits", "edit_s_whole_store",
    "edit_s_empty_store", "edit_s_whole_over_empty", "peak_rss_mb",
)


def register(app: typer.Typer) -> None:
    app.command("bench", help="Benchmark a backend: N sequential edits, scored after the last one.")(bench)


def bench(
    backend: Annotated[str, typer.Option(help="Editing backend (see `kmd backends`).")],
    data: Annotated[Path, typer.Option(help="Dataset file: ZsRE, CounterFact (flat), KnowEdit, hallucination or temporal JSON.")],
    limit: Annotated[int | None, typer.Option(min=1, help="Use the first N records.")] = None,
    format: Annotated[str | None, typer.Option("--format", help="zsre, counterfact, knowedit, hallucination or temporal (default: detect).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (torch, and the shuffle if --shuffle).")] = 0,
    shuffle: Annotated[bool, typer.Option(help="Seeded shuffle instead of file order.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the result as JSON here.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Scoring batch size.")] = 16,
    config: Annotated[list[str] | None, typer.Option("--set", help="Backend option override KEY=VALUE (JSON value), repeatable.")] = None,
    model: ModelOpt = "embedded",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    profile: ProfileOpt = None,
    chat_template: ChatOpt = False,
    served: Annotated[bool, typer.Option(help="Also generate and judge served answers.")] = True,
    distract: Annotated[list[str] | None, typer.Option(help="FILE:K: after the evaluated edits, apply K edits from "
                                                       "FILE's first records (repeatable), then score the evaluated ones.")] = None,
    served_protocol: Annotated[str, typer.Option("--served-protocol", help="v2: every form (plain, chat, sys, multi), "
                                                  "same-subject and portability questions; v1: edit prompts and rephrases, plain and chat.")] = "v2",
    served_every: Annotated[int, typer.Option("--served-every", min=1, help="Ask the served questions of every K-th record only "
                                              "(records 0, K, 2K, ...), after all N edits: the served pass is the slow part.")] = 1,
    misses: Annotated[bool, typer.Option("--misses", help="Print (and write as `misses`) every edit prompt and rephrase "
                                         "answered wrong, with both answers.")] = False,
    checkpoint: Annotated[Path | None, typer.Option(help="Keep the edit sequence's progress in this directory (the editor's "
                                                    "state and edit times) and resume from it: a 10,000-edit run takes hours.")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Edits between checkpoints.")] = 500,
    store_cost: Annotated[int, typer.Option("--store-cost", min=0, help="After scoring, time K edits on the editor holding "
                                            "the whole sequence and on an empty one, alternating (what the store costs an edit, "
                                            "both measured at the same moment).")] = 0,
) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from loguru import logger

    from kmd.editors.bench.data import DatasetError, load_records
    from kmd.editors.bench.harness import BenchOptions, Checkpoint, CheckpointError, run_lifelong
    from kmd.editors.registry import UnknownBackendError, get_backend
    from kmd.editors.state import StateError

    if served_protocol not in ("v1", "v2"):
        raise fail(f"--served-protocol must be v1 or v2, not {served_protocol!r}")
    if not served and (misses or served_every > 1):
        raise fail("--misses and --served-every need the served pass (drop --no-served)")
    try:
        backend_cls = get_backend(backend)
        fmt, records = load_records(data, format, limit)
        distractors = load_distractors(distract or [])
        overrides = parse_overrides(config or [])
    except (UnknownBackendError, DatasetError, ValueError) as exc:
        raise fail(str(exc)) from exc
    host = load_host(model, device, dtype, profile, chat_template)
    try:
        editor = backend_cls(host, backend_cls.default_config(host, **overrides))
    except (ValueError, TypeError) as exc:
        raise fail(str(exc)) from exc

    console = Console(stderr=True)
    columns = (TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done)
            if not console.is_terminal and (done == total or done % max(total // 10, 1) == 0):
                logger.info("{}: {}/{}", phase, done, total)  # a bar does not show in logs

        if checkpoint:
            checkpoint.mkdir(parents=True, exist_ok=True)
        try:
            result = run_lifelong(
                host, editor, records, seed=seed, shuffle=shuffle,
                options=BenchOptions(batch_size=batch_size, served=served, served_v2=served_protocol == "v2",
                                     served_every=served_every, misses=misses, store_cost=store_cost),
                progress=progress,
                distractors=distractors,
                checkpoint=Checkpoint(checkpoint, checkpoint_every) if checkpoint else None,
            )
        except (CheckpointError, StateError) as exc:  # a checkpoint of another run, or a damaged one
            raise fail(str(exc)) from exc
    result["dataset"] = str(data)
    result["format"] = fmt
    print_table(result)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {out}")


def load_distractors(items: list[str]) -> list:
    """The records of each --distract FILE:K (the first K of FILE), in order."""
    from kmd.editors.bench.data import load_records

    out: list = []
    for item in items:
        path, sep, count = item.rpartition(":")
        if not sep or not path or not count.isdigit() or int(count) < 1:
            raise ValueError(f"--distract expects FILE:K with K >= 1, got {item!r}")
        _, records = load_records(Path(path), None, int(count))
        if len(records) < int(count):
            raise ValueError(f"--distract {item}: the file has only {len(records)} records")
        out += records
    return out


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    console = Console()
    every = result.get("served_every", 1)
    asked = f", served answers of {result['n_served']} records, one in {every}" if every > 1 else ""
    table = Table(title=f"{result['backend']} on {Path(result['dataset']).name} ({result['n_edits']} edits{asked}, {result['model']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    sections = (("served answers (v1)", SERVED), ("served answers (v2)", SERVED_V2), ("teacher-forced", METRICS), ("cost", COSTS))
    for title, keys in sections:
        if all(result.get(k) is None for k in keys):
            continue
        table.add_section()
        table.add_row(f"[bold]{title}[/bold]", "")
        for key in keys:
            table.add_row(key, fmt(result.get(key)))
    console.print(table)
    print_answers(console, result.get("answers_sample") or [])
    print_hijacks(console, result.get("hijack_sample") or [])
    if "misses" in result:
        print_misses(console, result["misses"])


def _answer_table(title: str, columns: tuple[str, ...]):
    from rich.table import Table

    table = Table(title=title, show_lines=True)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def print_answers(console, sample: list[dict]) -> None:
    """Base and edited answers side by side: people read answers, not numbers."""
    from rich.markup import escape

    if not sample:
        return
    table = _answer_table("answers (first records): base -> edited", ("prompt -> target", "form", "base", "edited", "ok"))
    for row in sample:
        for form in FORMS:
            answer = row.get(form) or {}
            if "base" in answer:
                table.add_row(
                    escape(f"{row['prompt']} -> {row['target']}"), form, escape(answer["base"].strip()[:160]),
                    escape(answer["edited"].strip()[:160]), "yes" if answer["correct"] else "no",
                )
            if "same" in answer:
                verdict = "HIJACKED" if answer["same_hijacked"] else ("unchanged" if answer["same_unchanged"] else "changed")
                table.add_row(escape(f"(same subject) {answer['same']}"), form, escape(answer["same_base"].strip()[:160]),
                              escape(answer["same_edited"].strip()[:160]), verdict)  # fmt: skip
    console.print(table)


def print_hijacks(console, hijacks: list[dict]) -> None:
    """Same-subject and near-subject questions the edit answered with its own target: the worst failure."""
    from rich.markup import escape

    if not hijacks:
        return
    columns = ("kind", "edit", "question", "form", "base", "edited")
    table = _answer_table("hijacked same-subject / near-subject answers: base -> edited", columns)
    for row in hijacks:
        table.add_row(*(escape(str(row.get(k, "same")).strip()[:160]) for k in columns))
    console.print(table)


def print_misses(console, misses: list[dict]) -> None:
    """Every wrong served answer (`--misses`), whole: why an edit's answers fail."""
    from rich.markup import escape

    routed = {True: "routed", False: "not routed", None: "-"}
    table = _answer_table(f"every wrong answer ({len(misses)}): base -> edited", ("prompt -> target", "asked", "base", "edited", "why"))
    for m in misses:
        why = "degenerate after the target" if m["hit"] else ("missed, degenerate" if m["degenerate"] else "missed")
        table.add_row(escape(f"{m['prompt']} -> {m['target']}"), f"{m['kind']} {m['form']}", escape(m["base"].strip()),
                      escape(m["edited"].strip()), f"{why}; {routed[m['routed']]}")  # fmt: skip
    console.print(table)
