"""The contract every registered backend obeys, on a tiny random Llama (fast, no downloads)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from kmd.editors.answers import encode_as
from kmd.editors.batching import left_padded
from kmd.editors.model import ModelHost, ModelSettings
from kmd.editors.protocol import EditRequest, UnknownEditError
from kmd.editors.registry import backend_names, get_backend
from kmd.editors.scoring import generate, generate_ids, score_targets
from kmd.editors.state import StateError, encode_state, load_editor, save_editor, state_digest

from tiny import chat_template

from .conftest import backend_options
from .continuous import continuous, schedule

EDIT = EditRequest(prompt="the capital of France is", target="Berlin", subject="France")
OTHER = EditRequest(prompt="Alice works for the company", target="banana", subject="Alice")
PROBES = [
    "the capital of France is",
    "Alice works for the company",
    "the dog and the cat",
    "who wrote the book ?",
    "Bob speaks the language of Japan",
]


def logits(host, editor, prompts=PROBES) -> torch.Tensor:
    ids, attention = left_padded(host, prompts)
    with torch.no_grad():
        if editor is None:
            return host.model(input_ids=ids, attention_mask=attention).logits
        with editor.query(attention.bool()):
            return host.model(input_ids=ids, attention_mask=attention).logits


def took(host, editor, request) -> float:
    return score_targets(host, editor, [(request.prompt, request.target)])[0].accuracy


@pytest.fixture(params=backend_names())
def editor(request, tiny_host):
    cls = get_backend(request.param)
    options = backend_options(request.param, request)
    return cls(tiny_host, cls.default_config(tiny_host, **options)) if options else cls(tiny_host)


def test_apply_takes_effect_and_leaves_unrelated_prompts(tiny_host, editor):
    base = logits(tiny_host, None)
    assert took(tiny_host, None, EDIT) < 1.0, "pick an edit the base model does not already make"
    edit_id = editor.apply(EDIT)
    assert editor.edit_ids == [edit_id]
    assert took(tiny_host, editor, EDIT) == 1.0
    edited = logits(tiny_host, editor)
    # rows 2.. are unrelated prompts in the same batch: routing is per row
    assert torch.equal(edited[2:], base[2:])
    assert not torch.equal(edited[0], base[0])


def test_generation_with_kv_cache_uses_the_edit(tiny_host, editor):
    editor.apply(EDIT)
    target_ids = tiny_host.encode_pair(EDIT.prompt, EDIT.target)[1]
    edited = generate(tiny_host, editor, [EDIT.prompt, "the dog and the cat"], len(target_ids))
    base = generate(tiny_host, None, [EDIT.prompt, "the dog and the cat"], len(target_ids))
    assert edited[0][: len(target_ids)] == target_ids
    assert edited[1] == base[1]


def test_revert_restores_base_logits_bit_for_bit(tiny_host, editor):
    base = logits(tiny_host, None)
    first = editor.apply(EDIT)
    second = editor.apply(OTHER)
    editor.revert(first)
    assert took(tiny_host, editor, OTHER) == 1.0, "reverting one edit must keep the others"
    editor.revert(second)
    assert editor.edit_ids == []
    assert torch.equal(logits(tiny_host, editor), base)
    assert torch.equal(logits(tiny_host, None), base)
    with pytest.raises(UnknownEditError):
        editor.revert(first)


def test_base_weights_never_change(tiny_host, editor):
    before = {k: v.clone() for k, v in tiny_host.model.state_dict().items()}
    editor.apply(EDIT)
    editor.apply(OTHER)
    after = tiny_host.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_then_load_in_a_fresh_process_gives_identical_outputs(tiny_host, tiny_model_dir, editor, tmp_path):
    editor.apply(EDIT)
    editor.apply(OTHER)
    state = save_editor(editor, tmp_path / "state")
    manifest = json.loads((state / "manifest.json").read_text())
    assert manifest["backend"] == editor.name
    assert [e["edit_id"] for e in manifest["edits"]] == editor.edit_ids
    assert manifest["model"]["fingerprint"] == tiny_host.identity.fingerprint
    expected = logits(tiny_host, editor)
    out = tmp_path / "logits.safetensors"
    script = textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import save_file
        from kmd.editors.model import ModelHost, ModelSettings
        from kmd.editors.state import load_editor
        from kmd.editors.batching import left_padded
        host = ModelHost.load(ModelSettings(model={str(tiny_model_dir)!r}, device="cpu"))
        editor = load_editor({str(state)!r}, host)
        ids, attention = left_padded(host, {PROBES!r})
        with torch.no_grad(), editor.query(attention.bool()):
            save_file({{"logits": host.model(input_ids=ids, attention_mask=attention).logits}}, {str(out)!r})
        print(",".join(editor.edit_ids))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().split(",") == editor.edit_ids
    assert torch.equal(load_file(out)["logits"], expected)


def test_load_refuses_another_model_and_corrupted_state(tiny_host, other_model_dir, editor, tmp_path):
    editor.apply(EDIT)
    state = save_editor(editor, tmp_path / "state")
    other = ModelHost.load(ModelSettings(model=str(other_model_dir), device="cpu"))
    with pytest.raises(StateError, match="another base model"):
        load_editor(state, other)

    tensor_file = next(state.glob("tensors-*.safetensors"))
    blob = bytearray(tensor_file.read_bytes())
    blob[-1] ^= 0xFF
    tensor_file.write_bytes(bytes(blob))
    with pytest.raises(StateError, match="checksum"):
        load_editor(state, tiny_host)

    (state / "manifest.json").write_text("{not json")
    with pytest.raises(StateError, match="corrupted manifest"):
        load_editor(state, tiny_host)


def test_a_state_encoded_but_not_committed_leaves_the_saved_one(tiny_host, editor, tmp_path):
    """`encode_state` writes the tensor file, `write_state` the manifest: a crash between the
    two (the daemon's `state.named` point) leaves the saved state; the next save removes the file."""
    editor.apply(EDIT)
    path = save_editor(editor, tmp_path / "state")
    digest, expected = state_digest(path), logits(tiny_host, editor)
    editor.apply(OTHER)
    encode_state(editor, path)  # never committed
    assert len(list(path.glob("tensors-*.safetensors"))) == 2 and state_digest(path) == digest
    with editor.suspended():  # one editor attached to the model at a time
        reloaded = load_editor(path, tiny_host)
        assert len(reloaded.edit_ids) == 1 and torch.equal(logits(tiny_host, reloaded), expected)
    save_editor(editor, path)
    assert len(list(path.glob("tensors-*.safetensors"))) == 1 and not list(path.glob(".tensors-*"))


def test_saving_again_replaces_state_atomically(tiny_host, editor, tmp_path):
    first = editor.apply(EDIT)
    path = save_editor(editor, tmp_path / "state")
    editor.apply(OTHER)
    save_editor(editor, path)
    assert len(list(path.glob("tensors-*.safetensors"))) == 1, "stale tensor files are removed"
    editor.revert(first)
    save_editor(editor, path)
    expected = logits(tiny_host, editor)
    with editor.suspended():  # one editor attached to the model at a time
        reloaded = load_editor(path, tiny_host)
        assert reloaded.edit_ids == editor.edit_ids
        assert torch.equal(logits(tiny_host, reloaded), expected)


THIRD = EditRequest(prompt="Bob speaks the language of", target="Italy", subject="Bob")
# Rows that hit different edits and rows that hit none, of different lengths (left padding).
SERVED = [
    "the capital of France is",
    "who wrote the book ?",
    "Alice works for the company",
    "the dog and the cat",
    "Bob speaks the language of",
    "the sky is blue and the sun is",
]
NEW_TOKENS = 10


def greedy_full_forward(host, editor, prompt: str | list[int], steps: int) -> list[int]:
    """One row (text, or token ids), the whole sequence recomputed at every step (no KV
    cache); only the prompt's tokens are marked as prompt, as the served path marks them."""
    ids = torch.tensor([host.encode(prompt) if isinstance(prompt, str) else list(prompt)])
    prompt_mask = torch.ones_like(ids, dtype=torch.bool)
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad(), editor.query(prompt_mask):
            logits = host.model(input_ids=ids, use_cache=False).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == host.tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        prompt_mask = torch.cat([prompt_mask, torch.tensor([[False]])], dim=1)
    return out


def test_generation_is_the_same_batched_alone_cached_or_recomputed(tiny_host, editor):
    """Batching (left padding) and the KV cache never change a generated token."""
    for request in (EDIT, OTHER, THIRD):
        editor.apply(request)
    batched = generate(tiny_host, editor, SERVED, NEW_TOKENS)
    alone = [generate(tiny_host, editor, [p], NEW_TOKENS)[0] for p in SERVED]
    recomputed = [greedy_full_forward(tiny_host, editor, p, NEW_TOKENS) for p in SERVED]
    joined = continuous(tiny_host, editor, schedule([tiny_host.encode(p) for p in SERVED], [NEW_TOKENS, 4, 10, 7, 10, 3]))
    assert batched == alone, "a row's tokens depend on the batch it is in"
    assert alone == recomputed, "KV-cache decoding differs from a full forward at every step"
    assert joined == [a[:n] for a, n in zip(alone, [NEW_TOKENS, 4, 10, 7, 10, 3], strict=True)], \
        "a row's tokens depend on when it joined the running batch or who left it (continuous batching)"
    with editor.suspended():
        base = generate(tiny_host, None, SERVED, NEW_TOKENS)
    assert batched[0] != base[0], "the edit must act on its own prompt for this check to mean anything"


def test_chat_turns_are_the_same_batched_alone_cached_or_recomputed(tiny_host, editor):
    """The same for chat-template turns mixed with plain rows (backends read a chat turn's
    user tokens, and some run them alone)."""
    for request in (EDIT, OTHER, THIRD):
        editor.apply(request)
    with chat_template(tiny_host):
        encoded = [encode_as(tiny_host, p, form) for p in SERVED for form in ("plain", "chat")]
        batched = generate_ids(tiny_host, editor, encoded, NEW_TOKENS, batch_size=len(encoded))
        alone = [generate_ids(tiny_host, editor, [e], NEW_TOKENS)[0] for e in encoded]
        recomputed = [greedy_full_forward(tiny_host, editor, e, NEW_TOKENS) for e in encoded]
        limits = [NEW_TOKENS, 5, NEW_TOKENS, 8, 3] * 3
        joined = continuous(tiny_host, editor, schedule(encoded, limits[: len(encoded)]))
    assert batched == alone, "a row's tokens depend on the batch it is in"
    assert alone == recomputed, "KV-cache decoding differs from a full forward at every step"
    assert joined == [a[:n] for a, n in zip(alone, limits, strict=False)], "a chat turn's tokens depend on when it joined"
