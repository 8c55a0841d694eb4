"""Publishing and following states in process (SQLite ledger, tiny model): a replica
serves only checked, smoke-probed states and keeps the old one when a new one is bad."""

from __future__ import annotations

import json

import pytest

from daemon.helpers import write_curated, write_setup
from kmd.daemon.ledger import Ledger
from kmd.daemon.policy import load_policy
from kmd.daemon.replication import Replica, closest_state, published_dir
from kmd.daemon.service import Daemon
from kmd.daemon.settings import load_settings
from kmd.editors.model import ModelHost, ModelSettings
from kmd.editors.scoring import generate_text


@pytest.fixture
def writer(tmp_path, tiny_host):
    config = write_setup(tmp_path, [("France", "capital", "Berlin")])
    config.write_text(config.read_text() + "cluster: {publish_dir: published, keep_published: 2}\n")
    daemon = Daemon(load_settings(config), host=tiny_host)
    daemon.load()
    yield daemon
    daemon.close()


@pytest.fixture
def replica(writer, tiny_model_dir):
    # A host of its own: a replica is another process with its own copy of the model.
    host = ModelHost.load(ModelSettings(model=str(tiny_model_dir), device="cpu"))
    ledger = Ledger(writer.settings.database_url)
    yield Replica(host, ledger, load_policy(writer.settings.policy_path), writer.settings.publish_path)
    ledger.close()


PROMPTS = ["the capital of France is", "the capital of Spain is", "the dog and the cat", "Bob plays music"]


def answer(replica: Replica, prompt: str) -> str:
    return generate_text(replica.host, replica.editor, [prompt], 2)[0].strip()


def same_answers(replica: Replica, writer: Daemon) -> bool:
    """The replica serves exactly what the writer serves."""
    m = writer.maintainer
    return generate_text(replica.host, replica.editor, PROMPTS, 2) == generate_text(m.host, m.editor, PROMPTS, 2)


def test_replica_follows_commits_and_reverts_and_rejects_a_corrupted_state(writer, replica):
    publish_dir = writer.settings.publish_path
    assert replica.sync() and replica.readiness() == (True, f"ok: serving state {replica.loaded.version[:12]}")
    base = answer(replica, "the capital of France is")

    writer.cycle()
    (edit,) = writer.ledger.committed_edits()
    state = writer.ledger.published_state()
    assert state.edit_ids == (str(edit.id),) and state.term == writer.ledger.writer_term
    manifest = (published_dir(publish_dir, state.version) / "manifest.json").read_bytes()
    assert json.loads(manifest)["edits"][0]["edit_id"] == str(edit.id)
    assert not replica.readiness()[0] or replica.loaded.version != state.version  # not yet loaded
    assert replica.sync() and replica.readiness()[0]
    assert answer(replica, "the capital of France is") == "Berlin" != base
    assert same_answers(replica, writer)
    assert not replica.sync()  # nothing new

    # A new state whose tensors were damaged on the shared volume: refused; the replica
    # keeps serving the old state but is not ready.
    write_curated(writer.settings.policy_path.parent / "facts.jsonl", 2, [("Spain", "capital", "Rome")])
    writer.cycle()
    bad = writer.ledger.published_state()
    tensors = next(published_dir(publish_dir, bad.version).glob("tensors-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"\0" * 8)
    assert not replica.sync()
    ready, why = replica.readiness()
    assert not ready and "checksum" in why
    assert answer(replica, "the capital of France is") == "Berlin"

    # The writer reverts the first edit: the replica loads that state (its smoke probe
    # checks that the reverted target is gone) and answers as the writer does.
    writer.maintainer.revert(edit.id, reason="test", actor="test")
    assert replica.sync() and replica.readiness()[0]
    assert not answer(replica, "the capital of France is").startswith("Berlin")
    assert answer(replica, "the capital of Spain is").startswith("Rome")
    assert same_answers(replica, writer)
    assert len([p for p in publish_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 2  # keep_published
    assert (publish_dir / "chain-head.json").is_file()  # and the chain head beside them
    assert replica.loads == 3


def test_a_new_writer_restores_the_state_nearest_the_ledger(writer, tmp_path):
    writer.cycle()
    committed = {str(e.id) for e in writer.ledger.committed_edits()}
    published = published_dir(writer.settings.publish_path, writer.ledger.published_state().version)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert closest_state([empty, published], committed) == published
    assert closest_state([published, writer.maintainer.editor_dir], set()) == published  # a tie: the first


def test_adopting_a_state_copies_it_and_removes_the_tensor_files_it_does_not_name(writer, tmp_path):
    """What a new writer does when the published state is nearer the ledger than its own
    (the PostgreSQL takeover test runs it too): the tensor file, then the manifest, then
    the leftovers of the old state and of a crashed save go."""
    from kmd.daemon.replication import adopt_state
    from kmd.editors.state import MANIFEST, read_manifest

    writer.cycle()
    published = published_dir(writer.settings.publish_path, writer.ledger.published_state().version)
    mine = tmp_path / "editor"
    mine.mkdir()
    (mine / "tensors-0123456789abcdef.safetensors").write_bytes(b"an older state")
    (mine / ".tensors-crashed.partial").write_bytes(b"a save that never finished")
    adopt_state(published, mine)
    tensor_file = read_manifest(published)["tensors"]["file"]
    assert sorted(p.name for p in mine.iterdir()) == sorted([MANIFEST, tensor_file])
    assert (mine / MANIFEST).read_bytes() == (published / MANIFEST).read_bytes()
    assert (mine / tensor_file).read_bytes() == (published / tensor_file).read_bytes()
