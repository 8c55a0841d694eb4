"""CLI helpers for the fact intake (registered by `ledger_cmd.register`).

    kmd intake check-policy FILE        validate a policy (errors name file, line and key);
        [--sample FEED [--source ID]]   with a saved feed: what its extraction rules read
    kmd intake keygen KEYFILE           make an Ed25519 signing key, print the key to pin
    kmd intake sign FILE --key KEYFILE  write FILE.sig for a curated JSONL file
    kmd intake poll --policy FILE       poll sources once, then verify (one-shot; the daemon
                                        schedules the same steps)
    kmd intake bench                    the intake benchmark (BENCHMARKS.md, "Intake")
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    intake = typer.Typer(name="intake", help="Fact intake: policies, signing, one-shot polls, benchmark.",
                         no_args_is_help=True)  # fmt: skip
    app.add_typer(intake, name="intake")

    @intake.command("check-policy")
    def check_policy(
        path: Path = typer.Argument(..., help="Policy YAML file."),
        sample: Path | None = typer.Option(None, "--sample", help="A saved RSS/Atom feed: show which entries each "
                                           "extraction rule matches and the claims they give."),
        source: str | None = typer.Option(None, "--source", help="With --sample: the feed source whose rules to use "
                                          "(default: the policy's only feed source)."),
    ) -> None:
        """Validate a policy file; exit 1 and list every problem if it is invalid."""
        from kmd.daemon.policy import PolicyError, load_policy

        try:
            policy = load_policy(path)
        except PolicyError as exc:
            for problem in exc.problems:
                typer.secho(str(problem), fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        typer.echo(
            f"ok: {path} version {policy.version_tag}, {len(policy.sources)} sources, "
            f"{len(policy.relations)} relations, backend {policy.backend}"
        )
        if sample is not None:
            _show_sample(policy, sample, source)

    @intake.command("keygen")
    def keygen(key_file: Path = typer.Argument(..., help="Where to write the private key (PEM, mode 0600).")) -> None:
        """Create an Ed25519 signing key; prints the public key to pin under signing_keys."""
        from kmd.sources.signing import generate_key

        try:
            public = generate_key(key_file)
        except FileExistsError:
            typer.secho(f"{key_file} exists; refusing to overwrite a key", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        typer.echo(f"private key: {key_file}")
        typer.echo(f"public key (pin in the policy under signing_keys): {public}")

    @intake.command("sign")
    def sign(
        path: Path = typer.Argument(..., help="The curated JSONL file."),
        key: Path = typer.Option(..., "--key", help="Private key from `kmd intake keygen` (or OpenSSL)."),
        out: Path | None = typer.Option(None, "--out", help="Signature file (default FILE.sig)."),
    ) -> None:
        """Sign a curated JSONL file (detached Ed25519 signature over its exact bytes)."""
        from kmd.sources.signing import sign_file

        typer.echo(f"wrote {sign_file(path, key, out)}")

    @intake.command("poll")
    def poll(
        policy_path: Path = typer.Option(..., "--policy", help="Policy YAML file."),
        source: list[str] = typer.Option([], "--source", help="Only these source ids (repeatable)."),
        verify: bool = typer.Option(True, "--verify/--no-verify", help="Run verification after polling."),
        encoder: str = typer.Option("minilm", "--encoder", help="minilm (packaged model) or ngram (no model)."),
        db: str | None = typer.Option(None, "--db", envvar="KMD_DB_URL", help="Ledger database URL."),
    ) -> None:
        """Poll the policy's sources once (all, or --source), record claims, then verify."""
        from kmd.daemon.ledger import Ledger
        from kmd.daemon.matching import MiniLMEncoder, NgramEncoder, ObjectMatcher
        from kmd.daemon.policy import PolicyError, load_policy
        from kmd.daemon.verify import Verifier
        from kmd.daemon.intake import intake_for

        try:
            policy = load_policy(policy_path)
        except PolicyError as exc:
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        with Ledger(db) as ledger, intake_for(policy, ledger) as intake:
            for r in intake.poll_many(source or list(intake.sources)):
                state = "refused" if r.refused else ("not modified" if r.not_modified else "ok")
                unmatched = f", {r.unmatched} entries stated no fact" if r.unmatched else ""
                typer.echo(f"{r.source_id}: {state}, {r.new_claims} new claims, {r.duplicates} duplicates{unmatched}")
                for p in r.problems:
                    typer.echo(f"    {p}")
            if verify:
                enc = MiniLMEncoder() if encoder == "minilm" else NgramEncoder()
                matcher = ObjectMatcher(enc, policy.verification.similarity_threshold)
                rep = Verifier(policy, ledger, matcher).run()
                typer.echo(
                    f"verified {rep.claims_seen} claims: {len(rep.new_facts)} new facts "
                    f"({len(rep.quarantined)} quarantined), {rep.waiting} waiting for quorum, "
                    f"{rep.rejected} rejected"
                )

    @intake.command("bench")
    def bench(
        feeds: int = typer.Option(100, "--feeds"),
        entries: int = typer.Option(100, "--entries"),
        workers: int = typer.Option(8, "--workers", help="Concurrent fetches."),
        encoder: str = typer.Option("minilm", "--encoder", help="minilm or ngram."),
        db: str | None = typer.Option(None, "--db", help="Ledger URL (default: a temporary SQLite file)."),
    ) -> None:
        """Serve FEEDS x ENTRIES feeds on 127.0.0.1, ingest them, and verify the claims."""
        from kmd.daemon.bench.intake import run_bench

        import sys

        run_bench(feeds=feeds, entries=entries, workers=workers, encoder=encoder, db=db,
                  command="kmd " + " ".join(sys.argv[1:]))  # fmt: skip


