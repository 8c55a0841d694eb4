"""Run only the top of the network from a residual stream computed once.

An edit's optimisation changes something at layer `start` or above; everything below is
frozen, so it is computed once per edit instead of once per optimisation step. The
captured per-layer keyword arguments (attention mask, rotary embeddings...) are what the
model itself passed to each layer, so this works for any layout in the profile without
knowing how the family builds its masks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from kmd.editors.hooks import HookSpec, hooked, resolve_module

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost


class UpperStack:
    """Layers `start..L-1`, the final norm and the LM head, fed from a cached stream."""

    def __init__(
        self,
        host: ModelHost,
        start: int,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
        extra_specs: Sequence[HookSpec] = (),
    ) -> None:
        model, layout = host.model, host.profile.layout
        indices = range(start, host.num_layers)
        self.layers = [resolve_module(model, layout.path("layer", i)) for i in indices]
        self.norm = resolve_module(model, layout.final_norm)
        self.lm_head = resolve_module(model, layout.lm_head)
        captured: dict[int, tuple[tuple, dict[str, Any]]] = {}

        def capture(index: int):
            def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
                captured[index] = (args, dict(kwargs))

            return pre_hook

        specs = [HookSpec(layout.path("layer", i), capture(i), "forward_pre", with_kwargs=True) for i in indices]
        # Layers at or above `start` need not run in this forward: only what enters them is
        # kept. Those no extra spec reaches into return their input instead (exactly the
        # same captures, for a fraction of the forward).
        hooked_layers = [i for i in indices for spec in extra_specs if _inside(spec.path, layout.path("layer", i))]
        skipped = self.layers[max(hooked_layers, default=start - 1) + 1 - start :]
        with torch.no_grad(), hooked(model, [*specs, *extra_specs]):
            try:
                with _passing_through(skipped):
                    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except Exception:  # a family whose layer loop wants more than a tensor back: run them all
                captured.clear()
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        self.hidden = captured[start][0][0]  # (B, T, D): the residual stream entering layer `start`
        self.layer_inputs = [(captured[i][0][1:], captured[i][1]) for i in indices]

    def final_hidden(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) normalised last hidden states; hooks installed by the caller apply."""
        h = self.hidden if hidden is None else hidden
        for layer, (args, kwargs) in zip(self.layers, self.layer_inputs, strict=True):
            out = layer(h, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return self.norm(h)

    def logits_at(self, final_hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(K, V) logits at K (row, position) pairs only: the LM head is the costly part."""
        return self.lm_head(final_hidden[rows, positions])


def _inside(path: str, module_path: str) -> bool:
    return path == module_path or path.startswith(module_path + ".")


@contextmanager
def _passing_through(layers: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Each of `layers` returns its input hidden states unchanged (its hooks still run)."""

    def passthrough(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    own = [vars(layer).get("forward") for layer in layers]  # a wrapper set on the instance (accelerate's offload hooks)
    for layer in layers:
        layer.forward = passthrough  # an instance attribute: shadows the class's forward
    try:
        yield
    finally:
        for layer, forward in zip(layers, own, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def stack_above(host: ModelHost, layer: int, path: str, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[UpperStack, torch.Tensor]:  # fmt: skip
    """The training set-up of a memory that adds to the output of the module at `path`
    (a down_proj in layer `layer`; MEMOIR, WISE): one forward of (B, T) ids and mask gives
    the UpperStack of layers layer+1.. and the module's (B, T, d_ff) input, in float. Each
    optimisation step then runs the layers above only; the capture forward needs no logits,
    so the LM head reads only the last position."""
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args, output):
        seen["a"] = args[0]

    def last_only(module, args, output):  # skips most of the LM head
        return output[:, -1:]

    specs = [HookSpec(path, grab), HookSpec(host.profile.layout.final_norm, last_only)]
    stack = UpperStack(host, layer + 1, input_ids, attention_mask, extra_specs=specs)
    return stack, seen["a"].float()
