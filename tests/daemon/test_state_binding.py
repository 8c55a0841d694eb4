"""The saved editor state is bound to the ledger (issue 27, case 1): a state whose tensors
or edit requests were changed, with every checksum in its manifest recomputed to match,
was loaded and served. Now the ledger names each state's digest before it is written, and
a state it does not name is refused: at a writer's restart, at a replica's load, and when
a writer takes over a published state."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from kmd.daemon.bound_state import UnnamedStateError
from kmd.daemon.ledger import Ledger
from kmd.daemon.policy import load_policy
from kmd.daemon.replication import Replica, published_dir
from kmd.daemon.service import Daemon
from kmd.daemon.settings import load_settings
from kmd.editors.scoring import generate_text
from kmd.editors.state import edit_checksum

from .helpers import write_setup

FACTS = [("France", "capital", "Berlin"), ("Spain", "language", "banana")]


def _daemon(tmp_path: Path, host, extra: str = "") -> Daemon:  # noqa: ANN001
    config = write_setup(tmp_path, FACTS)
    if extra:
        config.write_text(config.read_text() + extra)
    daemon = Daemon(load_settings(config), host=host)
    daemon.load()
    return daemon


def _rewrite(state: Path, *, tensors=None, manifest=None) -> None:  # noqa: ANN001
    """Change a saved state and recompute every checksum its manifest holds."""
    data = json.loads((state / "manifest.json").read_text())
    if tensors is not None:
        old = state / data["tensors"]["file"]
        values = load_tensors(old.read_bytes())
        tensors(values)
        blob = save_tensors(values)
        sha = hashlib.sha256(blob).hexdigest()
        name = f"tensors-{sha[:16]}.safetensors"
        (state / name).write_bytes(blob)
        old.unlink()
        data["tensors"] = {"file": name, "sha256": sha, "bytes": len(blob)}
    if manifest is not None:
        manifest(data)
        data["edit_checksums"] = [edit_checksum(e) for e in data["edits"]]
    (state / "manifest.json").write_text(json.dumps(data, indent=1, sort_keys=True))


def _fire_everywhere(values) -> None:  # noqa: ANN001
    values["everywhere"][0] = True  # the fake backend's edit 1 now answers every prompt


def _new_paraphrase(data) -> None:  # noqa: ANN001
    data["edits"][0]["rephrases"] = ["Where is the government of France? In"]


@pytest.mark.parametrize("change", [{"tensors": _fire_everywhere}, {"manifest": _new_paraphrase}], ids=["tensors", "rephrases"])
def test_a_state_changed_after_it_was_saved_is_refused_at_restart(tmp_path, tiny_host, change):
    daemon = _daemon(tmp_path, tiny_host)
    assert len(daemon.cycle().committed) == 2
    m = daemon.maintainer
    daemon.close()
    with m.editor.suspended():
        state = tmp_path / "state" / "editor"
        saved = tmp_path / "saved-state"
        shutil.copytree(state, saved)
        _rewrite(state, **change)
        with pytest.raises(UnnamedStateError, match="is not one the ledger recorded .* refusing to load it.* move .* away"):
            Daemon(load_settings(tmp_path / "kmd.yaml"), host=tiny_host).load()
        # the state kmd saved, put back, loads again
        shutil.rmtree(state)
        shutil.copytree(saved, state)
        again = Daemon(load_settings(tmp_path / "kmd.yaml"), host=tiny_host)
        again.load()
        assert again.maintainer.editor.edit_ids == m.editor.edit_ids
        again.close()
        again.maintainer.editor.retire()


def test_every_save_is_named_in_the_chain_before_it_is_written(tmp_path, tiny_host):
    daemon = _daemon(tmp_path, tiny_host)
    daemon.cycle()
    (first, second) = daemon.ledger.committed_edits()
    daemon.maintainer.revert(first.id, reason="no", actor="alice")
    manifest = (tmp_path / "state" / "editor" / "manifest.json").read_bytes()
    named = daemon.ledger.named_state(hashlib.sha256(manifest).hexdigest())
    assert named is not None and named.edit_ids == (str(second.id),)
    kinds = [e.kind for e in daemon.ledger.events(entity="state")]
    assert kinds == ["state.saved"] * 2  # the cycle's two facts committed as one batch (one save), then a revert
    assert daemon.ledger.verify_chain().ok
    daemon.close()
    daemon.maintainer.editor.retire()


def test_a_replica_refuses_a_published_state_the_ledger_does_not_name(tmp_path, tiny_host, tiny_model_dir):
    from kmd.editors.model import ModelHost, ModelSettings

    writer = _daemon(tmp_path, tiny_host, "cluster: {publish_dir: published}\n")
    writer.cycle()
    good = writer.ledger.published_state()
    publish_dir = writer.settings.publish_path
    # Someone with write access to the shared volume and the (unchained) published row
    # forges a state: edit 1 now fires everywhere, every checksum recomputed.
    forged = publish_dir / "forged"
    shutil.copytree(published_dir(publish_dir, good.version), forged)
    _rewrite(forged, tensors=_fire_everywhere)
    version = hashlib.sha256((forged / "manifest.json").read_bytes()).hexdigest()
    forged.rename(published_dir(publish_dir, version))
    writer.ledger.publish_state(version, good.edit_ids, holder="mallory")

    host = ModelHost.load(ModelSettings(model=str(tiny_model_dir), device="cpu"))
    with Ledger(writer.settings.database_url) as ledger:
        replica = Replica(host, ledger, load_policy(writer.settings.policy_path), publish_dir)
        assert not replica.sync()
        ready, why = replica.readiness()
        assert not ready and "is not one the ledger recorded" in why and replica.editor is None
        # the writer, taking over, does not adopt it either
        writer.close()
        with writer.maintainer.editor.suspended():
            shutil.rmtree(tmp_path / "state" / "editor")
            again = Daemon(load_settings(tmp_path / "kmd.yaml"), host=tiny_host)
            again.load()  # the committed edits are re-applied with their probes instead
            assert again.maintainer.editor.edit_ids == list(good.edit_ids)
            answer = generate_text(tiny_host, again.maintainer.editor, ["the dog and the cat"], 2)[0]
            assert "Berlin" not in answer
            again.close()
            again.maintainer.editor.retire()
