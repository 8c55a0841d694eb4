"""The maintenance loop's one writer: facts in, probed edits out, reverts when they hurt.

Every change to the model goes through `Maintainer` under one lock, so two edits never
run at once. Serving never waits for it: requests are answered by `serving`, a fork of
the editor taken whenever it holds exactly the committed edits (after each operation),
so a candidate edit is invisible until committed and a reverted edit disappears at once
(the next snapshot replaces the old one atomically; requests in flight finish on the old
one). The order of each edit makes a crash at any moment recoverable:

    ledger: edit `applied`  ->  editor.apply  ->  probes
        pass: editor state saved atomically (named in the ledger first)  ->  ledger: edit `committed`
        fail: editor.revert                  ->  ledger: revert log (fact blocked)

A revert (a person through the API or `kmd revert`, or the regression check) is written
ahead the same way:

    ledger: edit `reverting` (who, why)  ->  editor.revert  ->  state saved  ->  ledger: `reverted`

On start, `restore()` loads the saved state and reconciles it with the ledger (a
`kmd.daemon.reconcile.Reconciler` it builds for that), finishing or rolling back every
operation in flight (docs/crash-safety.md has the whole matrix):
a requested revert is finished; an edit the ledger applied but the saved state lacks
(crash before the save) is marked reverted and its fact retried; an edit the saved state
holds but the ledger never committed (crash between the save and the commit, so after
its probes passed) is probed again and committed, or reverted if the probes now fail; an
edit the state holds that the ledger does not know is removed. No edit is ever put back
into the model without its probes: a committed edit missing from the state (a lost or
replaced state directory) is re-applied and probed, and reverted if the probes fail.
Every step boundary has a `crash_point` (inert unless `KMD_CRASH_AT` is set).

A fact that supersedes a committed edit runs the same steps with the old edit reverted
in memory first; the commit records both in one ledger transaction. If the new edit is
not committed, the editor is reloaded from the saved state, which still holds the old one.

With serving replicas, `publish` (set by the daemon) copies the saved state where they
can load it; it runs when an operation that saved the state has also recorded it in the
ledger, so replicas only ever see committed states.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from kmd.daemon.batch import Batches
from kmd.daemon.bound_state import load_named
from kmd.daemon.crashpoints import crash_point
from kmd.daemon.edit_request import build_edit_request, editor_key, ledger_id, same_subject_questions, with_edit_id
from kmd.daemon.ledger import FactNotReadyError, LedgerError
from kmd.daemon.locality import LocalityBaseline, LocalityState, read_suite
from kmd.daemon.probes import Prober
from kmd.daemon.reconcile import Reconciler
from kmd.daemon.serving.state import ServedState
from kmd.editors.protocol import EditRequest, Editor
from kmd.editors.registry import get_backend
from kmd.editors.scoring import score_targets
from kmd.editors.state import MANIFEST, StateError, encode_state, reload_editor, write_state

if TYPE_CHECKING:
    from kmd.daemon.ledger import EditRecord, FactRecord, Ledger
    from kmd.daemon.policy import Policy
    from kmd.editors.model import ModelHost


@dataclass
class Stats:
    """Counters exported as Prometheus metrics (no per-edit labels)."""

    edits_committed: int = 0
    edits_reverted: int = 0
    edits_retried: int = 0
    facts_skipped: int = 0
    regression_reverts: int = 0
    last_cycle_seconds: float = 0.0
    last_probe_seconds: float = 0.0
    last_locality: float | None = None
    busy: bool = False  # an edit or revert is in flight
    cycles: int = 0
    errors: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CycleReport:
    committed: tuple[int, ...] = ()
    reverted: tuple[int, ...] = ()
    skipped: tuple[int, ...] = ()
    seconds: float = 0.0


class Maintainer:
    def __init__(
        self,
        host: ModelHost,
        ledger: Ledger,
        policy: Policy,
        state_dir: Path,
        *,
        editor: Editor | None = None,
        suite: list[str] | None = None,
        actor: str = "daemon",
    ) -> None:
        self.host, self.ledger, self.policy = host, ledger, policy
        self.state_dir = Path(state_dir)
        self.editor_dir = self.state_dir / "editor"
        self.actor = actor
        self.lock = threading.RLock()  # the one writer (serving does not take it: see `serving`)
        self.stats = Stats()
        self.editor = editor or get_backend(policy.backend)(host)  # the writer's working editor
        self.served: ServedState | None = None  # what requests are answered with: the committed edits
        self._suite = suite if suite is not None else self._suite_prompts()
        self.prober: Prober | None = None
        self.publish: Callable[[], None] | None = None  # publish the saved state for replicas
        self._unpublished = False  # the saved state changed since the last publish
        self._digest: str | None = None  # the saved state's digest (named in the ledger)
        self._stop = threading.Event()
        self.batches = Batches(self)  # ready facts applied and probed together

    # ----- start-up ---------------------------------------------------------------------------
    def _suite_prompts(self) -> list[str]:
        probes = self.policy.probes
        prompts = read_suite(None) if probes.default_locality_suite else []
        base = Path(self.policy.path).parent if self.policy.path else Path(".")
        for extra in probes.locality_suites:
            prompts += read_suite(extra if Path(extra).is_absolute() else base / extra)
        if not prompts:
            raise ValueError("the policy leaves no locality prompts: enable the default suite or list files")
        return prompts

    def restore(self) -> None:
        """Record the locality baseline, load the saved state, reconcile with the ledger."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # The baseline must be the unedited model's answers: record before loading edits.
        baseline = LocalityBaseline.load_or_record(self.state_dir / "locality-baseline.json", self.host, self._suite)
        prober = Prober(self.host, baseline, self.policy.probes)
        with self.lock:
            if (self.editor_dir / MANIFEST).is_file():
                loaded, self._digest = load_named(self.ledger, self.editor_dir, self.host, remedy=(
                    f"Put back the state kmd saved, or move {self.editor_dir} away: the daemon then re-applies the "
                    "ledger's committed edits, each with its probes"))  # fmt: skip
                if loaded.name != self.editor.name:
                    raise StateError(
                        f"{self.editor_dir} holds {loaded.name} edits but the policy asks for {self.editor.name}; "
                        "revert them with the old backend or move the state away"
                    )
                self.editor = loaded
            routing = prober.use_routing(self.editor, self.state_dir)  # features depend on model + config only
            self.prober = prober  # reconciling re-probes what it finishes
            self._reconcile(prober)
            if routing:  # cheap with features: only reached chunks run
                prober.committed = prober.locality(self.editor)
                self.stats.last_locality = prober.committed.loc
            self._serve_committed()

    def _reconcile(self, prober: Prober) -> None:
        """Bring the restored editor and the ledger back in line (kmd.daemon.reconcile)."""
        reconciler = Reconciler(ledger=self.ledger, policy=self.policy, editor=self.editor, prober=prober,
                                batches=self.batches, save=self.save, measured=self._measured, actor=self.actor,
                                state_dir=self.editor_dir)  # fmt: skip
        reconciler.check_requests()
        # 1. Reverts someone asked for: the request is durable, so finish it.
        self.finish_requested_reverts()
        reconciler.settle()

    def _measured(self, loc: float) -> None:
        self.stats.last_locality = loc

    def save(self) -> None:
        """Save the editor state, named in the ledger first (write-ahead): a crash between
        the two leaves the state saved before, which the ledger named too."""
        state = encode_state(self.editor, self.editor_dir)
        self.ledger.record_state(state.digest, state.edit_ids, actor=self.actor)
        crash_point("state.named")
        write_state(state, self.editor_dir)
        self._digest = state.digest
        self._unpublished = True

    def publish_pending(self, *, force: bool = False) -> None:
        """Publish the saved state if it changed (or always: a new writer's first publish)."""
        with self.lock:
            if (self._unpublished or force) and self.publish is not None:
                self.publish()
                self._unpublished = False

    # ----- serving ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.prober is not None and self.serving is not None

    @property
    def serving(self) -> Editor | None:
        """The snapshot of the committed edits that answers requests."""
        served = self.served
        return served.editor if served is not None else None

    def _serve_committed(self) -> None:
        """Serve what the working editor holds now (call only when that is the committed state,
        which is then also the saved one: its manifest's hash is the state's id)."""
        old = self.serving
        if old is not None and old.edit_ids == self.editor.edit_ids:
            return  # the same edits (a reverted candidate, a failed update reloaded)
        manifest = self.editor_dir / MANIFEST
        version = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
        self.served = ServedState(self.editor.fork(), version)  # one assignment: editor and id together
        if old is not None:
            old.retire()  # its hooks go when the requests still running on it end

    @contextmanager
    def _busy(self) -> Iterator[None]:
        with self.lock:
            self.stats.busy = True
            try:
                yield
                self._serve_committed()  # the operation finished: the editor holds committed edits
                self.publish_pending()  # the ledger now records what the saved state holds
            finally:
                self.stats.busy = False

    # ----- the cycle --------------------------------------------------------------------------
    def apply_ready(self, limit: int = 50, batch: int = 1) -> CycleReport:
        """Turn verified facts into probed, committed edits (or reverted ones). New facts go
        in batches of up to `batch` edits probed together (kmd.daemon.batch), supersessions
        one at a time."""
        started = time.perf_counter()
        outcomes: dict[str, list[int]] = {"committed": [], "reverted": [], "skipped": []}
        self.finish_requested_reverts()  # e.g. from `kmd revert`: before any new edit
        for group in self._groups(self.ledger.ready_facts(limit=limit), batch):
            if self._stop.is_set():
                break
            if len(group) > 1:
                with self._busy():
                    done = self.batches.apply(group)
            else:
                try:
                    outcome, edit_id = self.apply_fact(group[0])
                except FactNotReadyError as exc:  # a person rejected it meanwhile: nothing was changed
                    logger.info("{}: skipped (it changed after this cycle listed it)", exc)
                    continue
                done = [(outcome, edit_id or group[0].id)]
            for outcome, number in done:
                outcomes[outcome].append(number)
        return CycleReport(tuple(outcomes["committed"]), tuple(outcomes["reverted"]), tuple(outcomes["skipped"]),
                           time.perf_counter() - started)  # fmt: skip

    @staticmethod
    def _groups(facts: list[FactRecord], batch: int) -> Iterator[list[FactRecord]]:
        """New facts in batches of up to `batch` (one prompt each: two facts that would edit the
        same prompt go apart), then each supersession alone."""
        new = [f for f in facts if f.supersedes_edit_id is None]
        while new:
            group, later, keys = [], [], set()
            for fact in new:
                if len(group) < batch and (fact.subject, fact.relation) not in keys:
                    group.append(fact)
                    keys.add((fact.subject, fact.relation))
                else:
                    later.append(fact)
            yield group
            new = later
        for fact in facts:
            if fact.supersedes_edit_id is not None:
                yield [fact]

    def apply_fact(self, fact: FactRecord) -> tuple[str, int | None]:
        assert self.prober is not None, "call restore() first"
        request = build_edit_request(fact, self.policy.relation(fact.relation))
        with self._busy():
            if fact.supersedes_edit_id is not None:
                return self._replace(fact, request)
            if self._already_known(request):
                self.ledger.skip_fact(fact.id, actor=self.actor)
                self.stats.facts_skipped += 1
                return "skipped", None
            return self._edit(fact, request)

    def _already_known(self, request: EditRequest) -> bool:
        return score_targets(self.host, self.editor, [(request.prompt, request.target)])[0].accuracy == 1.0

    def _replace(self, fact: FactRecord, request: EditRequest) -> tuple[str, int]:
        """Revert the committed edit `fact` supersedes, then edit `fact`. The ledger records
        the replacement only when the new edit commits; if it does not, the editor goes back
        to its saved state, which still holds the old edit: a failed update loses nothing."""
        old = fact.supersedes_edit_id
        assert old is not None
        held = editor_key(old) in self.editor.edit_ids
        if held:
            self.editor.revert(editor_key(old))  # in memory only: the saved state keeps it until the commit
            self.stats.last_locality = None
        crash_point("supersede.old_reverted")
        outcome = None
        try:
            outcome, edit_id = self._edit(fact, request, supersedes=old)
        finally:  # also when it raised (e.g. the fact was rejected meanwhile)
            if outcome != "committed" and held:
                reload_editor(self.editor, self.editor_dir, digest=self._digest)
                self.stats.last_locality = None  # the model changed back; measure again when needed
                logger.bind(edit_id=editor_key(old)).warning("edit {} kept: the fact superseding it was not committed", old)
        return outcome, edit_id

    def _edit(self, fact: FactRecord, request: EditRequest, supersedes: int | None = None, *,
              retrying: bool = False) -> tuple[str, int]:  # fmt: skip
        """Apply, probe, commit or revert one edit (then once more with the backend's stronger
        overrides if it did not take; `retrying`: only that second attempt, for an edit a
        batch found did not take)."""
        assert self.prober is not None
        attempts = [{}]
        retry = self.editor.stronger_overrides()
        if retry:
            attempts.append(retry)
        earlier = [self.editor.request(i) for i in self.editor.edit_ids]
        loc_before = self.current_locality()
        # Same-subject questions: what they get now, before the edit, is what it must keep.
        questions = same_subject_questions(fact, self.policy, self.policy.probes.same_subject_questions)
        plan = self.prober.plan(self.editor, [request], [questions])
        for number, overrides in enumerate(attempts, 1):
            if retrying and number == 1:
                continue
            config = self.editor.config_dict() | self._relation_options(fact) | overrides
            record = self.ledger.record_edit_applied(
                fact.id, request=request.to_dict(), backend=self.editor.name, backend_config=config,
                policy_version=self.policy.version_tag, actor=self.actor, supersedes_edit_id=supersedes,
                reason="edit applied" if number == 1 else f"retry {number - 1} with {overrides}",
            )  # fmt: skip
            edit_id = editor_key(record.id)
            log = logger.bind(edit_id=edit_id)
            op = "apply" if supersedes is None else "supersede"
            crash_point(f"{op}.recorded")
            apply_started = time.perf_counter()
            try:
                with self.editor.configured(**(self._relation_options(fact) | overrides)):
                    self.editor.apply(with_edit_id(request, record.id))
                crash_point(f"{op}.applied")
            except Exception as exc:  # the editor keeps nothing from a failed apply
                log.exception("edit {} could not be applied", edit_id)
                self.ledger.revert_edit(record.id, reason=f"apply failed: {type(exc).__name__}: {exc}",
                                        probes_before=None, probes_after=None, actor=self.actor)  # fmt: skip
                self.stats.errors += 1
                return "reverted", record.id
            started = time.perf_counter()
            try:
                (report,) = self.prober.check(self.editor, plan, [edit_id], earlier)
            except Exception as exc:  # never keep an edit that was not probed
                log.exception("probing edit {} failed", edit_id)
                self.editor.revert(edit_id)
                self.ledger.revert_edit(record.id, reason=f"probes failed: {type(exc).__name__}: {exc}",
                                        probes_before=None, probes_after=None, actor=self.actor)  # fmt: skip
                self.stats.errors += 1
                return "reverted", record.id
            self.stats.last_probe_seconds = time.perf_counter() - started
            self.stats.last_locality = report.loc
            timings = {"apply_seconds": round(started - apply_started, 3), "probe_seconds": round(self.stats.last_probe_seconds, 3)}
            if report.passed:
                crash_point(f"{op}.probed")
                self.save()
                crash_point("commit.saved" if supersedes is None else "supersede.saved")
                self.ledger.commit_edit(record.id, probes=report.figures() | timings, actor=self.actor,
                                        supersedes_edit_id=supersedes, superseded_probes={"loc": report.loc})  # fmt: skip
                crash_point("commit.recorded" if supersedes is None else "supersede.committed")
                self.prober.committed = report.locality
                self.stats.edits_committed += 1
                log.info("edit {} committed: served rel {} gen {}, rel {:.2f} gen {} loc {:.4f} ({} locality prompts run)",
                         edit_id, report.served_rel, report.served_gen, report.rel, report.gen, report.loc,
                         report.loc_rows_run)  # fmt: skip
                return "committed", record.id
            self.editor.revert(edit_id)
            after = {"loc": self.prober.locality(self.editor).loc}  # the committed state's, unless superseding
            self.stats.last_locality = after["loc"]
            retry_next = not report.took and not report.harmful and number < len(attempts)
            self.ledger.revert_edit(
                record.id, reason=report.reason, probes_before=report.figures() | timings | {"loc_before": loc_before},
                probes_after=after, actor=self.actor, retry=retry_next,
            )  # fmt: skip
            self.stats.edits_reverted += 1
            log.warning("edit {} reverted: {}", edit_id, report.reason)
            if not retry_next:
                return "reverted", record.id
            self.stats.edits_retried += 1
        return "reverted", record.id

    def current_locality(self) -> float:
        """Locality of the model as it is now (cached from the last probe that measured it)."""
        if self.stats.last_locality is None:
            self.stats.last_locality = self.prober.locality(self.editor).loc
        return self.stats.last_locality

    def committed_locality(self, state: LocalityState) -> float:
        """Keep `state` as the committed edits' locality (the editor holds them now)."""
        self.prober.committed = state
        self.stats.last_locality = state.loc
        return state.loc

    def counted(self, outcome: str, count: int = 1) -> None:
        """Count edits that were committed, reverted, retried, skipped, or hit an error."""
        name = {"committed": "edits_committed", "reverted": "edits_reverted", "retried": "edits_retried",
                "skipped": "facts_skipped", "error": "errors"}[outcome]  # fmt: skip
        setattr(self.stats, name, getattr(self.stats, name) + count)

    def retry_stronger(self, fact: FactRecord) -> tuple[str, int]:
        """Edit `fact` once more, alone, with the backend's stronger overrides (a batch found
        that its edit did not take)."""
        return self._edit(fact, build_edit_request(fact, self.policy.relation(fact.relation)), retrying=True)

    def _relation_options(self, fact: FactRecord) -> dict[str, Any]:
        return dict(self.policy.relation(fact.relation).editor_options)

    # ----- people and the API -----------------------------------------------------------------
    def revert(self, edit_id: int, *, reason: str, actor: str) -> dict[str, Any]:
        """Revert one committed edit now (a person, through the API): the request is in the
        ledger before the model changes, so a crash half-way is finished at restart."""
        assert self.prober is not None
        with self._busy():
            try:
                edit = self.ledger.edit(edit_id)
            except LedgerError:
                raise KeyError(f"no edit {edit_id}") from None
            if edit.status not in ("committed", "reverting"):
                raise KeyError(f"edit {edit_id} is not applied (it is {edit.status})")
            self.ledger.request_revert(edit_id, reason=reason, actor=actor)
            crash_point("revert.requested")
            return self._finish_revert(edit_id, reason=reason, actor=actor)

    def finish_requested_reverts(self) -> list[int]:
        """Carry out the reverts the ledger says were requested (`kmd revert`, or a crash
        after an API revert was recorded). Returns the edit ids reverted."""
        done = []
        requests = self.ledger.revert_requests()
        if not requests:
            return done
        with self._busy():
            for edit, actor in requests:
                self._finish_revert(edit.id, reason=edit.status_reason, actor=actor)
                done.append(edit.id)
        return done

    def _finish_revert(self, edit_id: int, *, reason: str, actor: str) -> dict[str, Any]:
        """The steps after the request: model, saved state, then the ledger's revert log."""
        assert self.prober is not None
        key = editor_key(edit_id)
        before = {"loc": self.current_locality()}
        if key in self.editor.edit_ids:
            self.editor.revert(key)
            crash_point("revert.applied")
            self.save()
            crash_point("revert.saved")
        after = {"loc": self.committed_locality(self.prober.locality(self.editor))}
        revert = self.ledger.revert_edit(edit_id, reason=reason, probes_before=before, probes_after=after, actor=actor)
        crash_point("revert.recorded")
        self.stats.edits_reverted += 1
        return {"edit_id": edit_id, "revert_id": revert.id, "before": before, "after": after}

    # ----- periodic regression ------------------------------------------------------------------
    def regression_check(self) -> list[int]:
        """Re-probe locality; if degraded, revert the most recent edits until it recovers."""
        assert self.prober is not None
        reverted: list[int] = []
        with self._busy():
            threshold = self.prober.thresholds.min_loc
            loc = self.committed_locality(self.prober.locality(self.editor, full=True))  # the safety net: every chunk
            while loc < threshold and self.editor.edit_ids:
                newest = ledger_id(self.editor.edit_ids[-1])
                reason = f"periodic regression: loc {loc:.4f} < {threshold}"
                self.ledger.request_revert(newest, reason=reason, actor=self.actor)  # written ahead, like a person's
                self._finish_revert(newest, reason=reason, actor=self.actor)
                self.stats.regression_reverts += 1
                reverted.append(newest)
                loc = self.stats.last_locality
            self.stats.last_locality = loc
        if reverted:
            logger.warning("regression check reverted edits {}", reverted)
        return reverted

    def stop(self) -> None:
        """Ask a running cycle to stop after the edit in flight."""
        self._stop.set()

    def committed_edits(self) -> list[EditRecord]:
        return self.ledger.committed_edits()
