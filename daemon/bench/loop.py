"""`kmd bench-loop`: how long a new feed entry takes to become a committed, probed edit.

The real maintenance loop on the demo policy (embedded model by default, the policy's
backend): a feed served on loopback gains one new entry at a time, and each time one
`Daemon.cycle()` polls it, verifies it, applies the edit, runs every probe (the edit and
its paraphrases, the whole locality suite, a sample of earlier edits) and commits. The
first entry is a warm-up: it pays the backend's one-off costs (LLP generates its
background statistics on the first edit) and is reported apart. The probes are the
daemon's: served answers, routing-aware locality (`loc rows run`: suite prompts generated). Under the scheduler the
source's poll interval adds up to that interval on top of these figures.

`--burst N`: after the warm-up entry, N new entries appear in the feed at once (an
election, a season's transfers) and cycles run until every one is committed (or
reverted): the figure is the time from the N entries to all committed, with the daemon's
batches (`schedule.edit_batch`, `--batch` to change it; kmd.daemon.batch). `--subjects
distinct` makes the entries' companies and people share no names.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from enum import Enum
from pathlib import Path
from typing import Annotated
from xml.sax.saxutils import escape

import typer

from kmd.daemon.commands.common import DeviceOpt, ModelOpt

# Made-up companies and people: the model cannot know them, so every edit must take.
FIRST = ("Nadia", "Tomas", "Ilse", "Ravi", "Odile", "Kenji", "Marta", "Femi", "Lior", "Anouk", "Pavel", "Sana")
LAST = ("Velmont", "Grausz", "Okafor", "Lindqvist", "Marchetti", "Tanaka", "Brennan", "Aziz", "Halloran", "Vesely")
COMPANY = ("Zorbland", "Quillix", "Brontera", "Velocor", "Nimbrook", "Ostrava", "Kelvane", "Tarsis", "Umbrel", "Wendrik")
TRADE = ("Robotics", "Foods", "Labs", "Shipping", "Mining", "Media", "Textiles", "Pharma", "Energy", "Motors", "Studios",
         "Logistics")  # fmt: skip
MAX_BURST = len(COMPANY) * len(TRADE) - 1  # distinct subjects after the warm-up's
# `--subjects distinct`: company names that share no word (a syllable pair each), and people
# that share no full name, as an election's or a season's unrelated facts would.
HEAD = ("Zor", "Quil", "Bron", "Vel", "Nim", "Ost", "Kel", "Tar", "Umb", "Wen", "Pra", "Dru")
TAIL = ("blandor", "lixum", "tera", "ocor", "brook", "ravio", "vane", "sisto", "relan", "drik")


class Subjects(str, Enum):
    alike = "alike"
    distinct = "distinct"


def _fact(i: int, subjects: str = "alike") -> tuple[str, str]:
    """Entry i's subject (distinct for i <= MAX_BURST) and its new CEO. "alike": ten company
    names in twelve trades ("Brontera Foods", "Brontera Labs", ...) with recurring people
    (the hard case: RECIPE answers a paraphrase with a neighbour's CEO); "distinct": no
    shared word between two companies, no shared full name between two people."""
    if subjects == "distinct":
        k = i // len(HEAD)  # (i % 12, (i + k) % 10) never repeats for i <= MAX_BURST; neighbours share no part,
        # and one head's ten companies are in ten trades ((i + 5k) % 12)
        company = f"{HEAD[i % len(HEAD)]}{TAIL[(i + k) % len(TAIL)]} {TRADE[(i + 5 * k) % len(TRADE)]}"
        return company, f"{FIRST[i % len(FIRST)]} {LAST[(i + k) % len(LAST)]}"
    return f"{COMPANY[i % len(COMPANY)]} {TRADE[i // len(COMPANY) % len(TRADE)]}", f"{FIRST[i % len(FIRST)]} {LAST[(i * 7) % len(LAST)]}"


def register(app: typer.Typer) -> None:
    app.command("bench-loop", help="Time from a new feed entry to its committed, probed edit (the real loop).")(bench_loop)


class _Feed:
    """An Atom feed on loopback whose entries the benchmark appends to."""

    def __init__(self) -> None:
        self.entries: list[str] = []
        feed = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                body = feed.body()
                self.send_response(200)
                self.send_header("Content-Type", "application/atom+xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/feed.atom"

    def add(self, index: int, subject: str, obj: str) -> None:
        self.entries.append(
            f"<entry><id>urn:kmd:bench:{index}</id><title>{escape(subject)} names a chief executive</title>"
            f"<updated>2026-11-20T08:00:{index % 60:02d}Z</updated><link href='https://newswire.example/{index}'/>"
            f"<kf:subject>{escape(subject)}</kf:subject><kf:relation>ceo</kf:relation>"
            f"<kf:object>{escape(obj)}</kf:object></entry>"
        )

    def body(self) -> bytes:
        return (
            "<?xml version='1.0' encoding='utf-8'?><feed xmlns='http://www.w3.org/2005/Atom' xmlns:kf='urn:kmd:fact:1'>"
            "<title>bench</title><id>urn:kmd:bench</id><updated>2026-11-20T09:00:00Z</updated>"
            + "".join(self.entries) + "</feed>"
        ).encode()


def _feed_and_file_only(text: str) -> str:
    """The demo policy without its Wikidata source: the benchmark times feed entries only."""
    import yaml

    data = yaml.safe_load(text)
    data["sources"] = [s for s in data["sources"] if s["kind"] != "wikidata"]
    return yaml.safe_dump(data, sort_keys=False)


def _with_probes(text: str, settings: list[str]) -> str:
    import yaml

    data = yaml.safe_load(text)
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--probe {item!r}: expected KEY=VALUE")
        data.setdefault("probes", {})[key.strip()] = yaml.safe_load(value)
    return yaml.safe_dump(data, sort_keys=False)


def demo_backend(model: str, backend: str | None) -> str | None:
    """The backend to put in the demo policy: as asked, else None (the policy's, RECIPE) on the
    embedded model and LLP on any other (RECIPE's trained editor ships for the embedded model
    only; another model would need `kmd recipe train` first)."""
    if backend:
        return backend
    return None if model == "embedded" else "llp"


def with_backend(policy_text: str, backend: str | None) -> str:
    """The demo policy's text with its `backend:` line set to `backend` (None: as it is)."""
    return policy_text.replace("\nbackend: ", f"\nbackend: {backend}  # was: ", 1) if backend else policy_text


def demo_workdir(workdir: Path | None, prefix: str, backend: str | None, probe: list[str] | None) -> tuple[Path, _Feed, Path]:
    """A benchmark's work folder: the demo policy on a loopback feed (served from here) and an
    empty curated file, with the backend and probe settings overridden as asked."""
    work = (workdir or Path(tempfile.mkdtemp(prefix=prefix))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    feed = _Feed()
    facts = work / "facts.jsonl"
    facts.write_text('{"kmd_jsonl": 1, "source": "curated", "sequence": 1, "created": "2026-11-20T00:00:00Z"}\n')
    text = resources.files("kmd.policies").joinpath("demo-policy.yaml").read_text()
    text = _feed_and_file_only(text.replace("FEED_URL", feed.url).replace("FACTS_PATH", str(facts)))
    text = with_backend(text, backend)
    if probe:
        text = _with_probes(text, probe)
    policy = work / "policy.yaml"
    policy.write_text(text)
    return work, feed, policy


def bench_loop(
    entries: Annotated[int, typer.Option(min=1, max=100, help="Timed entries (after one warm-up entry).")] = 5,
    burst: Annotated[int | None, typer.Option(min=1, max=MAX_BURST, help="Instead: N entries at once (after the warm-up); time until all are committed.")] = None,
    batch: Annotated[int | None, typer.Option(min=1, help="schedule.edit_batch: edits probed together (default: the daemon's).")] = None,
    subjects: Annotated[Subjects, typer.Option(help="alike: ten company names in twelve trades, recurring people; distinct: no shared names.")] = Subjects.alike,
    model: ModelOpt = "embedded",
    device: DeviceOpt = "auto",
    backend: Annotated[str | None, typer.Option(help="Override the demo policy's backend.")] = None,
    probe: Annotated[list[str] | None, typer.Option(help="Override a probes setting of the demo policy: KEY=VALUE (YAML value); repeatable.")] = None,
    workdir: Annotated[Path | None, typer.Option(help="State and ledger directory (default: a new temp dir).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the figures as JSON here.")] = None,
) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    from kmd.daemon.service import Daemon
    from kmd.daemon.settings import ApiSettings, DaemonSettings, ModelConfig, ScheduleSettings

    console = Console(width=120)
    work, feed, policy = demo_workdir(workdir, "kmd-bench-loop-", demo_backend(model, backend), probe)
    schedule = ScheduleSettings() if batch is None else ScheduleSettings(edit_batch=batch)
    settings = DaemonSettings(policy=str(policy), state_dir=str(work / "state"), schedule=schedule,
                              model=ModelConfig(model=model, device=device), api=ApiSettings(enabled=False))  # fmt: skip
    daemon = Daemon(settings)
    rows: list[dict] = []
    bursts: dict | None = None
    try:
        started = time.perf_counter()
        maintainer = daemon.load()
        load_s = time.perf_counter() - started
        for i in range(1 if burst else entries + 1):
            subject, person = _fact(i, subjects.value)
            feed.add(i, subject, person)
            t0 = time.perf_counter()
            summary = daemon.cycle(all_sources=True, regression=False)
            seconds = time.perf_counter() - t0
            edits = [e for e in daemon.ledger.edits() if e.edit_request.subject == subject]
            final = edits[-1] if edits else None
            probes = (final.probes or {}) if final else {}
            if final is not None and final.status == "reverted":  # its probe figures are in the revert log
                revert = next((r for r in daemon.ledger.reverts(limit=50) if r.edit_id == final.id), None)
                probes = (revert.probes_before or {}) if revert else {}
            rows.append({"entry": i, "warm_up": i == 0, "fact": f"{subject} ceo -> {person}",
                         "status": final.status if final else "skipped (already known)", "attempts": len(edits),
                         "entry_to_commit_s": seconds if summary.committed else None,
                         "apply_s": probes.get("apply_seconds"), "probe_s": probes.get("probe_seconds"),
                         "probe_parts_s": probes.get("seconds"),
                         "rel": probes.get("rel"), "gen": probes.get("gen"), "loc": probes.get("loc"),
                         "served_rel": probes.get("served_rel"), "served_gen": probes.get("served_gen"),
                         "loc_rows_run": probes.get("loc_rows_run")})  # fmt: skip
            console.print(f"entry {i}: {rows[-1]['status']} in {seconds:.1f} s")
        if burst:
            bursts = _burst(daemon, feed, burst, subjects.value, console)
    finally:
        daemon.close()
        feed.server.shutdown()

    timed = [r for r in rows if not r["warm_up"] and r["entry_to_commit_s"] is not None]

    def mean(key: str) -> float | None:
        values = [r[key] for r in timed if r[key] is not None]
        return statistics.fmean(values) if values else None

    result = {
        "model": maintainer.host.identity.name, "backend": maintainer.editor.name, "device": str(maintainer.host.device),
        "torch_threads": torch.get_num_threads(), "load_and_baseline_s": load_s,
        "locality_prompts": len(maintainer.prober.baseline.prompts),
        "entries": rows, "committed": len(timed), "entry_to_commit_s_mean": mean("entry_to_commit_s"),
        "apply_s_mean": mean("apply_s"), "probe_s_mean": mean("probe_s"),
        "probe_parts_s_mean": _mean_parts([r["probe_parts_s"] for r in timed if r["probe_parts_s"]]),
        "edit_batch": settings.schedule.edit_batch, "burst": bursts, "subjects": subjects.value,
    }  # fmt: skip
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    if bursts is not None:
        console.print(f"burst of {bursts['entries']} entries -> {bursts['committed']} committed, {bursts['reverted']} "
                      f"reverted, {bursts['skipped']} skipped; the last committed after {fmt(bursts['seconds'])} s ({bursts['cycles']} cycles, "
                      f"batches of up to {settings.schedule.edit_batch}); "
                      f"load + locality baseline {load_s:.1f} s")  # fmt: skip
        for b in bursts["batches"]:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(b.get("probe_parts_s", {}).items()))
            console.print(f"  a batch of {b['size']}: {b['states_probed']} states probed, {b['culprits']} culprits, "
                          f"probes {fmt(b['probe_s'])} s ({parts})")  # fmt: skip
        _write(out, result)
        return
    table = Table(title=f"feed entry -> committed edit ({result['backend']}, {result['model']})")
    for column in ("entry", "status", "tries", "entry->commit s", "apply s", "probe s", "served rel", "served gen",
                   "rel", "gen", "loc", "loc rows run"):
        table.add_column(column)
    for r in rows:
        table.add_row(f"{r['entry']}{' (warm-up)' if r['warm_up'] else ''}", r["status"], str(r["attempts"]),
                      fmt(r["entry_to_commit_s"]), fmt(r["apply_s"]), fmt(r["probe_s"]), fmt(r["served_rel"]),
                      fmt(r["served_gen"]), fmt(r["rel"]), fmt(r["gen"]), fmt(r["loc"]),
                      "-" if r["loc_rows_run"] is None else str(r["loc_rows_run"]))  # fmt: skip
    console.print(table)
    console.print(f"load + locality baseline {load_s:.1f} s; mean over {len(timed)} committed entries: "
                  f"entry->commit {fmt(result['entry_to_commit_s_mean'])} s, apply {fmt(result['apply_s_mean'])} s, "
                  f"probes {fmt(result['probe_s_mean'])} s")  # fmt: skip
    if result["probe_parts_s_mean"]:
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in result["probe_parts_s_mean"].items())
        console.print(f"where the probe's time went (mean): {parts}")
    _write(out, result)


def _write(out: Path | None, result: dict) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


def _burst(daemon, feed: _Feed, n: int, kind: str, console) -> dict:  # noqa: ANN001
    """N entries at once after the warm-up; cycles until each has its final edit (committed,
    or reverted and not retried) or a cycle changes nothing. Seconds from the entries to
    the last commit."""
    subjects = set()
    for i in range(1, n + 1):
        subject, person = _fact(i, kind)
        feed.add(i, subject, person)
        subjects.add(subject)
    started = time.perf_counter()
    cycles: list[dict] = []
    seconds: float | None = None  # to the last commit
    while True:
        summary = daemon.cycle(all_sources=True, regression=False)
        cycles.append({"committed": len(summary.committed), "reverted": len(summary.reverted),
                       "skipped": len(summary.skipped), "seconds": round(summary.seconds, 3)})  # fmt: skip
        if summary.committed:
            seconds = time.perf_counter() - started
        console.print(f"burst cycle {len(cycles)}: {cycles[-1]}")
        pending = [f for f in daemon.ledger.ready_facts(limit=n) if f.subject in subjects]
        if not pending or not (summary.committed or summary.reverted or summary.skipped):
            break
    edits = [e for e in daemon.ledger.edits() if e.edit_request.subject in subjects]
    final = {}
    for e in sorted(edits, key=lambda e: e.id):
        final[e.edit_request.subject] = e  # the newest edit per subject (a retry after a batch)
    batches = {}
    for e in edits:  # one batch's edits carry the same batch figures; its probe time once
        figures = (e.probes or {}).get("batch")
        if e.status == "committed" and figures:
            batches.setdefault((figures["size"], e.probes.get("probe_seconds")), figures | {"probe_s": e.probes.get("probe_seconds")})
    return {"entries": n, "seconds": seconds, "cycles": len(cycles), "per_cycle": cycles,
            "committed": sum(e.status == "committed" for e in final.values()),
            "reverted": sum(e.status == "reverted" for e in final.values()),
            "skipped": n - len(final), "batches": sorted(batches.values(), key=lambda b: -b["size"])}  # fmt: skip


def _mean_parts(parts: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per probe part (served, teacher_forced, locality, earlier) over entries."""
    keys = sorted({k for p in parts for k in p})
    return {k: statistics.fmean(p.get(k, 0.0) for p in parts) for k in keys}
