"""Saving and loading an editor's whole state: safetensors plus a JSON manifest.

Layout of a state directory:

    manifest.json                    the commit point (replaced atomically)
    tensors-<sha256[:16]>.safetensors content-addressed tensors named by the manifest

A save writes the new tensor file (fsync), then atomically replaces the manifest, then
deletes tensor files the manifest no longer names. A crash at any point leaves either
the old or the new state, never a mix (and at most a tensor file no manifest names, which
the next save deletes). The tensor file is streamed from the tensors' memory to disk and
hashed from disk: a save holds no serialised copy of the state (it held two). Nothing is
pickled. Loading checks the format, the base model's identity, the backend, the config,
the tensors' checksum and each edit request's checksum, and refuses any mismatch with a
message saying what differs (the daemon also checks each edit request against the
ledger's record of it at start).

A state's *digest* is the sha256 of its manifest's bytes; the manifest holds the
tensors' sha256, so the digest names manifest and tensors together. A save can be
split (`encode_state`, which writes the tensor file, then `write_state`, which commits
the manifest) so the caller can record the digest elsewhere first; a load given a digest
refuses a state that is not that one (the daemon loads only states whose digest its
ledger recorded: `kmd.daemon.bound_state`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load as load_tensors_bytes
from safetensors.torch import save_file as save_tensors_file

from kmd.editors.profiles import ProfileError, build_config
from kmd.editors.protocol import EditRequest, EditorError
from kmd.editors.registry import UnknownBackendError, get_backend

if TYPE_CHECKING:
    import torch

    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import Editor

FORMAT = "kmd-editor-state/1"
MANIFEST = "manifest.json"


class StateError(EditorError):
    """A saved state is missing, corrupted, or belongs to another model/backend."""


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (after a rename, the directory entry too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` at `path` so that a crash leaves the old file or the new one, durably."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def edit_checksum(request: dict[str, Any]) -> str:
    """sha256 of one edit request's canonical JSON (the manifest keeps one per edit)."""
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _check_edits(manifest: dict[str, Any], file: Path) -> None:
    """Every edit request must match its checksum: a hand-edited target or prompt is
    refused, naming the edit, instead of being served or re-saved."""
    edits, sums = manifest["edits"], manifest["edit_checksums"]
    if not isinstance(edits, list) or not isinstance(sums, list) or len(edits) != len(sums):
        raise StateError(f"{file}: edits and edit_checksums do not correspond (edited by hand or corrupted)")
    for index, (request, expected) in enumerate(zip(edits, sums, strict=True)):
        name = request.get("edit_id") if isinstance(request, dict) else None
        if not isinstance(request, dict) or edit_checksum(request) != expected:
            raise StateError(f"{file}: edit {name if name is not None else f'#{index}'} does not match its checksum "
                             "(its request was changed after it was saved); refusing this state")  # fmt: skip


@dataclass(frozen=True)
class EncodedState:
    """An editor's whole state: its tensor file written in the state directory, its manifest
    not yet (the commit point)."""

    manifest: bytes
    tensor_file: str
    digest: str  # sha256 of `manifest`, which holds the tensors' sha256
    edit_ids: tuple[str, ...]


def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _write_tensor_file(tensors: dict[str, torch.Tensor], directory: Path) -> tuple[str, str, int]:
    """Write `tensors` durably at directory/tensors-<sha256[:16]>.safetensors: (name, sha256, bytes)."""
    fd, tmp = tempfile.mkstemp(prefix=".tensors-", suffix=".partial", dir=directory)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        save_tensors_file(tensors, tmp_path)  # streamed from the tensors' memory, no serialised copy
        fsync_path(tmp_path)
        sha, size = _sha256_file(tmp_path), tmp_path.stat().st_size
        name = f"tensors-{sha[:16]}.safetensors"
        if (directory / name).exists():  # the same content (content-addressed): keep the one there
            tmp_path.unlink()
        else:
            os.replace(tmp_path, directory / name)
            fsync_path(directory)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return name, sha, size


def encode_state(editor: Editor, path: str | Path) -> EncodedState:
    """Write `editor`'s tensor file in the state directory `path` (named by no manifest yet:
    the state at `path` is unchanged) and make the manifest that commits it (`write_state`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in editor.state_tensors().items()}
    tensor_file, tensors_sha, size = _write_tensor_file(tensors, path)
    config = editor.config_dict()
    edits = [editor.request(edit_id).to_dict() for edit_id in editor.edit_ids]
    manifest = {
        "edit_checksums": [edit_checksum(e) for e in edits],
        "format": FORMAT,
        "backend": editor.name,
        "config": config,
        "config_hash": config_hash(config),
        "model": editor.host.identity.to_dict(),
        "tensors": {"file": tensor_file, "sha256": tensors_sha, "bytes": size},
        "edits": edits,
        "extra": editor.extra_state(),
        "unchecked_edits": editor.unchecked_edits(),
    }
    text = json.dumps(manifest, indent=1, sort_keys=True).encode()
    return EncodedState(text, tensor_file, hashlib.sha256(text).hexdigest(), tuple(editor.edit_ids))


def write_state(state: EncodedState, path: Path) -> Path:
    """Commit an encoded state at `path` (where `encode_state` wrote its tensor file): the
    manifest (the commit point), then remove tensor files it does not name."""
    if not (path / state.tensor_file).is_file():
        raise StateError(f"{path}: tensor file {state.tensor_file} is missing; encode the state in this directory")
    write_atomic(path / MANIFEST, state.manifest)
    remove_stale_tensors(path, state.tensor_file)
    return path


def remove_stale_tensors(path: Path, kept: str) -> None:
    """Remove the tensor files in `path` other than `kept` (the one its manifest names), and
    unfinished ones: after the manifest is committed, no state needs them."""
    for stale in [*path.glob("tensors-*.safetensors"), *path.glob(".tensors-*.partial")]:
        if stale.name != kept:
            stale.unlink(missing_ok=True)


def save_editor(editor: Editor, path: str | Path) -> Path:
    """Save `editor`'s edits at `path`, atomically (a crash leaves the old state or the new)."""
    return write_state(encode_state(editor, path), Path(path))


