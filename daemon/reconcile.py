"""Restart reconciliation: finish or roll back every operation the ledger shows in flight.

On start, `Maintainer.restore()` loads the saved editor state and calls `_reconcile`
(docs/crash-safety.md has the whole matrix): a requested revert is finished; an edit the
ledger applied but the saved state lacks (crash before the save) is marked reverted and
its fact retried; an edit the saved state holds but the ledger never committed (crash
between the save and the commit, so after its probes passed) is probed again and
committed, or reverted if the probes now fail (several such edits are one batch's, probed
again together: `kmd.daemon.batch.Batches.roll_forward`); an edit the state holds that the ledger
does not know is removed. No edit is ever put back into the model without its probes: a
committed edit missing from the state is re-applied and probed, and reverted if they fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from kmd.daemon.edit_request import same_subject_questions, with_edit_id
from kmd.daemon.ledger import LedgerError
from kmd.editors.protocol import EditRequest
from kmd.editors.state import StateError

if TYPE_CHECKING:
    from kmd.daemon.batch import Batches
    from kmd.daemon.ledger import EditRecord, Ledger
    from kmd.daemon.maintainer import Stats
    from kmd.daemon.policy import Policy
    from kmd.daemon.probes import ProbePlan, Prober
    from kmd.editors.protocol import Editor

__all__ = ["Reconciler"]


class Reconciler:
    """The restart half of `kmd.daemon.maintainer.Maintainer` (whose `save()` and
    `finish_requested_reverts()` it uses)."""

    ledger: Ledger
    policy: Policy
    editor: Editor
    editor_dir: Path
    prober: Prober | None
    stats: Stats
    actor: str
    batches: Batches

    def _reconcile(self) -> None:
        """Finish or roll back every operation the ledger shows in flight (see the module doc)."""
        assert self.prober is not None
        self._check_requests()
        # 1. Reverts someone asked for: the request is durable, so finish it.
        self.finish_requested_reverts()
        committed = {str(e.id) for e in self.ledger.committed_edits()}
        applied = {str(e.id): e for e in self.ledger.uncommitted_edits()}
        changed = False
        # 2. Edits the state holds that the ledger never applied (or already reverted): remove.
        for edit_id in sorted(set(self.editor.edit_ids) - set(committed) - set(applied), key=int):
            logger.bind(edit_id=edit_id).warning("edit {} is in the saved state but not in the ledger; removing", edit_id)
            self.editor.revert(edit_id)
            changed = True
        if changed:
            self.save()
        # 3. Edits applied but never committed: before the save, roll back (the fact is
        #    retried); after the save (the probes had passed), probe again and commit. Several
        #    saved ones are one batch's: probed again together.
        held = [e for key, e in sorted(applied.items(), key=lambda kv: int(kv[0])) if key in self.editor.edit_ids]
        for edit_id, edit in sorted(applied.items(), key=lambda kv: int(kv[0])):
            if edit_id not in self.editor.edit_ids:
                self.ledger.revert_edit(edit.id, reason="interrupted before commit (crash or shutdown); will retry",
                                        probes_before=None, probes_after=None, actor=self.actor, retry=True)  # fmt: skip
        if len(held) > 1 and all(e.supersedes_edit_id is None for e in held):
            self.batches.roll_forward(held)
        else:
            for edit in held:
                self._roll_forward(edit)
        # 4. Committed edits the state lacks (a lost or replaced state): re-apply, with probes.
        for edit in self.ledger.committed_edits():  # again: step 3 may have superseded some
            edit_id = str(edit.id)
            if edit_id not in self.editor.edit_ids:
                self._reapply(edit)
        logger.info("editor restored: {} committed edits ({} backend)", len(self.editor.edit_ids), self.editor.name)

    def _check_requests(self) -> None:
        """The saved state's edit requests must be the ones the (hash-chained) ledger
        recorded: the manifest's checksums catch a careless change, this catches one whose
        checksum was recomputed too."""
        for edit_id in self.editor.edit_ids:
            try:
                recorded = self.ledger.edit(int(edit_id)).request
            except (LedgerError, ValueError):
                continue  # not in the ledger: removed by the reconciliation
            held = self.editor.request(edit_id)
            for name in ("prompt", "target", "subject"):
                if recorded.get(name) != getattr(held, name):
                    raise StateError(
                        f"{self.editor_dir}: edit {edit_id}'s {name} is {getattr(held, name)!r} in the saved state but "
                        f"{recorded.get(name)!r} in the ledger; refusing the state (restore it or move it away)"
                    )

    def _earlier(self, edit_id: str) -> list[EditRequest]:
        return [self.editor.request(i) for i in self.editor.edit_ids if i != edit_id]

    def _questions(self, edit: EditRecord) -> list[str]:
        """`edit`'s same-subject questions (none when its fact's relation left the policy)."""
        try:
            return same_subject_questions(self.ledger.fact(edit.fact_id), self.policy,
                                          self.policy.probes.same_subject_questions)  # fmt: skip
        except (KeyError, LedgerError):
            return []

    def _plan(self, edits: Sequence[EditRecord]) -> ProbePlan:
        """The probe of `edits` planned on the editor without them (a fork with those it holds
        reverted), as when they were first applied."""
        assert self.prober is not None
        held = [str(e.id) for e in edits if str(e.id) in self.editor.edit_ids]
        requests = [self.editor.request(str(e.id)) if str(e.id) in held else EditRequest.from_dict(e.request) for e in edits]
        return self.prober.plan(self.editor, requests, [self._questions(e) for e in edits], without=held)

    def _roll_forward(self, edit: EditRecord) -> None:
        """The state was saved with `edit` after its probes passed; the ledger commit was lost."""
        assert self.prober is not None
        key, log = str(edit.id), logger.bind(edit_id=str(edit.id))
        old = edit.supersedes_edit_id
        if old is not None and str(old) in self.editor.edit_ids:  # never saved that way; be safe anyway
            self.editor.revert(str(old))
            self.save()
        (report,) = self.prober.check(self.editor, self._plan([edit]), [key], self._earlier(key))
        self.stats.last_locality = report.loc
        if report.passed:
            supersedes = old if old is not None and self.ledger.edit(old).status == "committed" else None
            self.ledger.commit_edit(edit.id, probes=report.figures() | {"reconciled": True}, actor=self.actor,
                                    reason="saved before a crash; probes passed again at restart",
                                    supersedes_edit_id=supersedes, superseded_probes={"loc": report.loc})  # fmt: skip
            log.warning("edit {} was saved but not committed before a crash: probed again and committed", edit.id)
            return
        self.editor.revert(key)
        self.save()
        self.ledger.revert_edit(edit.id, reason="saved before a crash, probes failed at restart: " + report.reason,
                                probes_before=report.figures(), probes_after=None, actor=self.actor)  # fmt: skip
        log.warning("edit {} was saved but not committed before a crash; its probes now fail: reverted", edit.id)

    def _reapply(self, edit: EditRecord) -> None:
        """A committed edit missing from the saved state goes back only if its probes pass."""
        assert self.prober is not None
        key, log = str(edit.id), logger.bind(edit_id=str(edit.id))
        log.error("committed edit {} is missing from the saved state; re-applying it with its probes", edit.id)
        try:
            try:  # the relation's backend options, as when it was first applied
                options = dict(self.policy.relation(self.ledger.fact(edit.fact_id).relation).editor_options)
            except KeyError:
                options = {}
            plan = self._plan([edit])
            with self.editor.configured(**options):
                self.editor.apply(with_edit_id(EditRequest.from_dict(edit.request), key))
            (report,) = self.prober.check(self.editor, plan, [key], self._earlier(key))
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the edit stays out
            if key in self.editor.edit_ids:
                self.editor.revert(key)
            reason, figures = f"missing from the saved state; re-applying failed: {type(exc).__name__}: {exc}", None
        else:
            self.stats.last_locality = report.loc
            if report.passed:
                self.save()
                return
            self.editor.revert(key)
            reason, figures = "missing from the saved state; re-applied but probes failed: " + report.reason, report.figures()
        self.save()
        self.ledger.revert_edit(edit.id, reason=reason, probes_before=figures, probes_after=None, actor=self.actor)
        log.error("edit {}: {}", edit.id, reason)
