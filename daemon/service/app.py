"""The daemon's wiring: one `Daemon` object holding settings, policy, ledger, model and
the maintainer (writer) or the replica, plus the intake and the verifier.

Model changes all go through the `Maintainer` lock: never two edits at once. Generation
does not take that lock: every generated token comes from one serving engine
(`kmd.daemon.serving`) on the committed edits' snapshot (`served_state`), so the service
stays ready and answering while an edit is computed.

Scale-out (`cluster:` settings): a `writer` process first becomes the single writer
(`kmd.daemon.leadership`: always on SQLite, an advisory lock on PostgreSQL; until then it
waits as a standby, `/readyz` 503), then restores and runs the jobs, and publishes every
committed state to `cluster.publish_dir`. A `replica` process never edits: it serves the
published state (`kmd.daemon.replication`) and reloads it when the ledger names a new one.
The HTTP API sees the daemon only through `kmd.daemon.surface.Service`.
"""

from __future__ import annotations

import functools
import ipaddress
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from kmd.common.values import utcnow
from kmd.daemon.edit_request import editor_key
from kmd.daemon.leadership import Leadership, holder_name, leadership_for
from kmd.daemon.ledger import Ledger
from kmd.daemon.policy import load_policy
from kmd.daemon.service.jobs import Jobs, run_logged
from kmd.daemon.service.lifecycle import ApiServer, Lifetime
from kmd.daemon.settings import DaemonSettings
from kmd.daemon.surface import Figures, NotServingError, ReplicaError
from kmd.sources.claims import Claim

if TYPE_CHECKING:
    from kmd.daemon.maintainer import Maintainer
    from kmd.daemon.replication import Replica
    from kmd.daemon.serving import ServedState, ServingEngine
    from kmd.daemon.surface import Reverter
    from kmd.daemon.verify import Verifier
    from kmd.editors.model import ModelHost
    from kmd.sources.intake import Intake

__all__ = ["CycleSummary", "Daemon", "FlaggedLedgerError", "InsecureConfigError", "check_api_exposure"]


class InsecureConfigError(RuntimeError):
    """The API would listen beyond loopback with no token (and `--insecure` was not given)."""


class FlaggedLedgerError(RuntimeError):
    """The ledger fails `verify-chain`: the daemon does not start as its writer."""


def check_api_exposure(settings: DaemonSettings, token: str | None, *, insecure: bool = False) -> None:
    """Refuse an API reachable from other machines without a token; warn whenever there is none."""
    api = settings.api
    if not api.enabled or token:
        return
    where = f"{api.host}:{api.port}"
    if not _is_loopback(api.host) and not insecure:
        raise InsecureConfigError(
            f"the API would listen on {where} with no token configured: anyone who can reach it could generate "
            f"and read the ledger. Set ${api.token_env} (or api.token_file), listen on 127.0.0.1, or pass --insecure"
        )
    logger.warning("no API token is configured (${} or api.token_file): writes are refused and reads and generation "
                   "are open to anyone who can reach {}", api.token_env, where)  # fmt: skip


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or a wildcard address: assume it is reachable from elsewhere


@dataclass(frozen=True)
class CycleSummary:
    polled: int
    new_claims: int
    new_facts: int
    committed: tuple[int, ...]
    reverted: tuple[int, ...]
    skipped: tuple[int, ...]
    regression_reverts: tuple[int, ...]
    seconds: float