def state_digest(path: Path) -> str:
    """The digest of the state saved at `path` (sha256 of its manifest's bytes)."""
    try:
        return hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()
    except OSError as exc:
        raise StateError(f"{path}: no readable {MANIFEST} ({exc})") from exc


def read_manifest(path: Path, *, digest: str | None = None) -> dict[str, Any]:
    """The checked manifest; with `digest`, only if its bytes are that state's (read once,
    so the bytes checked are the bytes used)."""
    file = path / MANIFEST
    if not file.is_file():
        raise StateError(f"{path}: no {MANIFEST}; not an editor state directory")
    data = file.read_bytes()
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise StateError(f"{file}: not the state {digest[:12]} (changed while it was being read)")
    try:
        manifest = json.loads(data.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StateError(f"{file}: corrupted manifest ({exc})") from exc
    required = {"format", "backend", "config", "config_hash", "model", "tensors", "edits", "edit_checksums", "extra"}
    if not isinstance(manifest, dict) or not required <= set(manifest):
        missing = sorted(required - set(manifest if isinstance(manifest, dict) else {}))
        if missing == ["edit_checksums"]:
            raise StateError(f"{file}: no edit checksums (saved by an older kmd). Move {path} away: the daemon then "
                             "re-applies the ledger's committed edits, each with its probes, and saves a new state")  # fmt: skip
        raise StateError(f"{file}: manifest lacks {missing}")
    if manifest["format"] != FORMAT:
        raise StateError(f"{file}: format {manifest['format']!r}, expected {FORMAT!r}")
    if config_hash(manifest["config"]) != manifest["config_hash"]:
        raise StateError(f"{file}: config does not match its hash (edited by hand or corrupted)")
    _check_edits(manifest, file)
    return manifest


def read_state(path: Path, host: ModelHost, *, digest: str | None = None,
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[EditRequest]]:  # fmt: skip
    """A saved state's manifest, tensors (on the host's device) and edit requests, checked
    (with `digest`: only the state of that digest)."""
    manifest = read_manifest(path, digest=digest)
    mismatches = host.identity.mismatches(manifest["model"])
    if mismatches:
        raise StateError(
            f"{path}: saved for another base model ({manifest['model'].get('name')}): " + "; ".join(mismatches)
        )
    info = manifest["tensors"]
    tensor_path = path / info["file"]
    if not tensor_path.is_file():
        raise StateError(f"{path}: tensor file {info['file']} is missing")
    blob = tensor_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != info["sha256"]:
        raise StateError(f"{tensor_path}: checksum mismatch (file corrupted or tampered with)")
    try:
        tensors = load_tensors_bytes(blob)
        requests = [EditRequest.from_dict(r) for r in manifest["edits"]]
    except Exception as exc:
        raise StateError(f"{path}: unreadable state ({exc})") from exc
    return manifest, {k: v.to(host.device) for k, v in tensors.items()}, requests


def load_editor(path: str | Path, host: ModelHost, *, digest: str | None = None) -> Editor:
    """The editor saved at `path` (`save_editor`), on `host`: refuses another base model,
    another backend's or a corrupted state (StateError)."""
    path = Path(path)
    manifest, tensors, requests = read_state(path, host, digest=digest)
    try:
        cls = get_backend(manifest["backend"])
        config = build_config(cls.config_class, manifest["config"], f"{path}/{MANIFEST}")
    except (UnknownBackendError, ProfileError, TypeError) as exc:
        raise StateError(f"{path}: {exc}") from exc
    editor = cls(host, config)
    editor.restore(requests, tensors, manifest["extra"], manifest.get("unchecked_edits", []))
    return editor


def reload_editor(editor: Editor, path: Path, *, digest: str | None = None) -> None:
    """Put `editor` back to the state it saved at `path`, in place: undoes everything
    applied or reverted since that save, exactly. (Its options stay as they are.)"""
    manifest, tensors, requests = read_state(path, editor.host, digest=digest)
    if manifest["backend"] != editor.name:
        raise StateError(f"{path}: saved by the {manifest['backend']} backend, not {editor.name}")
    editor.restore(requests, tensors, manifest["extra"], manifest.get("unchecked_edits", []))
