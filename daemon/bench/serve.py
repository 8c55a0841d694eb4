"""`kmd bench-serve`: answers per second and latency of /v1/generate, idle and while editing.

The real daemon on the demo policy (embedded model by default) serves its HTTP API on
loopback. Concurrent clients post `/v1/generate` requests (`--max-new-tokens` each) in
three phases: one client (serial), `--clients` clients with no edit running (idle), and
the same while an edit loop runs (a feed on loopback gains one new entry at a time and
the daemon runs a cycle for each: verify, apply, probe, commit). Each phase reports
requests/s and p50/p95 latency. During the edit loop, half of the prompts ask for the
facts being edited: a response reports how many committed edits answered it (`edits`),
so a candidate edit leaking into an answer before its commit ("stale") is detected.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

from kmd.daemon.commands.common import DeviceOpt, ModelOpt
from kmd.daemon.bench.loop import COMPANY, FIRST, LAST, demo_backend, demo_workdir

GENERIC = ("The weather today is", "My favourite book is", "The best way to learn a language is",
           "Water boils at", "The largest ocean on Earth is", "A good breakfast includes",
           "The train to the city leaves at", "In the garden we planted")  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("bench-serve", help="Requests/s and latency of /v1/generate: serial, concurrent idle, during edits.")(
        bench_serve
    )


def _fact(i: int) -> tuple[str, str]:
    subject = f"{COMPANY[i % len(COMPANY)]} {['Robotics', 'Foods', 'Labs', 'Shipping'][i // len(COMPANY) % 4]}"
    return subject, f"{FIRST[i % len(FIRST)]} {LAST[(i * 7) % len(LAST)]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _phase(url: str, clients: int, requests: int, prompts: list[str], tokens: int) -> dict:
    import httpx

    lock, results = threading.Lock(), []
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                prompt = prompts[n % len(prompts)]
                started = time.perf_counter()
                try:
                    r = http.post(url, json={"prompt": prompt, "max_new_tokens": tokens})
                    body = r.json() if r.status_code == 200 else {}
                    row = {"prompt": prompt, "status": r.status_code, "text": body.get("text"), "edits": body.get("edits")}
                except httpx.HTTPError as exc:
                    row = {"prompt": prompt, "status": None, "error": str(exc)}
                row["seconds"] = time.perf_counter() - started
                with lock:
                    results.append(row)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies = sorted(r["seconds"] for r in results if r["status"] == 200)

    def pct(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    return {"clients": clients, "requests": requests, "ok": len(latencies), "failed": requests - len(latencies),
            "seconds": wall, "requests_per_s": len(latencies) / wall, "p50_s": pct(0.5), "p95_s": pct(0.95),
            "mean_s": statistics.fmean(latencies) if latencies else None, "results": results}  # fmt: skip


def bench_serve(
    clients: Annotated[int, typer.Option(min=1, max=256, help="Concurrent clients.")] = 16,
    requests: Annotated[int, typer.Option(min=1, help="Requests per concurrent phase.")] = 200,
    serial_requests: Annotated[int, typer.Option(min=1, help="Requests of the one-client phase.")] = 200,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=256)] = 16,
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
    from kmd.daemon.service.jobs import yield_to_serving
    from kmd.daemon.settings import ApiSettings, DaemonSettings, ModelConfig
    from kmd.editors.answers import answer_line, hits

    console = Console(width=120)
    work, feed, _ = demo_workdir(workdir, "kmd-bench-serve-", demo_backend(model, backend), probe)
    port = _free_port()
    settings = DaemonSettings(policy=str(work / "policy.yaml"), state_dir=str(work / "state"),
                              model=ModelConfig(model=model, device=device),
                              api=ApiSettings(enabled=True, port=port, max_batch=clients))  # fmt: skip
    daemon = Daemon(settings)
    url = f"http://127.0.0.1:{port}/v1/generate"
    phases: dict[str, dict] = {}
    edits: list[dict] = []
    try:
        maintainer = daemon.load()
        daemon.start_api()
        # A first committed edit (also pays the backend's one-off costs) before timing.
        feed.add(0, *_fact(0))
        daemon.cycle(all_sources=True, regression=False)
        fact_prompts = [f"The CEO of {_fact(i)[0]} is" for i in range(1, 9)]
        _phase(url, 1, 2, GENERIC[:2], max_new_tokens)  # warm the server up
        console.print("serial ...")
        phases["serial"] = _phase(url, 1, serial_requests, list(GENERIC), max_new_tokens)
        console.print(f"{clients} clients, idle ...")
        phases["idle"] = _phase(url, clients, requests, list(GENERIC), max_new_tokens)
        console.print(f"{clients} clients, during an edit loop ...")
        done = threading.Event()

        def edit_loop() -> None:
            yield_to_serving()  # as the daemon's edit job does
            i = 1
            while not done.is_set() and i <= len(fact_prompts):
                feed.add(i, *_fact(i))
                t0 = time.perf_counter()
                summary = daemon.cycle(all_sources=True, regression=False)
                edits.append({"entry": i, "committed": list(summary.committed), "reverted": list(summary.reverted),
                              "seconds": time.perf_counter() - t0})  # fmt: skip
                i += 1

        loop = threading.Thread(target=edit_loop, name="edit-loop")
        loop.start()
        mixed = [p for pair in zip(fact_prompts, GENERIC) for p in pair]
        phases["during_edits"] = _phase(url, clients, requests, mixed, max_new_tokens)
        done.set()
        loop.join()
        # Which edit answered which prompt: committed edits in order (this loop never reverts a committed one).
        order = [(e.request.get("subject"), e.request.get("target")) for e in daemon.ledger.committed_edits()]
        stale = missed = 0
        for r in phases["during_edits"]["results"]:
            if r["status"] != 200 or not r["prompt"].startswith("The CEO of "):
                continue
            subject = r["prompt"][len("The CEO of ") : -len(" is")]
            position = next((k for k, (s, _) in enumerate(order) if s == subject), None)
            visible = position is not None and position < r["edits"]
            hit = position is not None and hits(answer_line(r["text"]), order[position][1])
            stale += hit and not visible  # an answer from an edit not committed in the state that answered
            missed += visible and not hit
        phases["during_edits"] |= {"stale_answers": stale, "committed_but_not_answered": missed}
    finally:
        daemon.stopping.set()
        if daemon._server is not None:
            daemon._server.should_exit = True
        daemon.close()
        feed.server.shutdown()

    serial, idle, during = phases["serial"], phases["idle"], phases["during_edits"]
    result = {
        "model": maintainer.host.identity.name, "backend": maintainer.editor.name, "device": str(maintainer.host.device),
        "torch_threads": torch.get_num_threads(), "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "max_new_tokens": max_new_tokens, "edits_during": edits,
        "throughput_ratio": idle["requests_per_s"] / serial["requests_per_s"],
        "p95_ratio_during_vs_idle": (during["p95_s"] / idle["p95_s"]) if during["p95_s"] and idle["p95_s"] else None,
        "phases": {k: {kk: vv for kk, vv in v.items() if kk != "results"} for k, v in phases.items()},
    }  # fmt: skip
    table = Table(title=f"/v1/generate, {max_new_tokens} new tokens ({result['backend']}, {result['model']})")
    for column in ("phase", "clients", "requests", "failed", "req/s", "p50 s", "p95 s"):
        table.add_column(column)
    for name, p in phases.items():
        table.add_row(name, str(p["clients"]), str(p["requests"]), str(p["failed"]), f"{p['requests_per_s']:.2f}",
                      f"{p['p50_s']:.2f}", f"{p['p95_s']:.2f}")  # fmt: skip
    console.print(table)
    console.print(f"throughput {clients} clients / serial: {result['throughput_ratio']:.2f}x; p95 during edits / idle: "
                  f"{result['p95_ratio_during_vs_idle']:.2f}x; edits during the phase: "
                  f"{sum(len(e['committed']) for e in edits)} committed, {sum(len(e['reverted']) for e in edits)} reverted; "
                  f"stale answers {during['stale_answers']}, committed but not answered {during['committed_but_not_answered']}")  # fmt: skip
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
