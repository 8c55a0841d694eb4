"""CLI for people reviewing the ledger.

    kmd ledger list [--kind facts|edits|claims] [--status S]   what the daemon knows and did
    kmd ledger show ID                                          one fact (12, f12), edit (e3), claim (c5)
    kmd reverts                                                 the revert log
    kmd approve ID / kmd reject ID                              decide a quarantined fact
    kmd revert ID                                               ask for a committed edit to be reverted
    kmd verify-chain [--expect-head HASH]                       check the ledger for tampering

Every command takes `--db URL` (default `$KMD_DB_URL`, else the SQLite file under
`$KMD_STATE_DIR`, see `kmd.daemon.db.default_db_url`) and `--json`.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from kmd.daemon.ledger import Ledger

DbOption = typer.Option(None, "--db", envvar="KMD_DB_URL", help="Ledger database URL (SQLite file by default).")
JsonOption = typer.Option(False, "--json", help="Print JSON instead of a table.")


def _open(db: str | None, head_file: Path | None = None) -> Ledger:
    """The ledger, keeping its chain head in its head file (`--head-file`, else next to a
    SQLite file or in `$KMD_STATE_DIR`: where the daemon keeps it)."""
    from kmd.daemon.db import default_db_url, default_head_file, default_state_dir
    from kmd.daemon.ledger import Ledger

    url = db or default_db_url()
    return Ledger(url, head_file=head_file or default_head_file(url, default_state_dir()))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        from kmd.sources.claims import iso

        return iso(value)
    return value


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(_plain(value), indent=2, ensure_ascii=False))


def _when(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S")


def _short(text: str, n: int = 48) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _console():  # noqa: ANN202
    from rich.console import Console

    return Console()


def _fail(message: str, code: int = 1) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# ASCII digits, bounded: int() of thousands of digits raises, and \d matches other scripts.
_ID_RE = re.compile(r"(fact|edit|claim|revert|f|e|c|r)?:?([0-9]{1,40})")
_ID_KINDS = {"f": "fact", "e": "edit", "c": "claim", "r": "revert"}


def _parse_id(ref: str) -> tuple[str, int]:
    """'12' / 'f12' / 'fact:12' -> ('fact', 12); 'e3' edit; 'c5' claim; 'r2' revert."""
    m = _ID_RE.fullmatch(ref.strip().lower())
    if not m:
        _fail(f"not an id: {ref!r} (use 12 or f12 for a fact, e3 for an edit, c5 for a claim)", 2)
    prefix = m.group(1) or "f"
    return _ID_KINDS.get(prefix, prefix), int(m.group(2))


def register(app: typer.Typer) -> None:
    ledger_app = typer.Typer(name="ledger", help="Review claims, facts and edits in the ledger.", no_args_is_help=True)
    app.add_typer(ledger_app, name="ledger")

    @ledger_app.command("list")
    def list_cmd(
        kind: str = typer.Option("facts", "--kind", "-k", help="facts, edits or claims."),
        status: str | None = typer.Option(None, "--status", "-s", help="Only this status (e.g. quarantined)."),
        limit: int = typer.Option(50, "--limit", "-n", help="Newest N rows."),
        db: str | None = DbOption,
        as_json: bool = JsonOption,
    ) -> None:
        """List facts (default), edits or claims, newest first."""
        from rich.table import Table

        with _open(db) as ledger:
            if kind == "facts":
                rows = ledger.facts(status=status, limit=limit)
            elif kind == "edits":
                rows = ledger.edits(status=status, limit=limit, newest_first=True)
            elif kind == "claims":
                rows = ledger.claims(status=status, limit=limit, newest_first=True)
            else:
                _fail(f"--kind must be facts, edits or claims, not {kind!r}", 2)
            counts = ledger.counts()
        if as_json:
            _print_json({"kind": kind, "counts": counts.get(kind, {}), "rows": rows})
            return
        table = Table(title=f"{kind} ({', '.join(f'{k}: {v}' for k, v in sorted(counts.get(kind, {}).items())) or 'none'})")
        if kind == "facts":
            for col in ("id", "status", "subject", "relation", "object", "verified", "claims", "note"):
                table.add_column(col)
            for f in rows:
                note = f"supersedes f{f.supersedes_fact_id}" if f.supersedes_fact_id else _short(f.status_reason, 40)
                table.add_row(f"f{f.id}", f.status, _short(f.subject, 30), f.relation, _short(f.object, 30),
                              _when(f.verified_at), str(len(f.claim_ids)), note)  # fmt: skip
        elif kind == "edits":
            for col in ("id", "fact", "status", "backend", "target", "sources", "created", "reason"):
                table.add_column(col)
            for e in rows:
                table.add_row(f"e{e.id}", f"f{e.fact_id}", e.status, e.backend, _short(e.edit_request.target, 30),
                              ", ".join(e.sources), _when(e.created_at), _short(e.status_reason, 40))  # fmt: skip
        else:
            for col in ("id", "status", "source", "subject", "relation", "object", "observed", "reason"):
                table.add_column(col)
            for c in rows:
                table.add_row(f"c{c.id}", c.status, c.source_id, _short(c.subject, 24), c.relation, _short(c.object, 24),
                              _when(c.observed_at), _short(c.status_reason, 32))  # fmt: skip
        _console().print(table)

    @ledger_app.command("show")
    def show_cmd(
        ref: str = typer.Argument(..., metavar="ID", help="12 or f12 (fact), e3 (edit), c5 (claim), r2 (revert)."),
        db: str | None = DbOption,
        as_json: bool = JsonOption,
    ) -> None:
        """Everything about one fact, edit or claim: provenance, related rows, events."""
        from kmd.daemon.ledger import LedgerError

        kind, number = _parse_id(ref)
        try:
            with _open(db) as ledger:
                if kind == "fact":
                    record = ledger.fact(number)
                    related = {"claims": ledger.claims(fact_id=number) or [ledger.claim(i) for i in record.claim_ids],
                               "edits": ledger.edits(fact_id=number)}  # fmt: skip
                elif kind == "edit":
                    record = ledger.edit(number)
                    related = {"fact": ledger.fact(record.fact_id), "reverts": ledger.reverts(edit_id=number)}
                elif kind == "claim":
                    record = ledger.claim(number)
                    related = {}
                else:
                    matches = [r for r in ledger.reverts() if r.id == number]
                    if not matches:
                        raise LedgerError(f"no revert {number}")
                    record, related = matches[0], {}
                events = ledger.events(entity=kind, entity_id=number)
        except LedgerError as exc:
            _fail(str(exc))
        if as_json:
            _print_json({"kind": kind, "record": record, **related, "events": events})
            return
        from rich.table import Table

        console = _console()
        table = Table(title=f"{kind} {number}", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value")
        for key, value in _plain(record).items():
            table.add_row(key, json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else str(value))
        console.print(table)
        for name, rows in related.items():
            rows = rows if isinstance(rows, list) else [rows]
            if not rows:
                continue
            sub = Table(title=name)
            keys = ("id", "status", "source_id", "object", "backend", "reason", "status_reason")
            present = [k for k in keys if hasattr(rows[0], k)]
            for k in present:
                sub.add_column(k)
            for r in rows:
                sub.add_row(*[_short(str(getattr(r, k)), 48) for k in present])
            console.print(sub)
        ev = Table(title="events")
        for col in ("seq", "time", "kind", "actor", "reason"):
            ev.add_column(col)
        for e in events:
            ev.add_row(str(e.seq), _when(e.ts), e.kind, e.actor, _short(e.reason, 60))
        console.print(ev)

    @app.command("reverts")
    def reverts_cmd(
        limit: int = typer.Option(50, "--limit", "-n"),
        db: str | None = DbOption,
        as_json: bool = JsonOption,
    ) -> None:
        """The revert log: edits removed from the model, why, and the probe figures."""
        from rich.table import Table

        with _open(db) as ledger:
            rows = ledger.reverts(limit=limit)
        if as_json:
            _print_json(rows)
            return
        table = Table(title=f"reverts ({len(rows)})")
        for col in ("id", "edit", "when", "actor", "reason", "probes before", "probes after"):
            table.add_column(col)
        for r in rows:
            table.add_row(f"r{r.id}", f"e{r.edit_id}", _when(r.reverted_at), r.actor, _short(r.reason, 40),
                          _short(json.dumps(r.probes_before), 40), _short(json.dumps(r.probes_after), 40))  # fmt: skip
        _console().print(table)

    def _decide(ref: str, approve: bool, reason: str | None, actor: str | None, db: str | None, as_json: bool) -> None:
        from kmd.daemon.ledger import LedgerError

        kind, number = _parse_id(ref)
        if kind != "fact":
            _fail("approve/reject take a fact id (12 or f12)", 2)
        who = actor or getpass.getuser()
        try:
            with _open(db) as ledger:
                if approve:
                    fact = ledger.approve(number, actor=who, reason=reason or "approved")
                else:
                    fact = ledger.reject(number, actor=who, reason=reason or "rejected")
        except LedgerError as exc:
            _fail(str(exc))
        if as_json:
            _print_json(fact)
        else:
            typer.echo(f"fact f{fact.id} ({fact.subject} {fact.relation} -> {fact.object}) is now {fact.status} [by {who}]")

    @app.command("approve")
    def approve_cmd(
        ref: str = typer.Argument(..., metavar="ID", help="A quarantined (or blocked) fact id."),
        reason: str | None = typer.Option(None, "--reason", "-m", help="Why; recorded in the ledger."),
        actor: str | None = typer.Option(None, "--as", help="Who approves (default: your user name)."),
        db: str | None = DbOption,
        as_json: bool = JsonOption,
    ) -> None:
        """Approve a quarantined fact so it can become an edit (or release a blocked one)."""
        _decide(ref, True, reason, actor, db, as_json)

    @app.command("reject")
    def reject_cmd(
        ref: str = typer.Argument(..., metavar="ID", help="A fact id that is not yet edited."),
        reason: str | None = typer.Option(None, "--reason", "-m", help="Why; recorded in the ledger."),
        actor: str | None = typer.Option(None, "--as", help="Who rejects (default: your user name)."),
        db: str | None = DbOption,
        as_json: bool = JsonOption,
    ) -> None:
        """Reject a fact: it never becomes an edit."""
        _decide(ref, False, reason, actor, db, as_json)

    @app.command("revert")
    def revert_cmd(
        ref: str = typer.Argument(..., metavar="ID", help="A committed edit id (3 or e3)."),
        reason: str | None = typer.Option(None, "--reason", "-m", help="Why; recorded in the ledger and the revert log."),
        actor: str | None = typer.Option(None, "--as", help="Who asks (default: your user name)."),
        db: str | None = DbOption,
        as_json: bool = JsonOption,
    ) -> None:
        """Ask for a committed edit to be reverted: recorded in the ledger now, carried out by
        the daemon at its next edit cycle (or at its next start). `POST /v1/edits/ID/revert`
        does it at once."""
        from kmd.daemon.ledger import LedgerError

        kind, number = _parse_id(ref if ref[:1].isalpha() else f"e{ref}")
        if kind != "edit":
            _fail("revert takes an edit id (3 or e3)", 2)
        who = actor or getpass.getuser()
        try:
            with _open(db) as ledger:
                edit = ledger.request_revert(number, reason=reason or f"reverted by {who}", actor=who)
        except LedgerError as exc:
            _fail(str(exc))
        if as_json:
            _print_json(edit)
        else:
            typer.echo(f"edit e{edit.id} is now {edit.status}: the daemon reverts it at its next edit cycle [by {who}]")

    @app.command("verify-chain")
    def verify_chain_cmd(
        expect_head: str | None = typer.Option(None, "--expect-head", help="Head hash recorded elsewhere earlier."),
        head_file: Path | None = typer.Option(None, "--head-file", help="The chain head file to compare (default: "
                                              "next to a SQLite ledger, else $KMD_STATE_DIR/chain-head.json)."),  # fmt: skip
        db: str | None = DbOption,
        as_json: bool = JsonOption,
    ) -> None:
        """Check the event chain and every ledger row against it, and that the chain still
        holds the head recorded in the head file (a rollback of its tail); exit 1 on any problem."""
        with _open(db, head_file) as ledger:
            report = ledger.verify_chain(expect_head=expect_head)
        if as_json:
            _print_json(report)
        elif report.ok:
            typer.secho(f"ok: {report.events} events, head {report.head_seq} {report.head_hash}", fg=typer.colors.GREEN)
        else:
            typer.secho(f"TAMPERING OR CORRUPTION: {len(report.problems)} problem(s) in {report.events} events", fg=typer.colors.RED)
            for p in report.problems:
                typer.echo(f"  - {p}")
        if not as_json:
            if report.head_file is None:
                typer.echo("no head file for this database: pass --head-file, or record the head elsewhere and "
                           "pass it back with --expect-head")  # fmt: skip
            elif report.head_file_seq is None:
                typer.echo(f"no head file at {report.head_file} yet: nothing to compare the head with")
            else:
                typer.echo(f"head file {report.head_file}: seq {report.head_file_seq}")
        if not report.ok:
            raise typer.Exit(1)
