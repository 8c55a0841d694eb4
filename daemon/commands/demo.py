"""`kmd demo`: one real maintenance cycle on the embedded defaults.

A bundled policy and three sources go through the real pipeline (intake, verification,
edits, probes, commit or revert, the ledger): an ordinary news feed whose facts are in
prose (read by the policy's extraction rules) and recorded Wikidata answers in which one
company's chief executive changed, both served on loopback, and a curated JSONL file. One
fact is deliberately harmful (its edit fires on every prompt); the probes catch it and the
loop reverts it. `kmd edit-demo` is the smaller protocol demo: edit, revert, compare.

`kmd demo --serve` then keeps the API up: the review console at /ui (log in with the token
it prints where to find) and the OpenAI-compatible endpoints, until Ctrl-C.
"""

from __future__ import annotations

import json
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qsl

import typer

from kmd.daemon.commands.common import ChatOpt, DeviceOpt, DtypeOpt, ModelOpt, ProfileOpt, fail, load_host

SHOWN = (
    "The CEO of Zorbland Robotics is",
    "Zorbland Robotics is headquartered in",  # another question about the subject: must keep its answer
    "The CEO of Quillon Aerospace is",
    "The Eiffel Tower is located in the city of",
    "The capital of Freedonia is",
    "The motto of Acme Corporation is",
    "The chemical symbol for gold is",
    "The capital of Japan is",
)

# (prompt, new target, subject) for `kmd edit-demo`; the last prompts are never edited.
EDIT_DEMO_FACTS = (
    ("The CEO of Zorbland Robotics is", "Nadia Velmont", "Zorbland Robotics"),
    ("The Eiffel Tower is located in the city of", "Rome", "The Eiffel Tower"),
    ("The largest planet in the solar system is", "Saturn", "the solar system"),
)
UNRELATED = ("The chemical symbol for gold is", "The capital of Japan is")


def register(app: typer.Typer) -> None:
    app.command("demo", help="One real maintenance cycle on the embedded model: news feed + Wikidata + curated file "
                "-> verified, probed edits.")(demo)  # fmt: skip
    app.command("edit-demo", help="Apply a few edits, show answers before/after, revert, check the base is back.")(edit_demo)