def _show_sample(policy, sample: Path, source_id: str | None) -> None:  # noqa: ANN001 - Policy, imported late
    """What the feed source's extraction rules (and kf: elements) make of a saved feed."""
    from kmd.sources.claims import utcnow
    from kmd.sources.feeds import parse_feed

    feeds = [s for s in policy.sources if s.kind == "feed"]
    if source_id is None and len(feeds) != 1:
        names = ", ".join(s.id for s in feeds) or "none"
        _fail(f"--sample needs --source: the policy has {len(feeds)} feed sources ({names})")
    try:
        source = policy.source(source_id) if source_id else feeds[0]
    except KeyError as exc:
        _fail(str(exc.args[0]))
    if source.kind != "feed":
        _fail(f"source {source.id} is a {source.kind} source; --sample reads feeds")
    try:
        body = sample.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {sample}: {exc}")
    parsed = parse_feed(body, source, policy.limits_for(source), url=str(sample), fetched_at=utcnow())
    rules = source.extract
    typer.echo(f"sample {sample}: {parsed.entries} entries, read as source {source.id} "
               f"({len(rules)} extraction rules)")  # fmt: skip
    for problem in parsed.problems:
        typer.secho(f"  problem: {problem}", fg=typer.colors.YELLOW)
    hits = [0] * len(rules)
    for outcome in parsed.outcomes:
        typer.echo(f"  entry {outcome.ref!r}: {outcome.title!r}")
        for claim in outcome.element_claims:
            typer.echo(f"      kf: elements: {claim.subject} | {claim.relation} | {claim.object}")
        for index, claim in outcome.rule_claims:
            hits[index] += 1
            typer.echo(f"      rule {index + 1} ({rules[index].relation}, {rules[index].field}): "
                       f"{claim.subject} | {claim.relation} | {claim.object}")  # fmt: skip
        if not outcome.matched:
            typer.echo("      no fact (counted, not an error)")
    for index, rule in enumerate(rules):
        typer.echo(f"rule {index + 1} ({rule.relation}, {rule.field}) matched {hits[index]} entries: {rule.pattern}")
    typer.echo(f"{len(parsed.claims)} claims from {parsed.entries - parsed.unmatched} entries; "
               f"{parsed.unmatched} entries stated no fact")  # fmt: skip


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(1)
