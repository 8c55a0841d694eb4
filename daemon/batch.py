"""Bursts: many ready facts committed in a few model passes instead of one probe each.

An election or a season's transfers make hundreds of facts ready at once. The maintainer
(`Maintainer.apply_ready`) gives the new facts among them (not supersessions) to
`Batches.apply`, which runs them as one batch, written ahead like a single edit:

    ledger: each edit `applied`  ->  probe planned (before the edits)  ->  editor.apply each
      ->  probes of all of them together, and bisection  ->  culprits reverted in memory
      ->  ledger: each culprit's revert log  ->  state saved with the others (named first)
      ->  ledger: the others `committed`, each with its own figures, in one transaction

`settle` probes the candidates together (kmd.daemon.probes: one batched decode of every
served and same-subject row, one locality probe, one check of earlier edits). When that
fails, the culprits are found by bisection, and an edit is reverted only when adding it
alone to a state that passed fails (as if it had come last, one at a time):
- an edit whose own rows fail (its served answers or teacher-forced scores miss, or it
  hijacks a same-subject question) is a suspect: the others are settled first, then the
  suspects on top of them. Usually the suspect is the culprit and that is the one extra
  probe; but its answers may have missed because another edit of the batch took its
  prompt, and then it passes once that one is out. When every edit of a state failed its
  own rows, each is tried alone on top of what is kept so far: n probes for n suspects,
  where halving would take up to 2n - 1 when most of them are culprits (a burst whose
  paraphrases the backend misses);
- a shared failure (locality, earlier edits) is bisected: the first half is settled on
  top of what is kept so far, then the second half on top of that.
Every sub-state is a fork of the editor with the other candidates reverted (reverting is
exact), and a state probed again generates only rows whose route tokens changed
(kmd.daemon.probe_rows), so a bisection step costs far less than the first probe. The
state committed is always one that a probe passed.

Each edit keeps its own ledger events, figures and revert log; a culprit that did not
take is tried once more alone with the backend's stronger overrides (the single path),
as a single edit would be. A crash at any step leaves edits the ledger applied and the
saved state lacks (rolled back and retried at restart) or edits it holds (probed again
together, `roll_forward`, and committed or reverted): docs/crash-safety.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from loguru import logger

from kmd.daemon.crashpoints import crash_point
from kmd.daemon.edit_request import build_edit_request, editor_key, same_subject_questions, with_edit_id
from kmd.daemon.ledger import FactNotReadyError
from kmd.editors.scoring import score_targets

if TYPE_CHECKING:
    from kmd.daemon.ledger import EditRecord, FactRecord, Ledger
    from kmd.daemon.locality import LocalityState
    from kmd.daemon.policy import Policy
    from kmd.daemon.probes import ProbePlan, ProbeReport, Prober
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import EditRequest, Editor

__all__ = ["BatchOwner", "Batches", "Settlement", "settle"]

Outcome = tuple[str, int]  # ("committed" | "reverted" | "skipped", edit id, or fact id when skipped)


@dataclass(frozen=True)
class Settlement:
    """What probing candidates together found (`settle`), by their index in the plan."""

    accepted: dict[int, ProbeReport]  # each kept edit's report in the probe that passed the state kept
    culprits: dict[int, ProbeReport]  # each culprit's report in the probe that convicted it
    states_probed: int
    locality: LocalityState | None  # the kept state's (None: nothing kept)
    seconds: dict[str, float]  # where the probes' time went, summed over the states probed


def settle(prober: Prober, editor: Editor, plan: ProbePlan, edit_ids: Sequence[str], earlier: Sequence[EditRequest],
           members: Sequence[int]) -> Settlement:  # fmt: skip
    """Probe the edits `members` of `plan` (request i applied to `editor` as `edit_ids[i]`)
    together, find the culprits (module doc) and revert them from `editor`."""
    culprits: dict[int, ProbeReport] = {}
    probed = 0
    seconds: dict[str, float] = {}

    def probe(present: list[int]) -> dict[int, ProbeReport]:
        nonlocal probed
        probed += 1
        view = editor if len(present) == len(members) else editor.fork()
        try:
            for m in members:
                if m not in present:
                    view.revert(edit_ids[m])
            reports = prober.check(view, plan, edit_ids, earlier, members=present)
            for part, t in reports[0].seconds.items():  # one check: its reports share its clock
                seconds[part] = round(seconds.get(part, 0.0) + t, 3)
            return dict(zip(present, reports, strict=True))
        finally:
            if view is not editor:
                view.retire()

    def resolve(candidates: list[int], kept: list[int], kept_reports: dict[int, ProbeReport]) -> tuple[list[int], dict[int, ProbeReport]]:
        """Settle `candidates` on top of `kept` (a state a probe passed): returns the state kept after."""
        reports = probe(kept + candidates)
        if all(r.passed for r in reports.values()):
            return kept + candidates, reports
        if len(candidates) == 1:  # what failed comes with this one edit, added to a state that passed
            culprits[candidates[0]] = reports[candidates[0]]
            return kept, kept_reports
        suspects = [m for m in candidates if reports[m].own_failed]
        if len(suspects) == len(candidates):  # each failed its own rows: each on top of what is kept so far
            for m in candidates:
                kept, kept_reports = resolve([m], kept, kept_reports)
            return kept, kept_reports
        if suspects:  # the others first, then the suspects on top of them
            first, second = [m for m in candidates if m not in suspects], suspects
        else:  # a shared failure: halves
            first, second = candidates[: len(candidates) // 2], candidates[len(candidates) // 2 :]
        kept, kept_reports = resolve(first, kept, kept_reports)
        return resolve(second, kept, kept_reports)

    kept, reports = resolve(list(members), [], {})
    for m in culprits:
        editor.revert(edit_ids[m])
    accepted = {m: reports[m] for m in kept}
    locality = next(iter(accepted.values())).locality if accepted else None
    return Settlement(accepted, culprits, probed, locality, seconds)


class BatchOwner(Protocol):
    """What `Batches` needs from the maintenance loop's writer (kmd.daemon.maintainer)."""

    host: ModelHost
    ledger: Ledger
    policy: Policy
    editor: Editor
    prober: Prober | None
    actor: str

    def save(self) -> None: ...

    def current_locality(self) -> float: ...

    def counted(self, outcome: str, count: int = 1) -> None: ...

    def committed_locality(self, state: LocalityState) -> None: ...

    def retry_stronger(self, fact: FactRecord) -> Outcome: ...