class Daemon:
    """The running service: settings, policy, ledger, model, maintainer or replica, intake and
    verifier. It owns the API server (`ApiServer`) and, once loaded as the writer, its `jobs`
    (`Jobs`); `serve_forever` hands the process to a `Lifetime`, which drives it through the
    narrow `Process` interface. It implements `kmd.daemon.surface.Service` for the HTTP API."""

    def __init__(self, settings: DaemonSettings, *, host: ModelHost | None = None, insecure: bool = False) -> None:
        from kmd.editors.registry import get_backend

        self.settings = settings
        self.api_token = settings.api_token()
        check_api_exposure(settings, self.api_token, insecure=insecure)
        self.policy = load_policy(settings.policy_path)
        get_backend(self.policy.backend)  # fail now, with a suggestion, on an unknown backend
        settings.state_path.mkdir(parents=True, exist_ok=True)  # where a PostgreSQL ledger's head file is kept
        self.ledger = Ledger(settings.database_url, head_file=settings.head_file_path)
        self.maintainer: Maintainer | None = None
        self.replica: Replica | None = None
        self.holder = holder_name()
        self._leadership: Leadership | None = None
        self._host = host
        self.intake: Intake | None = None
        self.verifier: Verifier | None = None
        self.jobs: Jobs | None = None  # the writer's, once loaded
        self.api_server = ApiServer(settings.api)
        self.stopping = threading.Event()  # set on SIGTERM/SIGINT or a lost writer role
        self._engine: ServingEngine | None = None
        self._engine_lock = threading.Lock()

    # ----- readiness ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.readiness()[0]

    def readiness(self) -> tuple[bool, str]:
        if self.stopping.is_set():
            return False, "stopping"
        if self.settings.cluster.role == "replica":
            return self.replica.readiness() if self.replica else (False, "starting: loading the model")
        if self._leadership is not None and self.ledger.writer_term is None:
            return False, "standby: another process is the writer"
        if self.maintainer is None or not self.maintainer.ready:
            return False, "starting: loading the model and restoring state"
        # An edit in flight does not make the service unready: requests are answered by
        # the committed edits' snapshot meanwhile.
        return True, "ok"

    # ----- start-up -----------------------------------------------------------------------------
    def load_model(self) -> ModelHost:
        from kmd.editors.model import ModelHost, ModelSettings

        if self._host is None:
            m = self.settings.model
            self._host = ModelHost.load(
                ModelSettings(model=m.model, device=m.device, dtype=m.dtype, use_chat_template=m.use_chat_template,
                              profile=m.profile, offline=m.offline)  # fmt: skip
            )
        return self._host

    def try_become_writer(self) -> bool:
        """Take the writer role if it is free; then every ledger write checks we still hold it."""
        cluster = self.settings.cluster
        if cluster.role != "writer":
            raise RuntimeError("a replica never becomes the writer")
        if self._leadership is None:
            self._leadership = leadership_for(self.settings.database_url, key=cluster.lock_key, keepalive=cluster.keepalive)
        if not self._leadership.try_acquire():
            return False
        if self.ledger.writer_term is None:
            self.ledger.begin_writer_term(self.holder)
        return True

    def load(self) -> Maintainer:
        """Become the writer, load the model, restore and reconcile the editor state, build intake and verifier."""
        from kmd.daemon.maintainer import Maintainer
        from kmd.daemon.matching import MiniLMEncoder, ObjectMatcher
        from kmd.daemon.verify import Verifier
        from kmd.daemon.intake import intake_for

        if not self.try_become_writer():
            raise RuntimeError("another process is the writer (it holds the PostgreSQL writer lock)")
        self._check_chain()
        maintainer = Maintainer(self.load_model(), self.ledger, self.policy, self.settings.state_path)
        publish_dir = self.settings.publish_path
        if publish_dir is not None:
            self._adopt_closest_state(maintainer.editor_dir, publish_dir)
            maintainer.publish = functools.partial(self._publish, maintainer.editor_dir)
        maintainer.restore()
        if publish_dir is not None:  # a new writer term: publish what it serves, once
            if not (maintainer.editor_dir / "manifest.json").is_file():
                maintainer.save()
            maintainer.publish_pending(force=True)
        self.intake = intake_for(self.policy, self.ledger)
        matcher = ObjectMatcher(MiniLMEncoder(), self.policy.verification.similarity_threshold)
        self.verifier = Verifier(self.policy, self.ledger, matcher)
        self.maintainer = maintainer
        self.jobs = Jobs(self.settings.schedule, self.policy.sources, maintainer, self.intake, self.verifier,
                         self.stopping)  # fmt: skip
        return maintainer

    def _check_chain(self) -> None:
        """A writer appends to the chain: never to one that `verify-chain` rejects (altered,
        or rolled back behind its head file), which would bury the evidence under new events."""
        from kmd.daemon.replication import published_head, published_head_problem

        report = self.ledger.verify_chain()
        if report.ok and self.settings.publish_path is not None:  # and the head published for replicas
            if (problem := published_head_problem(self.ledger, self.settings.publish_path)) is not None:
                head_file = str(published_head(self.settings.publish_path).path)
                report = replace(report, ok=False, problems=(problem,), head_file=head_file)
        if report.ok:
            return
        from sqlalchemy.engine import make_url

        url = make_url(self.ledger.url).render_as_string(hide_password=True)
        hint = f" --head-file {report.head_file}" if report.head_file else ""
        raise FlaggedLedgerError(
            f"the ledger fails verify-chain ({len(report.problems)} problem(s); the first: {report.problems[0]}): "
            f"refusing to start as its writer. Inspect it with `kmd verify-chain --db '{url}'{hint}`; restore the "
            "database from a copy that verifies"
            + (f", or, if the database was replaced on purpose, move the head file {report.head_file} away" if hint else "")
        )

    def _adopt_closest_state(self, editor_dir: Path, publish_dir: Path) -> None:
        """Taking over: start from the local or the published state, whichever is nearer the ledger."""
        from kmd.daemon.bound_state import named_digest
        from kmd.daemon.replication import adopt_state, closest_state, published_dir

        published = self.ledger.published_state()
        if published is None:
            return
        candidate = published_dir(publish_dir, published.version)
        if named_digest(self.ledger, candidate) is None:  # not a state the writer saved: never adopted
            logger.error("published state {} is not one the ledger recorded; not adopting it", published.version[:12])
            return
        committed = {editor_key(e.id) for e in self.ledger.committed_edits()}
        if closest_state([candidate, editor_dir], committed) == candidate:
            logger.info("restoring from published state {} (nearer the ledger than {})", published.version[:12], editor_dir)
            adopt_state(candidate, editor_dir)

    def _publish(self, editor_dir: Path) -> None:
        from kmd.daemon.replication import publish_state, published_head

        version, edit_ids = publish_state(editor_dir, self.settings.publish_path, keep=self.settings.cluster.keep_published)
        self.ledger.publish_state(version, edit_ids, holder=self.holder)
        # Beside the states: replicas check the chain still holds it (kmd.daemon.replication).
        published_head(self.settings.publish_path).advance(self.ledger.chain_head())
        logger.info("published state {} ({} edits)", version[:12], len(edit_ids))

    def load_replica(self) -> Replica:
        """A serving replica: the model, then the published state (see `Replica.sync`)."""
        from kmd.daemon.replication import Replica

        cluster = self.settings.cluster
        self.replica = Replica(self.load_model(), self.ledger, self.policy, self.settings.publish_path,
                               smoke_edits=cluster.smoke_edits)  # fmt: skip
        self.replica.sync()
        return self.replica

    # ----- the work -----------------------------------------------------------------------------
    def ingest(self, *, all_sources: bool = False) -> tuple[int, int, int]:
        """Poll sources (all, or those due) and verify; returns (polled, new claims, new facts)."""
        assert self.intake is not None and self.verifier is not None
        reports = self.intake.poll_many(list(self.intake.sources)) if all_sources else self.intake.poll_due()
        for report in reports:
            for problem in report.problems:
                logger.warning("source {}: {}", report.source_id, problem)
        verified = self.verifier.run()
        return len(reports), sum(r.new_claims for r in reports), len(verified.new_facts)

    def cycle(self, *, all_sources: bool = True, regression: bool = True) -> CycleSummary:
        """One full cycle: poll, verify, apply verified facts, regression probe."""
        assert self.maintainer is not None
        started = time.perf_counter()
        polled, claims, facts = self.ingest(all_sources=all_sources)
        report = self.maintainer.apply_ready(limit=self.settings.schedule.max_edits_per_cycle,
                                             batch=self.settings.schedule.edit_batch)
        regressed = self.maintainer.regression_check() if regression else []
        self.maintainer.stats.cycles += 1
        self.maintainer.stats.last_cycle_seconds = time.perf_counter() - started
        return CycleSummary(polled, claims, facts, report.committed, report.reverted, report.skipped,
                            tuple(regressed), time.perf_counter() - started)  # fmt: skip

    def generate(self, prompt: str, max_new_tokens: int) -> str:
        """Greedy text through the served edits (the serving engine, as /v1/generate)."""
        from kmd.daemon.serving import GenerationRequest

        engine = self.engine()
        stream = engine.submit(GenerationRequest(engine.host.encode(engine.host.format_prompt(prompt)), max_new_tokens))
        return engine.host.tokenizer.decode(stream.result(), skip_special_tokens=True)

    def _serving(self) -> Maintainer | Replica | None:
        """Who serves in this process: a replica, or the writer's maintainer (None before start-up).
        The one place that decides; everything served (state, model, edits) comes from it."""
        return self.replica if self.replica is not None else self.maintainer

    def served_state(self) -> ServedState:
        """What answers requests now: the writer's committed snapshot or the replica's loaded state."""
        source = self._serving()
        served = source.served if source is not None else None
        if served is None:
            raise NotServingError("starting: model and state are not loaded yet")
        return served

    def engine(self) -> ServingEngine:
        """The serving engine (made on first use): every generated token comes from it."""
        from kmd.daemon.auth import ANONYMOUS_CALLER, TOKEN_CALLER
        from kmd.daemon.serving import Budget, Scheduler, ServingEngine

        self.served_state()  # NotServingError before start-up finished
        with self._engine_lock:
            if self._engine is None:
                api = self.settings.api
                # in priority order: token holders' waiting requests start first
                budgets = {caller: Budget(b.concurrent, b.queued, b.max_tokens)
                           for caller, b in ((TOKEN_CALLER, api.budgets.token), (ANONYMOUS_CALLER, api.budgets.anonymous))}  # fmt: skip
                host = self._serving().host
                scheduler = Scheduler(budgets, max_batch=api.max_batch, prefill_tokens=api.max_prefill_tokens)
                self._engine = ServingEngine(host, self.served_state, scheduler)
            return self._engine

    def served_model_name(self) -> str | None:
        source = self._serving()
        return source.host.identity.name if source is not None else None

    def active_edit_ids(self) -> list[str]:
        source = self._serving()
        editor = source.editor if source is not None else None
        return list(editor.edit_ids) if editor is not None else []

    def reverter(self) -> Reverter:
        if self.settings.cluster.role == "replica":
            raise ReplicaError("this is a serving replica; send edits and reverts to the writer")
        if self.maintainer is None:
            raise NotServingError("starting: model and state are not loaded yet")
        return self.maintainer

    def figures(self) -> Figures:
        stats = self.maintainer.stats if self.maintainer is not None else None
        counted = {name: float(getattr(stats, name, 0) if stats else 0) for name in (
            "edits_committed", "edits_reverted", "edits_retried", "facts_skipped", "regression_reverts", "cycles",
            "errors")}  # fmt: skip
        return Figures(
            **counted,
            feed_entries_unmatched=float(self.intake.entries_unmatched if self.intake else 0),
            state_loads=float(self.replica.loads if self.replica else 0),
            ready=1.0 if self.ready else 0.0,
            writer=1.0 if self.maintainer is not None and self.ledger.writer_term is not None else 0.0,
            edit_in_flight=1.0 if stats and stats.busy else 0.0,
            edits_active=float(len(self.active_edit_ids())),
            locality=stats.last_locality if stats and stats.last_locality is not None else float("nan"),
            probe_seconds=stats.last_probe_seconds if stats else 0.0,
            cycle_seconds=stats.last_cycle_seconds if stats else 0.0,
            ledger_head_seq=float(self.ledger.chain_head().seq),
        )

    def submit_fact(self, subject: str, relation: str, obj: str, source_id: str | None, url: str) -> dict[str, Any]:
        """Record a fact submitted through the API as a claim of the policy's `api` source;
        verified in the next cycle (and, by default, held for a person's approval).

        Raises PermissionError when the policy has no such source or `source_id` names a
        source of another kind; ValueError when the source may not assert the relation."""
        source = self.policy.api_source(source_id)
        if relation not in source.relations:
            raise ValueError(f"source {source.id!r} may not assert relation {relation!r} (allowed: {list(source.relations)})")
        claim = Claim(subject=subject, relation=relation, object=obj, source_id=source.id,
                      url=url or "api:", observed_at=utcnow(), ref=f"api:{uuid.uuid4().hex}")  # fmt: skip
        result = self.ledger.record_claims([claim], policy_version=self.policy.version_tag, channel="api", actor="api")
        note = "recorded; verified by the next edit cycle"
        note += ", then held for a person's approval (kmd approve)" if source.requires_approval else ", then applied"
        return {"claim_ids": list(result.new_ids), "duplicates": result.duplicates, "source_id": source.id, "note": note}

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        if self.intake is not None:
            self.intake.close()
        self.ledger.close()

    # ----- the API server and the process's lifetime (`Lifetime` drives the `Process` methods) --
    def start_api(self) -> None:
        from kmd.daemon.api import create_app

        self.api_server.start(create_app(self))

    @property
    def api_url(self) -> str | None:
        """The API's base URL once it listens (the real port when the settings say 0)."""
        return self.api_server.url

    def stop_api(self) -> None:
        """Stop the API server started by `start_api` (a no-op when none runs)."""
        self.api_server.stop()

    def run_once(self) -> CycleSummary:
        if self.settings.cluster.role != "writer":
            raise RuntimeError("--once runs a maintenance cycle: only a writer does that")
        self.load()
        try:
            return self.cycle(all_sources=True)
        finally:
            self.close()

    def serve_forever(self) -> int:
        """Serve until SIGTERM/SIGINT (0) or a lost writer role (EXIT_NOT_WRITER): see `Lifetime`."""
        return Lifetime(self).serve_forever()

    def start_writer(self) -> None:
        maintainer = self.load()
        assert self.jobs is not None
        self.jobs.start()
        logger.info("kmd ready (writer, term {}): {} edits applied, backend {}", self.ledger.writer_term,
                    len(maintainer.editor.edit_ids), maintainer.editor.name)  # fmt: skip

    def keep_serving(self) -> bool:
        if self.replica is not None:
            if not self.stopping.is_set():
                run_logged("replica sync", self.replica.sync)
            return True
        return self._leadership.check()

    def healthy(self) -> bool:
        if self.jobs is None or not self.jobs.scheduled:  # a standby or a replica: the lifetime's loop is its work
            return self.api_server.alive
        return self.api_server.alive and self.jobs.running

    def stop_work(self) -> None:
        if self.maintainer is not None:
            self.maintainer.stop()

    def shutdown(self) -> None:
        if self.jobs is not None:
            self.jobs.shutdown()  # the edit in flight finishes (commit or revert)
        self.api_server.stop()
        if self._leadership is not None:
            self._leadership.release()
        self.close()
        logger.info("kmd stopped cleanly")
