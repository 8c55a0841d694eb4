"""Continuous prompts prepended to the token embeddings, served per row as extra keys/values.

Prepending n vectors before a row's first token means, with causal attention, that their
states at every layer depend on the vectors alone. So (as LLP does at its injection layer,
see editors/llp/attention.py) each edit's vectors run once through all layers on their
own (`PrefixRunner`), their per-layer keys/values are stored, and at serving time only the
routed rows' attention outputs are merged with them. Other rows, the model's KV cache and
its masks are untouched; decode steps merge again against the cached keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kmd.editors.hooks import HookSpec, resolve_module
from kmd.editors.llp.attention import (
    PrefixRunner,
    UnsupportedModelError,
    cache_keys,
    check_supported,
    merge_prefix,
    rope,
    rope_prefix,
)

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost


@dataclass
class Injection:
    """Which rows of the current batch get which prefix (keys pre-RoPE, per layer)."""

    rows: torch.Tensor  # (Bh,)
    keys: torch.Tensor  # (Bh, L, n, n_kv, hd)
    values: torch.Tensor  # (Bh, L, n, n_kv, hd)
    p_first: torch.Tensor  # (Bh,) position id of each row's first token
    roped: torch.Tensor | None = None  # (Bh, L, n_kv, n, hd), computed once per context
    stash: dict[str, Any] = field(default_factory=dict)


class PrefixInjector:
    """Prefix keys/values for every layer, and the hooks that merge them into routed rows."""

    def __init__(self, host: ModelHost) -> None:
        model, layout = host.model, host.profile.layout
        self.layer_paths = [layout.path("layer", i) for i in range(host.num_layers)]
        self.attn_paths = [f"{p}.self_attn" for p in self.layer_paths]
        self.attentions = [resolve_module(model, p) for p in self.attn_paths]
        check_supported(model, self.attentions[0])
        parent = resolve_module(model, layout.layers.rsplit(".", 1)[0])
        self.rotary = getattr(parent, "rotary_emb", None)
        if self.rotary is None:
            raise UnsupportedModelError(f"recipe: {type(parent).__name__} has no rotary_emb module")
        layers = [resolve_module(model, p) for p in self.layer_paths]
        self.runner = PrefixRunner(model, layers, self.attentions, self.attn_paths, self.rotary)
        attn = self.attentions[0]
        self.kv_shape = (host.num_layers, attn.k_proj.out_features // attn.head_dim, attn.head_dim)

    @torch.no_grad()
    def prefix_kv(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, n, D) prompt vectors -> keys, values (E, L, n, n_kv, hd), keys before RoPE."""
        return self.runner(vectors)

    def specs(self, current: Callable[[], Injection | None]) -> list[HookSpec]:
        specs = []
        for j, path in enumerate(self.attn_paths):
            specs += [
                HookSpec(path, self._attn_pre(current), "forward_pre", with_kwargs=True),
                HookSpec(f"{path}.q_proj", self._stash(current, "q")),
                HookSpec(f"{path}.k_proj", self._stash(current, "k")),
                HookSpec(f"{path}.o_proj", self._merge_hook(current, j), "forward_pre"),
            ]
        return specs

    @staticmethod
    def _attn_pre(current):
        def hook(module, args, kwargs):
            injection = current()
            if injection is not None:
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                injection.stash = {
                    "embeddings": kwargs.get("position_embeddings"),
                    "mask": kwargs.get("attention_mask"),
                    "cache": kwargs.get("past_key_values"),
                    "shape": hidden.shape[:2],
                }
            return None

        return hook

    @staticmethod
    def _stash(current, part: str):
        def hook(module, args, output):
            injection = current()
            if injection is not None:
                injection.stash[part] = output
            return None

        return hook

    def _merge_hook(self, current, j: int):
        attention = self.attentions[j]

        def hook(module, args):
            injection = current()
            if injection is None:
                return None
            stash, rows = injection.stash, injection.rows
            o_in = args[0]
            bh, tq, hd = len(rows), o_in.shape[1], attention.head_dim
            cos, sin = stash["embeddings"]
            if cos.shape[0] > 1:
                cos, sin = cos[rows], sin[rows]
            q = rope(stash["q"][rows].view(bh, tq, -1, hd).transpose(1, 2), cos, sin)
            if stash["cache"] is not None:
                keys = cache_keys(stash["cache"], attention.layer_idx)
                if keys is None:
                    raise UnsupportedModelError(f"recipe: cannot read keys from {type(stash['cache']).__name__}")
                keys = keys[rows]
            else:
                keys = rope(stash["k"][rows].view(bh, tq, -1, hd).transpose(1, 2), cos, sin)
            mask = stash["mask"]
            if mask is not None and mask.shape[0] > 1:
                mask = mask[rows]
            if injection.roped is None:
                injection.roped = rope_prefix(self.rotary, injection.keys, injection.p_first)
            prefix_values = injection.values[:, j].transpose(1, 2)  # (Bh, n_kv, n, hd)
            merged = merge_prefix(
                o_in[rows], q, keys, mask, injection.roped[:, j], prefix_values.to(o_in.dtype), attention.scaling
            )
            return (o_in.index_copy(0, rows, merged),)

        return hook