@dataclass
class _Candidate:
    fact: FactRecord
    record: EditRecord
    request: EditRequest  # with the ledger's edit id
    apply_seconds: float = 0.0


class Batches:
    """Applies and probes ready facts as batches (module doc); composed into the maintainer,
    which calls it under its writer lock."""

    def __init__(self, owner: BatchOwner) -> None:
        self.owner = owner

    def apply(self, facts: Sequence[FactRecord]) -> list[Outcome]:
        """Edit the new facts `facts` (none supersedes an edit) as one batch."""
        o = self.owner
        assert o.prober is not None, "call restore() first"
        outcomes: list[Outcome] = []
        facts = self._not_known(facts, outcomes)
        if not facts:
            return outcomes
        earlier = [o.editor.request(i) for i in o.editor.edit_ids]
        loc_before = o.current_locality()
        recorded: list[_Candidate] = []
        for fact in facts:  # written ahead: every edit `applied` before the model changes
            request = build_edit_request(fact, o.policy.relation(fact.relation))
            config = o.editor.config_dict() | self._options(fact)
            try:
                record = o.ledger.record_edit_applied(
                    fact.id, request=request.to_dict(), backend=o.editor.name, backend_config=config,
                    policy_version=o.policy.version_tag, actor=o.actor, reason=f"edit applied (batch of {len(facts)})",
                )  # fmt: skip
            except FactNotReadyError as exc:  # a person rejected it meanwhile: nothing was changed
                logger.info("{}: skipped (it changed after this cycle listed it)", exc)
                continue
            recorded.append(_Candidate(fact, record, with_edit_id(request, record.id)))
        crash_point("batch.recorded")
        if not recorded:
            return outcomes
        plan = o.prober.plan(o.editor, [c.request for c in recorded], [self._questions(c.fact) for c in recorded])
        members = []
        for m, c in enumerate(recorded):
            started = time.perf_counter()
            try:
                with o.editor.configured(**self._options(c.fact)):
                    o.editor.apply(c.request)
            except Exception as exc:  # the editor keeps nothing from a failed apply
                logger.bind(edit_id=c.record.id).exception("edit {} could not be applied", c.record.id)
                o.ledger.revert_edit(c.record.id, reason=f"apply failed: {type(exc).__name__}: {exc}",
                                     probes_before=None, probes_after=None, actor=o.actor)  # fmt: skip
                o.counted("error")
                outcomes.append(("reverted", c.record.id))
                continue
            c.apply_seconds = time.perf_counter() - started
            members.append(m)
        crash_point("batch.applied")
        if members:
            outcomes += self._settle_and_record(recorded, plan, members, earlier, loc_before)
        return outcomes

    def roll_forward(self, edits: Sequence[EditRecord]) -> None:
        """At restart: the saved state holds these edits of one batch, which the ledger never
        committed (a crash after the save): probe them together again; commit those that
        pass, revert the others (saved without them first)."""
        o = self.owner
        assert o.prober is not None
        ids = [editor_key(e.id) for e in edits]
        recorded = [_Candidate(o.ledger.fact(e.fact_id), e, o.editor.request(key)) for e, key in zip(edits, ids, strict=True)]
        plan = o.prober.plan(o.editor, [c.request for c in recorded], [self._questions(c.fact) for c in recorded], without=ids)
        earlier = [o.editor.request(i) for i in o.editor.edit_ids if i not in ids]
        settlement = settle(o.prober, o.editor, plan, ids, earlier, range(len(recorded)))
        if settlement.culprits:
            o.save()  # without the culprits, before their revert logs: the state never holds a reverted edit
        for m, report in settlement.culprits.items():
            o.ledger.revert_edit(recorded[m].record.id, reason="saved before a crash, probes failed at restart: " + report.reason,
                                 probes_before=report.figures(), probes_after=None, actor=o.actor)  # fmt: skip
            logger.bind(edit_id=ids[m]).warning("edit {} was saved but not committed before a crash; its probes now fail: "
                                                "reverted", ids[m])  # fmt: skip
        if settlement.accepted:
            o.ledger.commit_edits([(recorded[m].record.id, r.figures() | {"reconciled": True}) for m, r in settlement.accepted.items()],
                                  actor=o.actor, reason="saved before a crash; probes passed again at restart")  # fmt: skip
            assert settlement.locality is not None
            o.committed_locality(settlement.locality)
            logger.warning("edits {} were saved but not committed before a crash: probed again together and committed",
                           [ids[m] for m in settlement.accepted])  # fmt: skip

    # ----- the steps ----------------------------------------------------------------------------
    def _not_known(self, facts: Sequence[FactRecord], outcomes: list[Outcome]) -> list[FactRecord]:
        """The facts the model does not answer yet (one teacher-forced pass); the others skipped."""
        o = self.owner
        requests = [build_edit_request(f, o.policy.relation(f.relation)) for f in facts]
        scores = score_targets(o.host, o.editor, [(r.prompt, r.target) for r in requests])
        out = []
        for fact, score in zip(facts, scores, strict=True):
            if score.accuracy < 1.0:
                out.append(fact)
                continue
            try:
                o.ledger.skip_fact(fact.id, actor=o.actor)
            except FactNotReadyError as exc:
                logger.info("{}: skipped (it changed after this cycle listed it)", exc)
                continue
            o.counted("skipped")
            outcomes.append(("skipped", fact.id))
        return out

    def _settle_and_record(self, recorded: list[_Candidate], plan: ProbePlan, members: list[int],
                           earlier: list[EditRequest], loc_before: float) -> list[Outcome]:  # fmt: skip
        o = self.owner
        assert o.prober is not None
        ids = [editor_key(c.record.id) for c in recorded]
        started = time.perf_counter()
        try:
            settlement = settle(o.prober, o.editor, plan, ids, earlier, members)
        except Exception as exc:  # never keep an edit that was not probed
            logger.exception("probing a batch of {} edits failed", len(members))
            for m in members:
                if ids[m] in o.editor.edit_ids:
                    o.editor.revert(ids[m])
                o.ledger.revert_edit(recorded[m].record.id, reason=f"probes failed: {type(exc).__name__}: {exc}",
                                     probes_before=None, probes_after=None, actor=o.actor)  # fmt: skip
                o.counted("error")
            return [("reverted", recorded[m].record.id) for m in members]
        seconds = time.perf_counter() - started
        crash_point("batch.probed")
        size, outcomes, retries = len(members), [], []
        batch = {"size": size, "states_probed": settlement.states_probed, "culprits": len(settlement.culprits),
                 "probe_parts_s": settlement.seconds}  # fmt: skip
        after = {"loc": settlement.locality.loc if settlement.locality is not None else loc_before}

        def figures(m: int, report: ProbeReport) -> dict[str, Any]:
            return report.figures() | {"apply_seconds": round(recorded[m].apply_seconds, 3),
                                       "probe_seconds": round(seconds, 3), "batch": batch}  # fmt: skip

        for m, report in sorted(settlement.culprits.items()):
            c = recorded[m]
            retry = not report.took and not report.harmful and bool(o.editor.stronger_overrides())
            how = "bisected out of" if settlement.states_probed > 1 else "probed in"
            o.ledger.revert_edit(c.record.id, reason=f"{report.reason} ({how} a batch of {size})",
                                 probes_before=figures(m, report) | {"loc_before": loc_before}, probes_after=after,
                                 actor=o.actor, retry=retry)  # fmt: skip
            o.counted("reverted")
            logger.bind(edit_id=c.record.id).warning("edit {} reverted ({} a batch of {}): {}", c.record.id, how, size,
                                                     report.reason)  # fmt: skip
            outcomes.append(("reverted", c.record.id))
            if retry:
                retries.append(c.fact)
        crash_point("batch.reverted")
        if settlement.accepted:
            o.save()
            crash_point("batch.saved")
            o.ledger.commit_edits([(recorded[m].record.id, figures(m, r)) for m, r in sorted(settlement.accepted.items())],
                                  actor=o.actor)  # fmt: skip
            crash_point("batch.committed")
            assert settlement.locality is not None
            o.committed_locality(settlement.locality)
            o.counted("committed", len(settlement.accepted))
            outcomes += [("committed", recorded[m].record.id) for m in sorted(settlement.accepted)]
        logger.info("batch of {} edits: {} committed, {} reverted; {} states probed in {:.2f} s", size,
                    len(settlement.accepted), len(settlement.culprits), settlement.states_probed, seconds)  # fmt: skip
        for fact in retries:  # did not take: once more alone, stronger (as a single edit's retry)
            o.counted("retried")
            try:
                outcomes.append(o.retry_stronger(o.ledger.fact(fact.id)))
            except FactNotReadyError as exc:  # a person rejected it meanwhile: nothing was changed
                logger.info("{}: not retried (it changed after its batch)", exc)
        return outcomes

    def _options(self, fact: FactRecord) -> dict[str, Any]:
        return dict(self.owner.policy.relation(fact.relation).editor_options)

    def _questions(self, fact: FactRecord) -> list[str]:
        try:
            return same_subject_questions(fact, self.owner.policy, self.owner.policy.probes.same_subject_questions)
        except KeyError:  # its relation left the policy (a restart)
            return []
