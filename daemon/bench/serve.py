"""`kmd bench-serve`: the OpenAI-compatible endpoints under load, idle and while editing, against
plain transformers `generate` of the unedited model in the same run.

The real daemon on the demo policy (embedded model and RECIPE by default) serves its API
on loopback; clients are the official `openai` client (chat completions when the model
has a chat template, else completions) in a process of their own. In order:

1. reference: the unedited model through transformers `generate` (no edit yet, so no
   hook is installed), one request at a time and in batches of `--clients`;
2. what edits cost: `--edits` edits (1000) applied straight to an editor of the policy's
   backend and served by the engine in process to `--clients` callers, against the
   unedited model (transformers in batches, and the engine) on the same prompts;
3. serial: one client, streamed answers (time to first token, per-token latency);
4. `--clients` clients (16), streamed, idle;
5. the same while an edit loop runs (a feed on loopback gains one entry at a time and
   the daemon runs a cycle for each: verify, apply, probe, commit); half the prompts ask
   for the facts being edited, and every answer names the state that answered
   (`system_fingerprint`), so an answer from a candidate edit ("stale") is caught;
6. flood: `--flood` (80) anonymous clients ask non-streamed completions (the official
   client, retrying a 429 after its Retry-After), and an operator reverts an edit
   meanwhile: how long the revert (and /healthz) take.

Pin it for timings: `OMP_NUM_THREADS=1 taskset -c 0 kmd bench-serve` (the clients' process
shares the core); the load average is printed with the figures.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from kmd.daemon.bench.clients import Endpoint, Phase, engine_phase, flood, in_own_process, openai_phase, reference_phase
from kmd.daemon.bench.loop import COMPANY, FIRST, LAST, demo_backend, demo_workdir
from kmd.daemon.commands.common import DeviceOpt, ModelOpt

GENERIC = ("What is the weather like in spring?", "Name a good book to read.", "How do I learn a new language?",
           "At what temperature does water boil?", "Which is the largest ocean on Earth?", "What makes a good breakfast?",
           "When does the train to the city leave?", "What should we plant in the garden?")  # fmt: skip
SUFFIXES = ("Robotics", "Foods", "Labs", "Shipping")
TOKEN_ENV = "KMD_BENCH_SERVE_TOKEN"

# The targets (embedded model, one core): ratios from one run.
TARGETS = {"throughput_clients_over_serial": 4.0, "ttft_p95_during_edits_over_idle": 1.5, "revert_under_flood_s": 2.0,
           "edited_cost_over_unedited": 1.3}  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("bench-serve", help="OpenAI endpoints under load (serial, concurrent, during edits, a flood) "
                                    "against plain transformers generate.")(bench_serve)  # fmt: skip


def _fact(i: int) -> tuple[str, str]:
    subject = f"{COMPANY[i % len(COMPANY)]} {SUFFIXES[i // len(COMPANY) % len(SUFFIXES)]}"
    return subject, f"{FIRST[i % len(FIRST)]} {LAST[(i * 7) % len(LAST)]}"


def _question(subject: str) -> str:
    return f"Who is the CEO of {subject}?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _edited_serving(host: Any, backend: str, edits: int, clients: int, requests: int, max_tokens: int,
                    chat: bool) -> dict[str, Phase]:  # fmt: skip
    """What edits cost at serving: `edits` edits applied straight to an editor (no probes),
    served by the engine in process to `clients` callers, against the unedited model on the
    same prompts (transformers `generate` in batches, and the engine). Half the prompts ask
    for edited facts. Each comparison runs twice: as served (each answer ends where it ends;
    an edited answer ends after its target's clause, so the two sides do different work),
    and at equal work ("equal": every request writes `max_tokens`, the end of sequence
    ignored, as vLLM's throughput benchmark does)."""
    from kmd.daemon.serving import Budget, Scheduler, ServedState, ServingEngine
    from kmd.editors.protocol import EditRequest
    from kmd.editors.registry import get_backend

    facts = [(f"{COMPANY[i % len(COMPANY)]} Unit {i}", f"{FIRST[i % len(FIRST)]} {LAST[(i * 3) % len(LAST)]}")
             for i in range(edits)]  # fmt: skip
    asked = [_question(s) for s, _ in facts[:: max(1, edits // 8)][:8]]
    prompts = [p for pair in zip(asked, GENERIC) for p in pair] or list(GENERIC)
    modes = {"": False, "equal ": True}  # phase key prefix -> ignore_eos
    phases = {}
    for prefix, ignore_eos in modes.items():
        phases[f"{prefix}edits reference"] = reference_phase(f"unedited, {clients} at once{', equal work' if ignore_eos else ''}",
                                                             host, prompts, requests, clients, max_tokens, chat=chat,
                                                             ignore_eos=ignore_eos)  # fmt: skip

    def serve(name: str, editor: Any, ignore_eos: bool) -> Phase:
        engine = ServingEngine(host, lambda: ServedState(editor, None),
                               Scheduler({"token": Budget(clients, 4 * requests, 256)}, max_batch=clients))  # fmt: skip
        try:
            engine_phase("warm-up", engine, prompts, clients, clients, max_tokens, chat=chat)  # first retrievals fill caches
            return engine_phase(f"{name}{', equal work' if ignore_eos else ''}", engine, prompts, requests, clients,
                                max_tokens, chat=chat, ignore_eos=ignore_eos)  # fmt: skip
        finally:
            engine.close()

    for prefix, ignore_eos in modes.items():
        phases[f"{prefix}edits unedited engine"] = serve(f"unedited, {clients} clients", None, ignore_eos)
    editor = get_backend(backend)(host)
    with editor.suspended():  # the working copy never acts; its snapshot serves (acting on its own rows only)
        for subject, person in facts:
            editor.apply(EditRequest(prompt=f"The CEO of {subject} is", target=person, subject=subject))
        served = editor.fork()
        try:
            for prefix, ignore_eos in modes.items():
                phases[f"{prefix}edits served"] = serve(f"{edits} edits, {clients} clients", served, ignore_eos)
        finally:
            served.retire()
            editor.revert_all()  # no hook of this editor stays on the model
    return phases


def bench_serve(
    clients: Annotated[int, typer.Option(min=1, max=256, help="Concurrent clients.")] = 16,
    requests: Annotated[int, typer.Option(min=1, help="Requests per concurrent phase.")] = 64,
    serial_requests: Annotated[int, typer.Option(min=1, help="Requests of the one-client phases.")] = 16,
    max_tokens: Annotated[int, typer.Option(min=1, max=256, help="max_tokens of every request.")] = 32,
    flood_clients: Annotated[int, typer.Option("--flood", min=0, help="Anonymous clients flooding while an operator reverts (0: skip).")] = 80,
    edits: Annotated[int, typer.Option(min=0, help="Edits applied for the edited-serving cost (0: skip).")] = 1000,
    model: ModelOpt = "embedded",
    device: DeviceOpt = "auto",
    backend: Annotated[str | None, typer.Option(help="Override the demo policy's backend.")] = None,
    probe: Annotated[list[str] | None, typer.Option(help="Override a probes setting of the demo policy: KEY=VALUE (YAML value); repeatable.")] = None,
    workdir: Annotated[Path | None, typer.Option(help="State and ledger directory (default: a new temp dir).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the figures as JSON here.")] = None,
) -> None:
    import torch
    from rich.console import Console

    from kmd.daemon.service import Daemon
    from kmd.daemon.service.jobs import yield_to_serving
    from kmd.daemon.settings import ApiSettings, Budget, Budgets, DaemonSettings, ModelConfig
    from kmd.editors.answers import answer_line, hits

    console = Console(width=140)
    load_before = os.getloadavg()
    work, feed, _ = demo_workdir(workdir, "kmd-bench-serve-", demo_backend(model, backend), probe)
    token = secrets.token_urlsafe(24)
    os.environ[TOKEN_ENV] = token
    port = _free_port()
    budgets = Budgets(token=Budget(concurrent=clients, queued=4 * clients, max_tokens=256))
    settings = DaemonSettings(policy=str(work / "policy.yaml"), state_dir=str(work / "state"),
                              model=ModelConfig(model=model, device=device),
                              api=ApiSettings(enabled=True, port=port, token_env=TOKEN_ENV, max_batch=clients, budgets=budgets))  # fmt: skip
    daemon = Daemon(settings)
    base_url = f"http://127.0.0.1:{port}/v1"
    phases: dict[str, Phase] = {}
    figures: dict[str, Any] = {}
    states: dict[str, set[str]] = {}  # fingerprint -> subjects whose edits that state holds
    try:
        maintainer = daemon.load()
        host = maintainer.host
        chat = host.chat.available
        name = host.identity.name
        endpoint = Endpoint(base_url, token, name, chat, max_tokens)

        def ask(phase: str, n_clients: int, n_requests: int, prompts: list[str]) -> Phase:
            return in_own_process(openai_phase, endpoint, phase, n_clients, n_requests, prompts, True).get()

        console.print("reference: transformers generate, unedited ...")
        phases["reference serial"] = reference_phase("serial", host, GENERIC, serial_requests, 1, max_tokens, chat=chat)
        phases["reference concurrent"] = reference_phase(f"{clients} at once", host, GENERIC, requests, clients,
                                                         max_tokens, chat=chat)  # fmt: skip
        if edits:
            console.print(f"{edits} edits served by the engine in process ...")
            phases |= _edited_serving(host, maintainer.editor.name, edits, clients, requests, max_tokens, chat)

        daemon.start_api()
        feed.add(0, *_fact(0))  # a first committed edit (it also pays the backend's one-off costs)
        daemon.cycle(all_sources=True, regression=False)

        def record_state() -> None:
            served = daemon.served_state()
            held = {maintainer.editor.request(e).subject for e in served.editor.edit_ids} if served.editor else set()
            states[f"kmd-{served.version[:12]}" if served.version else "kmd-base"] = {s for s in held if s}

        record_state()
        ask("warm-up", 1, 2, list(GENERIC))
        console.print("serial ...")
        phases["serial"] = ask("serial", 1, serial_requests, list(GENERIC))
        console.print(f"{clients} clients, idle ...")
        phases["concurrent"] = ask(f"{clients} clients", clients, requests, list(GENERIC))
        console.print(f"{clients} clients, during an edit loop ...")
        done, edit_log = threading.Event(), []

        def edit_loop() -> None:
            yield_to_serving()  # as the daemon's edit job does
            i = 1
            while not done.is_set():
                feed.add(i, *_fact(i))
                t0 = time.perf_counter()
                summary = daemon.cycle(all_sources=True, regression=False)
                record_state()
                edit_log.append({"entry": i, "committed": list(summary.committed), "reverted": list(summary.reverted),
                                 "seconds": time.perf_counter() - t0})  # fmt: skip
                i += 1

        loop = threading.Thread(target=edit_loop, name="edit-loop")
        asked = [_question(_fact(i)[0]) for i in range(1, 9)]
        loop.start()
        try:
            mixed = [p for pair in zip(asked, GENERIC) for p in pair]
            phases["during edits"] = ask(f"{clients} clients, edit loop", clients, requests, mixed)
        finally:
            done.set()
            loop.join()
        targets = {_question(s): t for s, t in (_fact(i) for i in range(1, 9))}
        stale = unknown = 0
        for answer in phases["during edits"].answers:
            if not answer.ok or answer.prompt not in targets:
                continue
            held = states.get(answer.fingerprint or "")
            subject = answer.prompt[len("Who is the CEO of "):-1]
            unknown += held is None
            stale += held is not None and subject not in held and hits(answer_line(answer.text), targets[answer.prompt])
        figures["edits_during"] = edit_log
        figures["stale_answers"], figures["unknown_states"] = stale, unknown

        if flood_clients:
            console.print(f"flood: {flood_clients} anonymous clients, and an operator's revert ...")
            figures["flood"] = _flood(daemon, endpoint, flood_clients)
    finally:
        daemon.stopping.set()
        daemon.stop_api()
        daemon.close()
        feed.server.shutdown()

    summaries = {key: p.summary() | {"name": p.name} for key, p in phases.items()}
    ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731
    figures |= {
        "model": name, "backend": maintainer.editor.name, "device": str(host.device), "max_tokens": max_tokens,
        "torch_threads": torch.get_num_threads(), "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "edits_applied": edits,
        "phases": summaries,
        "throughput_clients_over_serial": ratio(summaries["concurrent"]["tokens_per_s"], summaries["serial"]["tokens_per_s"]),
        "ttft_p95_during_edits_over_idle": ratio(summaries["during edits"]["ttft_p95_s"], summaries["concurrent"]["ttft_p95_s"]),
        "serial_over_reference": ratio(summaries["serial"]["tokens_per_s"], summaries["reference serial"]["tokens_per_s"]),
        "concurrent_over_reference": ratio(summaries["concurrent"]["tokens_per_s"], summaries["reference concurrent"]["tokens_per_s"]),
        "edited_cost_over_unedited": ratio(summaries["edits reference"]["tokens_per_s"], summaries["edits served"]["tokens_per_s"])
        if edits else None,
        "edited_cost_over_unedited_engine": ratio(summaries["edits unedited engine"]["tokens_per_s"],
                                                  summaries["edits served"]["tokens_per_s"]) if edits else None,
        "edited_cost_over_unedited_equal_work": ratio(summaries["equal edits reference"]["tokens_per_s"],
                                                      summaries["equal edits served"]["tokens_per_s"]) if edits else None,
        "edited_cost_over_unedited_engine_equal_work": ratio(summaries["equal edits unedited engine"]["tokens_per_s"],
                                                             summaries["equal edits served"]["tokens_per_s"]) if edits else None,
        "failed_requests": sum(summaries[k]["failed"] for k in ("serial", "concurrent", "during edits")),
    }  # fmt: skip
    _print(console, figures, max_tokens)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(figures, indent=2) + "\n")


def _flood(daemon: Any, endpoint: Endpoint, clients: int) -> dict[str, Any]:
    """`clients` anonymous clients (the official client: it retries a 429 after its
    Retry-After) ask without pause; meanwhile an operator reverts the newest committed edit
    and reads /healthz. How long both take, and how the flood was answered."""
    import httpx

    anonymous = Endpoint(endpoint.base_url, "anonymous", endpoint.model, endpoint.chat, 64, max_retries=2)
    engine = daemon.engine()
    before = engine.stats.requests
    flooding = in_own_process(flood, anonymous, clients, 15.0, list(GENERIC))
    deadline = time.monotonic() + 60
    while engine.stats.requests - before < min(clients, 8) and time.monotonic() < deadline:  # the flood is on
        time.sleep(0.1)
    time.sleep(1.0)
    committed = daemon.ledger.committed_edits()
    root = endpoint.base_url.removesuffix("/v1")
    revert_status = revert_s = None
    with httpx.Client(timeout=120) as http:
        started = time.perf_counter()
        health = http.get(f"{root}/healthz")
        healthz = time.perf_counter() - started
        if committed:  # the newest committed edit
            started = time.perf_counter()
            revert = http.post(f"{root}/v1/edits/{committed[-1].id}/revert", json={"reason": "bench-serve: revert under a flood"},
                               headers={"Authorization": f"Bearer {endpoint.api_key}"})  # fmt: skip
            revert_s, revert_status = time.perf_counter() - started, revert.status_code
    return {"clients": clients, "revert_status": revert_status, "revert_s": revert_s, "healthz_status": health.status_code,
            "healthz_s": healthz, **flooding.get()}  # fmt: skip


def _print(console: Any, figures: dict[str, Any], max_tokens: int) -> None:
    from rich.table import Table

    fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    table = Table(title=f"bench-serve: {figures['model']}, {figures['backend']}, max_tokens {max_tokens}, "
                        f"{figures['torch_threads']} torch thread(s), cores {figures['cpu_affinity']}")  # fmt: skip
    for column in ("phase", "path", "clients", "requests", "failed", "tokens/s", "TTFT p50 s", "TTFT p95 s",
                   "per-token p50 ms", "per-token p95 ms"):
        table.add_column(column)
    for p in figures["phases"].values():
        table.add_row(p["name"], p["path"], str(p["clients"]), str(p["requests"]), str(p["failed"]), fmt(p["tokens_per_s"], 1),
                      fmt(p["ttft_p50_s"]), fmt(p["ttft_p95_s"]),
                      fmt(p["per_token_p50_s"] and p["per_token_p50_s"] * 1000, 0),
                      fmt(p["per_token_p95_s"] and p["per_token_p95_s"] * 1000, 0))  # fmt: skip
    console.print(table)
    load = lambda a: ", ".join(f"{x:.2f}" for x in a)  # noqa: E731
    console.print(f"load average before {load(figures['load_average_before'])}, after {load(figures['load_average_after'])}")
    flood = figures.get("flood")
    checks = [
        ("throughput, clients / serial", figures["throughput_clients_over_serial"], ">=", TARGETS["throughput_clients_over_serial"]),
        ("TTFT p95, during edits / idle", figures["ttft_p95_during_edits_over_idle"], "<=", TARGETS["ttft_p95_during_edits_over_idle"]),
        ("revert under the flood, s", flood["revert_s"] if flood else None, "<=", TARGETS["revert_under_flood_s"]),
        ("edited serving cost / unedited, as served", figures["edited_cost_over_unedited"], "<=", TARGETS["edited_cost_over_unedited"]),
        ("edited serving cost / unedited, equal work", figures["edited_cost_over_unedited_equal_work"], "<=",
         TARGETS["edited_cost_over_unedited"]),
        ("failed requests", figures["failed_requests"], "<=", 0),
        ("answers from a candidate edit", figures["stale_answers"], "<=", 0),
    ]  # fmt: skip
    for label, value, op, target in checks:
        met = value is not None and (value >= target if op == ">=" else value <= target)
        verdict = "-" if value is None else ("met" if met else "MISSED")
        console.print(f"  {label}: {fmt(value)} (target {op} {target}): {verdict}")
    console.print(f"  kmd / transformers tokens/s: serial {fmt(figures['serial_over_reference'])}, "
                  f"concurrent {fmt(figures['concurrent_over_reference'])}; {figures['edits_applied']} edits cost "
                  f"{fmt(figures['edited_cost_over_unedited_engine'])}x the engine on the unedited model as served, "
                  f"{fmt(figures['edited_cost_over_unedited_engine_equal_work'])}x at equal work")
    if flood:
        console.print(f"  flood: revert {flood['revert_status']} in {fmt(flood['revert_s'])} s, /healthz in "
                      f"{flood['healthz_s'] * 1000:.0f} ms; {flood['answered']} answered, {flood['refused_429']} "
                      f"refused with 429, {flood['other_errors']} other errors")  # fmt: skip
    edits = figures.get("edits_during") or []
    console.print(f"  edit loop during the phase: {sum(len(e['committed']) for e in edits)} committed, "
                  f"{sum(len(e['reverted']) for e in edits)} reverted; unknown states {figures['unknown_states']}")