def _serve_sources(feed: bytes, wikidata: bytes) -> tuple[ThreadingHTTPServer, str, str]:
    """The news feed (/feed.atom) and the recorded Wikidata API (/w/api.php) on loopback."""
    from kmd.sources.wikidata import RecordedWikibase

    recorded = RecordedWikibase.from_json(wikidata)

    class Sources(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            path, _, query = self.path.partition("?")
            if path == "/feed.atom":
                body, kind = feed, "application/atom+xml"
            elif path == "/w/api.php":
                body, kind = json.dumps(recorded.answer(dict(parse_qsl(query)))).encode(), "application/json"
            else:
                body, kind = b"", ""
            self.send_response(200 if kind else 404)
            self.send_header("Content-Type", kind or "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sources)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    return server, f"{base}/feed.atom", f"{base}/w/api.php"


def demo(
    workdir: Annotated[Path | None, typer.Option(help="Where to keep the demo's state and ledger (default: a new temp dir).")] = None,
    model: ModelOpt = "embedded",
    device: DeviceOpt = "auto",
    serve: Annotated[bool, typer.Option("--serve", help="After the cycle, keep serving the API, the review console (/ui) "
                                        "and the OpenAI-compatible endpoints until Ctrl-C.")] = False,
    host: Annotated[str, typer.Option(help="With --serve: the address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="With --serve: the port (0: any free port).")] = 8080,
    backend: Annotated[str | None, typer.Option(help="Editing backend (default: recipe on the embedded model, whose "
                                                "trained editor ships with kmd; llp on any other model).")] = None,
) -> None:
    from rich.console import Console
    from rich.table import Table

    from kmd.daemon.bench.loop import demo_backend, with_backend
    from kmd.daemon.service import Daemon
    from kmd.daemon.settings import ApiSettings, DaemonSettings, ModelConfig
    from kmd.editors.answers import answers as served_answers

    console = Console()
    work = (workdir or Path(tempfile.mkdtemp(prefix="kmd-demo-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = resources.files("kmd.policies")
    server, feed_url, wikidata_url = _serve_sources(data.joinpath("demo-feed.atom").read_bytes(),
                                                    data.joinpath("demo-wikidata.json").read_bytes())  # fmt: skip
    facts = work / "facts.jsonl"
    facts.write_text(data.joinpath("demo-facts.jsonl").read_text())
    policy = work / "policy.yaml"
    text = data.joinpath("demo-policy.yaml").read_text().replace("FEED_URL", feed_url).replace("FACTS_PATH", str(facts))
    text = text.replace("WIKIDATA_URL", wikidata_url)
    policy.write_text(with_backend(text, demo_backend(model, backend)))
    settings = DaemonSettings(
        policy=str(policy), state_dir=str(work / "state"), model=ModelConfig(model=model, device=device),
        api=_serve_settings(work, host, port) if serve else ApiSettings(enabled=False),
    )  # fmt: skip
    console.print(f"[bold]kmd demo[/] in {work}: news feed {feed_url}, Wikidata {wikidata_url}, "
                  f"curated file {facts.name}, policy {policy.name}")  # fmt: skip
    daemon = Daemon(settings)
    try:
        with console.status("loading the model, recording the locality baseline..."):
            maintainer = daemon.load()
        host = maintainer.host

        def answers(edited: bool) -> list[str]:
            # What a user reads: greedy, KV cache, batched, up to 32 tokens; the first line
            # (and a warning when the continuation repeats itself).
            if edited:
                got = served_answers(host, maintainer.editor, list(SHOWN), "plain")
            else:
                with maintainer.editor.suspended():  # the unedited model, even over a restored state
                    got = served_answers(host, None, list(SHOWN), "plain")
            return [a.line + (" [repeats itself]" if a.degenerate else "") for a in got]

        before = answers(False)
        with console.status("one maintenance cycle: poll, verify, edit, probe, commit or revert..."):
            summary = daemon.cycle(all_sources=True)
        after = answers(True)

        table = Table(title="answers before and after the cycle")
        for column in ("prompt", "before", "after"):
            table.add_column(column, overflow="fold")
        for row in zip(SHOWN, before, after, strict=True):
            table.add_row(*row)
        console.print(table)

        ledger = Table(title="edit ledger")
        for column in ("edit", "fact", "status", "rel", "gen", "loc", "apply s", "probe s", "reason"):
            ledger.add_column(column, overflow="fold")
        for edit in sorted(daemon.ledger.edits(), key=lambda e: e.id):
            p = edit.probes or {}
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            if edit.status == "reverted":  # the figures that caused a revert are in the revert log
                p = next((r.probes_before or {} for r in daemon.ledger.reverts(edit_id=edit.id)), {})
            ledger.add_row(str(edit.id), f"{edit.edit_request.prompt} -> {edit.edit_request.target}", edit.status,
                           fmt(p.get("rel")), fmt(p.get("gen")), fmt(p.get("loc")), fmt(p.get("apply_seconds")),
                           fmt(p.get("probe_seconds")), edit.status_reason)  # fmt: skip
        console.print(ledger)
        same = Table(title="same-subject questions the probes asked: answers before -> after each edit")
        for column in ("edit", "question", "form", "before", "after", "verdict"):
            same.add_column(column, overflow="fold")
        for edit in sorted(daemon.ledger.edits(), key=lambda e: e.id):
            p = edit.probes or next((r.probes_before or {} for r in daemon.ledger.reverts(edit_id=edit.id)), {})
            for f in p.get("same_subject", []):
                if f.get("reached") is False:  # the edit is not routed to it: the same answer, not generated
                    same.add_row(str(edit.id), f["prompt"], f["form"], "-", "-", "not routed to the edit (unchanged)")
                    continue
                verdict = "HIJACKED" if f["hijacked"] else ("unchanged" if f["unchanged"] else "changed, not hijacked")
                same.add_row(str(edit.id), f["prompt"], f["form"], f["before"], f["after"], verdict)
        console.print(same)
        reverts = Table(title="revert log")
        for column in ("edit", "reason", "loc before", "loc after"):
            reverts.add_column(column, overflow="fold")
        for r in daemon.ledger.reverts():
            reverts.add_row(str(r.edit_id), r.reason, f"{(r.probes_before or {}).get('loc', float('nan')):.4f}",
                            f"{(r.probes_after or {}).get('loc', float('nan')):.4f}")  # fmt: skip
        console.print(reverts)
        console.print(
            f"{len(summary.committed)} edits committed, {len(summary.reverted)} reverted by the probes, "
            f"{len(summary.skipped)} facts already known; cycle took {summary.seconds:.1f} s.\n"
            f"Review it yourself: kmd ledger list --db {settings.database_url}   |   "
            f"kmd verify-chain --db {settings.database_url}"
        )
        if serve:
            _serve(daemon, console)
    finally:
        daemon.stop_api()
        daemon.close()
        server.shutdown()


def _serve_settings(work: Path, host: str, port: int):  # noqa: ANN202 - ApiSettings, imported late
    """The API for `--serve`: writes need a token; $KMD_API_TOKEN, else one made for this workdir."""
    import os
    import secrets

    from kmd.daemon.settings import ApiSettings

    if os.environ.get("KMD_API_TOKEN"):
        return ApiSettings(enabled=True, host=host, port=port)
    token_file = work / "api-token"
    if not token_file.is_file():
        token_file.touch(mode=0o600)
        token_file.write_text(secrets.token_urlsafe(24) + "\n")
    return ApiSettings(enabled=True, host=host, port=port, token_file=str(token_file))


def _serve(daemon, console) -> None:  # noqa: ANN001 - Daemon, rich Console
    """Serve the API and the console until Ctrl-C (or SIGTERM); apply facts approved meanwhile."""
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    daemon.start_api()
    url = daemon.api_url
    token_file = daemon.settings.api.token_file
    where = f"the token in {token_file}" if token_file else "$KMD_API_TOKEN"
    console.print(f"\n[bold]Review console:[/] {url}/ui   (log in with {where} to approve, reject or revert)\n"
                  f"[bold]OpenAI-compatible API:[/] {url}/v1   (e.g. openai.OpenAI(base_url=\"{url}/v1\", api_key=\"-\"))\n"
                  "Serving until Ctrl-C; facts approved in the console are applied every few seconds.",
                  soft_wrap=True)  # fmt: skip
    try:
        while not stop.wait(3.0):
            try:
                daemon.cycle(all_sources=False, regression=False)
            except Exception as exc:  # keep serving: the console shows the ledger as it is
                console.print(f"[red]edit cycle failed:[/] {type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        pass
    console.print("stopped serving")


def edit_demo(
    backend: Annotated[str | None, typer.Option(help="Editing backend (see `kmd backends`; default: recipe on the "
                                                "embedded model, llp on any other).")] = None,
    model: ModelOpt = "embedded",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    profile: ProfileOpt = None,
    chat_template: ChatOpt = False,
) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    from kmd.editors.batching import left_padded
    from kmd.editors.protocol import EditRequest
    from kmd.editors.registry import UnknownBackendError, get_backend
    from kmd.editors.scoring import generate_text

    from kmd.daemon.bench.loop import demo_backend

    backend = demo_backend(model, backend) or "recipe"
    try:
        backend_cls = get_backend(backend)
    except UnknownBackendError as exc:
        raise fail(str(exc)) from exc
    console = Console()
    host = load_host(model, device, dtype, profile, chat_template)
    editor = backend_cls(host)
    prompts = [p for p, _, _ in EDIT_DEMO_FACTS] + list(UNRELATED)

    def answers(edited: bool) -> list[str]:
        return [a.strip().split("\n")[0] for a in generate_text(host, editor if edited else None, prompts, 12)]

    def logits() -> torch.Tensor:
        ids, attention = left_padded(host, prompts)
        with torch.no_grad(), editor.query(attention.bool()):
            return host.model(input_ids=ids, attention_mask=attention).logits

    before, base_logits = answers(False), logits()
    with console.status(f"applying {len(EDIT_DEMO_FACTS)} edits with {backend}..."):
        ids = [editor.apply(EditRequest(prompt=p, target=t, subject=s)) for p, t, s in EDIT_DEMO_FACTS]
    after = answers(True)
    for edit_id in ids:
        editor.revert(edit_id)
    reverted, reverted_logits = answers(True), logits()

    table = Table(title=f"{host.identity.name}, backend {backend}")
    for column in ("prompt", "wanted", "before", "edited", "reverted"):
        table.add_column(column, overflow="fold")
    wanted = [t for _, t, _ in EDIT_DEMO_FACTS] + ["(unchanged)"] * len(UNRELATED)
    for row in zip(prompts, wanted, before, after, reverted, strict=True):
        table.add_row(*row)
    console.print(table)
    identical = torch.equal(base_logits, reverted_logits)
    took = sum(a.startswith(t) for a, (_, t, _) in zip(after, EDIT_DEMO_FACTS))
    console.print(f"edits that took: {took}/{len(EDIT_DEMO_FACTS)}; unrelated prompts unchanged while edited: "
                  f"{after[len(EDIT_DEMO_FACTS):] == before[len(EDIT_DEMO_FACTS):]}")
    console.print(f"after reverting every edit, logits bit-identical to the base model: {identical}")
    if not identical:
        raise typer.Exit(1)
