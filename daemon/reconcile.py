"""Restart reconciliation: finish or roll back every operation the ledger shows in flight.

On start, `Maintainer.restore()` loads the saved editor state, finishes the reverts someone
requested, and hands the rest to a `Reconciler` (docs/crash-safety.md has the whole
matrix): an edit the ledger applied but the saved state lacks (crash before the save) is
marked reverted and its fact retried; an edit the saved state holds but the ledger never
committed (crash between the save and the commit, so after its probes passed) is probed
again and committed, or reverted if the probes now fail (several such edits are one
batch's, probed again together: `kmd.daemon.batch.Batches.roll_forward`); an edit the state
holds that the ledger does not know is removed. No edit is ever put back into the model
without its probes: a committed edit missing from the state is re-applied and probed, and
reverted if they fail.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from kmd.daemon.edit_request import editor_key, ledger_id, same_subject_questions, with_edit_id
from kmd.daemon.ledger import LedgerError
from kmd.editors.state import StateError

if TYPE_CHECKING:
    from kmd.daemon.batch import Batches
    from kmd.daemon.ledger import EditRecord, Ledger
    from kmd.daemon.policy import Policy
    from kmd.daemon.probes import ProbePlan, Prober
    from kmd.editors.protocol import EditRequest, Editor

__all__ = ["Reconciler"]


@dataclass
class Reconciler:
    """Brings the restored editor and the ledger back in line (module doc). The maintainer
    builds one at restart with what it needs; the editor is the maintainer's working one,
    which `save` writes (write-ahead, named in the ledger first)."""

    ledger: Ledger
    policy: Policy
    editor: Editor
    prober: Prober
    batches: Batches  # probes the held edits of one batch again together
    save: Callable[[], None]
    measured: Callable[[float], None]  # the locality the model has now (the maintainer's stats)
    actor: str
    state_dir: Path  # where the saved state is (named in errors)

    def check_requests(self) -> None:
        """The saved state's edit requests must be the ones the (hash-chained) ledger
        recorded: the manifest's checksums catch a careless change, this catches one whose
        checksum was recomputed too."""
        for key in self.editor.edit_ids:
            try:
                recorded = self.ledger.edit(ledger_id(key)).edit_request
            except (LedgerError, ValueError):
                continue  # not in the ledger: removed by the reconciliation
            held = self.editor.request(key)
            for name in ("prompt", "target", "subject"):
                if getattr(recorded, name) != getattr(held, name):
                    raise StateError(
                        f"{self.state_dir}: edit {key}'s {name} is {getattr(held, name)!r} in the saved state but "
                        f"{getattr(recorded, name)!r} in the ledger; refusing the state (restore it or move it away)"
                    )

    def settle(self) -> None:
        """Finish or roll back the edits in flight (steps 2 to 4; the maintainer finished the
        requested reverts, step 1, first)."""
        committed = {editor_key(e.id) for e in self.ledger.committed_edits()}
        applied = {editor_key(e.id): e for e in self.ledger.uncommitted_edits()}
        changed = False
        # 2. Edits the state holds that the ledger never applied (or already reverted): remove.
        for key in sorted(set(self.editor.edit_ids) - committed - set(applied), key=ledger_id):
            logger.bind(edit_id=key).warning("edit {} is in the saved state but not in the ledger; removing", key)
            self.editor.revert(key)
            changed = True
        if changed:
            self.save()
        # 3. Edits applied but never committed: before the save, roll back (the fact is
        #    retried); after the save (the probes had passed), probe again and commit. Several
        #    saved ones are one batch's: probed again together.
        in_order = sorted(applied.items(), key=lambda kv: ledger_id(kv[0]))
        held = [e for key, e in in_order if key in self.editor.edit_ids]
        for key, edit in in_order:
            if key not in self.editor.edit_ids:
                self.ledger.revert_edit(edit.id, reason="interrupted before commit (crash or shutdown); will retry",
                                        probes_before=None, probes_after=None, actor=self.actor, retry=True)  # fmt: skip
        if len(held) > 1 and all(e.supersedes_edit_id is None for e in held):
            self.batches.roll_forward(held)
        else:
            for edit in held:
                self._roll_forward(edit)
        # 4. Committed edits the state lacks (a lost or replaced state): re-apply, with probes.
        for edit in self.ledger.committed_edits():  # again: step 3 may have superseded some
            if editor_key(edit.id) not in self.editor.edit_ids:
                self._reapply(edit)
        logger.info("editor restored: {} committed edits ({} backend)", len(self.editor.edit_ids), self.editor.name)

    def _earlier(self, key: str) -> list[EditRequest]:
        return [self.editor.request(i) for i in self.editor.edit_ids if i != key]

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
        held = [editor_key(e.id) for e in edits if editor_key(e.id) in self.editor.edit_ids]
        requests = [self.editor.request(editor_key(e.id)) if editor_key(e.id) in held else e.edit_request for e in edits]
        return self.prober.plan(self.editor, requests, [self._questions(e) for e in edits], without=held)

    def _roll_forward(self, edit: EditRecord) -> None:
        """The state was saved with `edit` after its probes passed; the ledger commit was lost."""
        key, log = editor_key(edit.id), logger.bind(edit_id=editor_key(edit.id))
        old = edit.supersedes_edit_id
        if old is not None and editor_key(old) in self.editor.edit_ids:  # never saved that way; be safe anyway
            self.editor.revert(editor_key(old))
            self.save()
        (report,) = self.prober.check(self.editor, self._plan([edit]), [key], self._earlier(key))
        self.measured(report.loc)
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
        key, log = editor_key(edit.id), logger.bind(edit_id=editor_key(edit.id))
        log.error("committed edit {} is missing from the saved state; re-applying it with its probes", edit.id)
        try:
            try:  # the relation's backend options, as when it was first applied
                options = dict(self.policy.relation(self.ledger.fact(edit.fact_id).relation).editor_options)
            except KeyError:
                options = {}
            plan = self._plan([edit])
            with self.editor.configured(**options):
                self.editor.apply(with_edit_id(edit.edit_request, edit.id))
            (report,) = self.prober.check(self.editor, plan, [key], self._earlier(key))
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the edit stays out
            if key in self.editor.edit_ids:
                self.editor.revert(key)
            reason, figures = f"missing from the saved state; re-applying failed: {type(exc).__name__}: {exc}", None
        else:
            self.measured(report.loc)
            if report.passed:
                self.save()
                return
            self.editor.revert(key)
            reason, figures = "missing from the saved state; re-applied but probes failed: " + report.reason, report.figures()
        self.save()
        self.ledger.revert_edit(edit.id, reason=reason, probes_before=figures, probes_after=None, actor=self.actor)
        log.error("edit {}: {}", edit.id, reason)
