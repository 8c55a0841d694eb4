"""UpperStack: the captured stream and layer inputs, with the layers above skipped."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import kmd.editors.upper as upper
from kmd.editors.batching import teacher_forced_batch
from kmd.editors.hooks import HookSpec
from kmd.editors.upper import UpperStack


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


@pytest.mark.parametrize("start", [1, 2])
def test_the_capture_forward_skips_the_layers_above_and_captures_the_same(tiny_host, monkeypatch, start):
    """The layers at and above `start` do not run in the capture forward (their inputs are
    all that is kept), except those an extra hook reaches into; the stream, every layer's
    inputs and the stack's output equal those of the forward that runs every layer."""
    layout, model = tiny_host.profile.layout, tiny_host.model
    batch = teacher_forced_batch(tiny_host, [("the capital of France is", "Paris"), ("Alice works for", "Bob")])
    ran: list[int] = []
    # a layer that runs runs its MLP (a skipped one's own hooks still fire: it returns its input)
    specs = [HookSpec(f"{layout.path('layer', i)}.mlp", (lambda i: lambda m, a, o: ran.append(i))(i)) for i in range(tiny_host.num_layers)]
    seen: dict[str, torch.Tensor] = {}
    inner = HookSpec(f"{layout.path('layer', start)}.self_attn", lambda m, a, o: seen.update(attention=o))  # GRACE hooks its own layer

    from kmd.editors.hooks import hooked

    with hooked(model, specs):
        fast = UpperStack(tiny_host, start, batch.input_ids, batch.attention_mask)
    assert ran == list(range(start))
    ran.clear()
    with hooked(model, specs):
        hooked_inside = UpperStack(tiny_host, start, batch.input_ids, batch.attention_mask, extra_specs=[inner])
    assert ran == list(range(start + 1)) and "attention" in seen
    with monkeypatch.context() as m:
        m.setattr(upper, "_passing_through", lambda layers: nullcontext())
        full = UpperStack(tiny_host, start, batch.input_ids, batch.attention_mask)
    for stack in (fast, hooked_inside):
        assert torch.equal(stack.hidden, full.hidden) and _same(stack.layer_inputs, full.layer_inputs)
        assert torch.equal(stack.final_hidden(), full.final_hidden())
    assert all("forward" not in vars(layer) for layer in fast.layers)  # the layers are themselves again


def test_a_forward_set_on_a_layer_instance_is_put_back():
    """A wrapper set on a layer instance (accelerate's offload hooks do this) survives the skip."""
    layers = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    wrapper = layers[0].forward
    layers[0].forward = wrapper
    with upper._passing_through(layers):
        assert torch.equal(layers[0](torch.ones(1, 2)), torch.ones(1, 2))
    assert vars(layers[0])["forward"] is wrapper and "forward" not in vars(layers[1])
