"""Publishing the committed editor state, and serving replicas that follow it.

The writer publishes after every change it has recorded in the ledger (commit, revert,
supersession, regression revert) and once when it takes over:

    PUBLISH_DIR/<sha256 of manifest.json>/manifest.json + tensors-<sha[:16]>.safetensors

The directory name is the sha256 of its manifest, and the manifest holds the tensors'
sha256, so a published state is content-addressed and checksummed end to end. It is
written into a temporary directory and renamed into place (never half-visible), then the
ledger's `published state` row names the version and the edits it holds. The newest
`keep` versions stay on disk; older ones are removed.

A replica never edits. It polls the ledger's published version; when it changes, it loads
that state (checking the manifest hash and the tensor checksum), smoke-probes it (the
newest edits it holds give their targets; the newest reverted edits it does not hold no
longer give theirs) and only then swaps it in and reports ready. While the ledger
names a version it has not loaded yet, `/readyz` is 503. A version is loaded only if the
writer named it in the hash chain when it saved it (`kmd.daemon.bound_state`): the
published-state row is not chained, so it alone cannot make a replica serve a state.

With each version the writer also publishes the ledger's chain head
(`PUBLISH_DIR/chain-head.json`, outside the database). A replica checks at every poll that
the chain still holds it; if not (the chain's tail was rolled back), it loads nothing
more and is not ready, saying why.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from kmd.daemon.bound_state import check_named
from kmd.daemon.db import HEAD_FILE
from kmd.daemon.edit_request import editor_key
from kmd.daemon.ledger import HeadFile, HeadFileError
from kmd.daemon.serving.state import ServedState
from kmd.editors.state import MANIFEST, StateError, fsync_path, read_manifest, remove_stale_tensors

if TYPE_CHECKING:
    from kmd.daemon.ledger import Ledger, PublishedState
    from kmd.daemon.policy import Policy
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import Editor

__all__ = ["Replica", "adopt_state", "closest_state", "publish_state", "published_dir", "published_head",
           "published_head_problem"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def published_dir(publish_dir: Path, version: str) -> Path:
    return Path(publish_dir) / version


def published_head(publish_dir: Path) -> HeadFile:
    """The chain head the writer publishes beside its states."""
    return HeadFile(Path(publish_dir) / HEAD_FILE)


def published_head_problem(ledger: Ledger, publish_dir: Path) -> str | None:
    """None if the chain still holds the head the writer published beside its states, else
    the problem (a rollback of the chain's tail passes the chain's own checks; this shows it)."""
    head = published_head(publish_dir)
    try:
        recorded = head.read()
    except HeadFileError as exc:
        return str(exc)
    return ledger.check_head(recorded, f"the writer's published head {head.path}") if recorded else None


def publish_state(editor_dir: Path, publish_dir: Path, *, keep: int = 5) -> tuple[str, list[str]]:
    """Copy a saved editor state into the publish directory; returns (version, edit ids)."""
    manifest = read_manifest(editor_dir)
    version = _sha256(editor_dir / MANIFEST)
    target = published_dir(publish_dir, version)
    edit_ids = [e["edit_id"] for e in manifest["edits"]]
    publish_dir.mkdir(parents=True, exist_ok=True)
    if not (target / MANIFEST).is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=publish_dir))
        try:
            for name in (MANIFEST, manifest["tensors"]["file"]):
                shutil.copyfile(editor_dir / name, tmp / name)
                fsync_path(tmp / name)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / MANIFEST).is_file():  # not simply "another writer was first"
                    raise
            fsync_path(publish_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    os.utime(target)  # newest first for the clean-up below
    old = sorted((p for p in publish_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                 key=lambda p: p.stat().st_mtime, reverse=True)[keep:]  # fmt: skip
    for stale in old:
        if stale != target:
            shutil.rmtree(stale, ignore_errors=True)
    return version, edit_ids


def closest_state(candidates: list[Path], committed: set[str]) -> Path | None:
    """Of several saved states, the one whose edits differ least from the ledger's committed set.

    A writer taking over restores from its own last state or the last published one,
    whichever needs fewer edits removed or re-applied by reconciliation.
    """
    best, best_cost = None, None
    for path in candidates:
        try:
            held = {e["edit_id"] for e in read_manifest(path)["edits"]}
        except StateError:
            continue
        cost = len(held ^ committed)
        if best_cost is None or cost < best_cost:
            best, best_cost = path, cost
    return best


def adopt_state(source: Path, editor_dir: Path) -> None:
    """Make `editor_dir` hold a copy of the state in `source`, in `save_editor`'s commit order.

    The tensor file first, then the manifest replaced atomically (the commit point), then
    tensor files the manifest no longer names are removed: a crash leaves one whole state.
    """
    manifest = read_manifest(source)
    tensor_file = manifest["tensors"]["file"]
    editor_dir.mkdir(parents=True, exist_ok=True)
    for name in (tensor_file, MANIFEST):
        tmp = editor_dir / f".{name}.adopt"
        shutil.copyfile(source / name, tmp)
        fsync_path(tmp)
        os.replace(tmp, editor_dir / name)
    fsync_path(editor_dir)
    remove_stale_tensors(editor_dir, tensor_file)


@dataclass
class _Loaded:
    version: str
    editor: Editor  # a snapshot (`fork`) of the loaded state: it acts only on its own requests' forwards


class Replica:
    """Serves the writer's published state; never edits."""

    def __init__(self, host: ModelHost, ledger: Ledger, policy: Policy, publish_dir: Path, *,
                 smoke_edits: int = 2) -> None:  # fmt: skip
        self.host, self.ledger, self.policy = host, ledger, policy
        self.publish_dir = Path(publish_dir)
        self.smoke_edits = smoke_edits
        self.lock = threading.RLock()  # held while serving and while swapping states
        self.loaded: _Loaded | None = None
        self.wanted: str | None = None  # the version the ledger names
        self.problem: str | None = None  # why the wanted version is not loaded
        self.flagged: str | None = None  # why the ledger is not trusted (its chain lost the published head)
        self.loads = 0
        # Loaded editors never serve (their snapshots do): they stay suspended (hooks off) for
        # the process's lifetime, so raw model calls (the next load's checks) see the base model.
        self._retired = ExitStack()

    @property
    def editor(self) -> Editor | None:
        """The snapshot that serves the loaded state."""
        return self.loaded.editor if self.loaded else None

    @property
    def served(self) -> ServedState | None:
        loaded = self.loaded  # one read: editor and version together
        return ServedState(loaded.editor, loaded.version) if loaded is not None else None

    def readiness(self) -> tuple[bool, str]:
        if self.flagged is not None:
            return False, f"replica: the ledger fails its check ({self.flagged}); run kmd verify-chain"
        if self.wanted is None:
            return False, "replica: waiting for the writer to publish a state"
        if self.loaded is None or self.loaded.version != self.wanted:
            return False, f"replica: loading state {self.wanted[:12]}" + (f" ({self.problem})" if self.problem else "")
        return True, f"ok: serving state {self.loaded.version[:12]}"

    def sync(self) -> bool:
        """Load the ledger's published state if it is new; True when a new state went live."""
        flagged = published_head_problem(self.ledger, self.publish_dir)
        if flagged is not None and flagged != self.flagged:  # once, not at every poll
            logger.error("replica: {}; loading nothing until the ledger verifies", flagged)
        self.flagged = flagged
        if flagged is not None:
            return False
        published = self.ledger.published_state()
        if published is None:
            return False
        self.wanted = published.version
        if self.loaded is not None and self.loaded.version == published.version:
            return False
        try:
            self._load(published)
        except Exception as exc:  # keep the old state loaded, stay unready, retry next poll
            self.problem = f"{type(exc).__name__}: {exc}"
            logger.error("replica: state {} not loaded: {}", published.version[:12], self.problem)
            return False
        self.problem = None
        return True

    def _load(self, published: PublishedState) -> None:
        from kmd.editors.state import load_editor

        path = published_dir(self.publish_dir, published.version)
        if _sha256(path / MANIFEST) != published.version:
            raise StateError(f"{path}/{MANIFEST} does not hash to its version (corrupted or replaced)")
        check_named(self.ledger, path)
        with self.lock:  # one load at a time; requests never take it (they read `served`)
            editor = load_editor(path, self.host, digest=published.version)  # checks the tensors' checksum
            try:
                if tuple(editor.edit_ids) != published.edit_ids:
                    raise StateError(f"state {published.version[:12]} holds {editor.edit_ids}, "
                                     f"the ledger says {list(published.edit_ids)}")  # fmt: skip
                self._smoke(editor)
                serving = editor.fork()
            finally:
                self._retired.enter_context(editor.suspended())  # the old state serves on meanwhile
            old, self.loaded = self.loaded, _Loaded(published.version, serving)
            if old is not None:
                old.editor.retire()  # its hooks go when the requests still running on it end
            self.loads += 1
        logger.info("replica: state {} live ({} edits)", published.version[:12], len(editor.edit_ids))

    def _smoke(self, editor: Editor) -> None:
        """The newest edits held give their targets; the newest reverted ones no longer do."""
        from kmd.editors.scoring import score_targets

        min_rel = self.policy.probes.min_rel
        held = editor.edit_ids[-self.smoke_edits :] if self.smoke_edits else []
        pairs = [(editor.request(i).prompt, editor.request(i).target) for i in held]
        for edit_id, score in zip(held, score_targets(self.host, editor, pairs) if pairs else [], strict=True):
            if score.accuracy < min_rel:
                raise StateError(f"smoke probe: edit {edit_id} gives its target at {score.accuracy:.2f} < {min_rel}")
        # A reverted edit's prompt may still be moved by a neighbouring edit, so the check is
        # that its own target is gone (unless the base model, or an edit held for the same
        # prompt or target, gives it anyway).
        taken = {editor.request(i).prompt for i in editor.edit_ids} | {editor.request(i).target for i in editor.edit_ids}
        gone = []
        for revert in self.ledger.reverts(limit=50) if self.smoke_edits else []:
            request, key = self.ledger.edit(revert.edit_id).edit_request, editor_key(revert.edit_id)
            if key not in editor.edit_ids and not {request.prompt, request.target} & taken:
                gone.append((key, (request.prompt, request.target)))
            if len(gone) >= self.smoke_edits:
                break
        if gone:
            edited = score_targets(self.host, editor, [p for _, p in gone])
            with editor.suspended():
                base = score_targets(self.host, None, [p for _, p in gone])
            for (edit_id, _), e, b in zip(gone, edited, base, strict=True):
                if e.accuracy >= min_rel > b.accuracy:
                    raise StateError(f"smoke probe: reverted edit {edit_id} still gives its target")
