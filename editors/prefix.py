"""Prefix injection shared by LLP and RECIPE: prepending b vectors at layer z, expressed as
extra key/value pairs at layers >= z.

LLP prepends an edit's b value vectors to the hidden-state sequence entering layer z.
Causal attention means those b positions never see the prompt: their states at every
layer >= z depend on the value vectors alone. So instead of lengthening the sequence
(which would change the KV cache, the masks and the positions of every row of a batch,
hit or not), we run the b vectors once through layers z..L-1 on their own, keep each
layer's (pre-RoPE) keys and values, and at serving time let the prompt tokens of a hit
row attend to them as well. The b positions sit just before the row's first real token
(positions p_first - b .. p_first - 1), exactly where prepending puts them.

With the softmax taken over [prefix; tokens], the attention output of a query is

    O = a * O_tokens + (1 - a) * O_prefix,   a = sigmoid(LSE_tokens - LSE_prefix)

where O_tokens is what the model computed anyway (the input of `o_proj`) and LSE are
the log-sum-exp of the scaled scores. Only the hit rows' `o_proj` inputs are replaced,
so other rows of the batch stay bit-identical to the base model, the model's own KV
cache is untouched, and decode steps just merge again against the cached keys.

Supported attention: Llama-style q/k/v/o projections with rotate-half RoPE and grouped
KV heads (Llama, Mistral without sliding window, Qwen2, SmolLM...). `check_supported`
refuses anything else instead of computing something wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kmd.editors.answer_stop import RoutedAnswers
from kmd.editors.hooks import HookSpec, hooked, resolve_module
from kmd.editors.protocol import EditorError
from kmd.editors.regroup import entries

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost


class UnsupportedModelError(RuntimeError):
    pass


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, hd); cos/sin (B or 1, T, hd)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, n_kv, S, hd) -> (B, n_kv * groups, S, hd), matching the model's head order."""
    if groups == 1:
        return x
    b, n_kv, s, hd = x.shape
    return x[:, :, None].expand(b, n_kv, groups, s, hd).reshape(b, n_kv * groups, s, hd)


def check_supported(model: nn.Module, attention: nn.Module, projections: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> None:
    config = model.config
    missing = [name for name in projections if not hasattr(attention, name)]
    problems = [f"attention lacks {missing}"] if missing else []
    if any(hasattr(attention, name) for name in ("q_norm", "k_norm")):
        problems.append("per-head q/k norms")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        problems.append("sliding-window attention")
    if getattr(config, "attn_logit_softcapping", None):
        problems.append("attention logit soft-capping")
    impl = getattr(config, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):
        problems.append(f"attention implementation {impl!r} (use sdpa or eager)")
    if problems:
        raise UnsupportedModelError(f"llp: unsupported attention in {type(model).__name__}: {', '.join(problems)}")


def causal_scores_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Apply the model's 4D attention mask (bool: True = attend; float: additive) or causal."""
    tq, s = scores.shape[-2:]
    if mask is None:
        if tq == 1:
            return scores
        allowed = torch.arange(s, device=scores.device)[None, :] <= (s - tq + torch.arange(tq, device=scores.device))[:, None]
        return scores.masked_fill(~allowed, float("-inf"))
    mask = mask[..., -tq:, :s]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask.to(scores.dtype)


def merge_prefix(
    o_in: torch.Tensor,  # (Bh, Tq, H * hd): the attention output before o_proj (hit rows)
    q: torch.Tensor,  # (Bh, H, Tq, hd) roped queries
    keys: torch.Tensor,  # (Bh, n_kv, S, hd) roped keys of the tokens (cache included)
    mask: torch.Tensor | None,  # the model's 4D mask for these rows, or None (causal)
    prefix_keys: torch.Tensor,  # (Bh, n_kv, b, hd) roped
    prefix_values: torch.Tensor,  # (Bh, n_kv, b, hd)
    scaling: float,
    prefix_mask: torch.Tensor | None = None,  # (Bh, b) bool, False at left padding
) -> torch.Tensor:
    """The attention output with the prefix positions added to the softmax (float32)."""
    bh, tq, width = o_in.shape
    heads = q.shape[1]
    groups = heads // keys.shape[1]
    q = q.float()
    scores = torch.matmul(q, repeat_kv(keys.float(), groups).transpose(-1, -2)) * scaling
    lse_tokens = torch.logsumexp(causal_scores_mask(scores, mask), dim=-1)  # (Bh, H, Tq)
    p_scores = torch.matmul(q, repeat_kv(prefix_keys.float(), groups).transpose(-1, -2)) * scaling  # (Bh, H, Tq, b)
    if prefix_mask is not None:
        p_scores = p_scores.masked_fill(~prefix_mask[:, None, None, :], float("-inf"))
    lse_prefix = torch.logsumexp(p_scores, dim=-1)
    o_prefix = torch.matmul(torch.softmax(p_scores, dim=-1), repeat_kv(prefix_values.float(), groups))
    alpha = torch.sigmoid(lse_tokens - lse_prefix)[..., None]  # (Bh, H, Tq, 1); 0 where no token is visible
    o_tokens = o_in.float().view(bh, tq, heads, -1).transpose(1, 2)
    merged = torch.where(alpha > 0, o_prefix + alpha * (o_tokens - o_prefix), o_prefix)
    return merged.transpose(1, 2).reshape(bh, tq, width).to(o_in.dtype)


class PrefixRunner:
    """Runs b vectors alone through layers z..L-1 and returns each layer's keys/values.

    Keys are returned before RoPE: their rotation depends on where a query row puts
    them (just before its first token), so it is applied at serving time.
    """

    def __init__(
        self, model: nn.Module, layers: list[nn.Module], attentions: list[nn.Module], kv_paths: list[tuple[str, str]], rotary: nn.Module
    ) -> None:
        self.model, self.layers, self.attentions, self.rotary = model, layers, attentions, rotary
        self.kv_paths = kv_paths  # per layer: the module paths of its k and v projections

    def __call__(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """values (E, b, D) -> keys, values (E, Lz, b, n_kv, hd)."""
        e, b, _ = values.shape
        positions = torch.arange(b, device=values.device)[None].expand(e, b)
        embeddings = self.rotary(values, positions)
        mask = None
        if b > 1:  # causal among the b positions, as an additive mask (valid for sdpa and eager)
            upper = torch.ones(b, b, dtype=torch.bool, device=values.device).triu(1)
            mask = torch.zeros(b, b, dtype=values.dtype, device=values.device).masked_fill(upper, torch.finfo(values.dtype).min)
            mask = mask[None, None]
        grabbed: dict[tuple[int, str], torch.Tensor] = {}

        def grab(index: int, part: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                grabbed[index, part] = output

            return hook

        specs = [
            HookSpec(path, grab(index, part))
            for index, paths in enumerate(self.kv_paths)
            for part, path in zip(("k", "v"), paths)
        ]
        h = values
        with hooked(self.model, specs):
            for layer in self.layers:  # the last layer's output is dropped; only its keys/values matter
                out = layer(
                    h, attention_mask=mask, position_ids=positions, position_embeddings=embeddings,
                    use_cache=False,
                )
                h = out[0] if isinstance(out, tuple) else out
        hd = self.attentions[0].head_dim
        keys = torch.stack([grabbed[i, "k"].view(e, b, -1, hd) for i in range(len(self.layers))], dim=1)
        vals = torch.stack([grabbed[i, "v"].view(e, b, -1, hd) for i in range(len(self.layers))], dim=1)
        return keys, vals


def rope_prefix(
    rotary: nn.Module, keys: torch.Tensor, p_first: torch.Tensor
) -> torch.Tensor:
    """keys (Bh, Lz, b, n_kv, hd) pre-RoPE -> (Bh, Lz, n_kv, b, hd) rotated to p_first - b + j."""
    bh, _, b, _, _ = keys.shape
    positions = p_first[:, None] - b + torch.arange(b, device=keys.device)[None]  # (Bh, b)
    cos, sin = rotary(keys, positions)  # (Bh, b, hd)
    k = keys.permute(0, 1, 3, 2, 4)  # (Bh, Lz, n_kv, b, hd)
    cos, sin = cos[:, None, None].to(k.dtype), sin[:, None, None].to(k.dtype)
    return k * cos + rotate_half(k) * sin


def find_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache an attention module was called with, whatever the keyword is called.

    transformers renamed it (`past_key_values` up to 5.23, `cache` from 5.24); looking it up
    by type keeps the merge from silently attending to the new tokens only (which is what
    a missed cache looks like: decode steps then disagree with a full forward)."""
    from transformers.cache_utils import Cache

    found = [value for value in kwargs.values() if isinstance(value, Cache)]
    if len(found) > 1:
        raise UnsupportedModelError(f"attention called with {len(found)} caches; cannot tell which one is the KV cache")
    return found[0] if found else None


def cache_keys(cache: Any, layer_idx: int) -> torch.Tensor | None:
    """The full (B, n_kv, S, hd) keys of one layer from a transformers Cache, after its update."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    keys = getattr(layers[layer_idx], "keys", None)
    return keys if isinstance(keys, torch.Tensor) and keys.numel() else None


def stack_left_padded(rows: Sequence[torch.Tensor], dim: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tensors whose lengths along `dim` differ -> one tensor with a new leading batch axis,
    each zero-padded on the left along `dim` to the longest, and the (B, n) bool mask of real
    positions (None when all have the same length).

    Left padding keeps each row's real positions just before its first token, where an
    unpadded prefix would be; masked out, the padding changes nothing."""
    lengths = [row.shape[dim] for row in rows]
    width = max(lengths)
    if all(length == width for length in lengths):
        return torch.stack(list(rows)), None
    shape = list(rows[0].shape)
    shape[dim] = width
    out = rows[0].new_zeros((len(rows), *shape))
    mask = torch.zeros(len(rows), width, dtype=torch.bool, device=rows[0].device)
    for index, (row, length) in enumerate(zip(rows, lengths)):
        out[index].narrow(dim, width - length, length).copy_(row)
        mask[index, width - length :] = True
    return out, mask


@dataclass
class Injection:
    """Which rows of the current batch get which prefix (keys pre-RoPE, per layer)."""

    rows: torch.Tensor  # (Bh,)
    keys: torch.Tensor  # (Bh, L, n, n_kv, hd)
    values: torch.Tensor  # (Bh, L, n, n_kv, hd)
    p_first: torch.Tensor  # (Bh,) position id of each row's first token
    # (Bh, n) bool: False at the left padding of rows whose prefix is shorter than n (RECIPE's
    # prefixes differ in length); None when every row's prefix has all n positions.
    prefix_mask: torch.Tensor | None = None
    roped: torch.Tensor | None = None  # (Bh, L, n_kv, n, hd), computed once per context
    stash: dict[str, Any] = field(default_factory=dict)
    # the routed rows' answers (editors/answer_stop.py): where the prefix still acts and what
    # the LM head's pointer does; None: nothing to follow (the prefix acts everywhere)
    answers: RoutedAnswers | None = None

    @staticmethod
    def regrouped(how: Any, parts: Sequence[Injection | None]) -> Injection | None:
        """The injection of a regrouped batch (`Editor._regroup`; `how`: an
        `editors.regroup.Regroup`, `parts`: each part's injection, None where no row was
        routed): each kept routed row keeps its prefix, its positions and its answer tracking.
        Prefixes of different lengths are left-padded and masked, as within one batch."""
        rows, picks = how.routed([p.rows if p is not None else None for p in parts])
        live = [(p, k.to(p.keys.device)) for p, k in zip(parts, picks, strict=True) if p is not None and k.numel()]
        if not live:
            return None
        width = max(p.keys.shape[2] for p, _ in live)  # prefix positions n (RECIPE's differ per edit)
        keys, values, masks = [], [], []
        for p, k in live:
            n = p.keys.shape[2]
            mask = p.prefix_mask[k] if p.prefix_mask is not None else torch.ones(len(k), n, dtype=torch.bool, device=k.device)
            part_keys, part_values = p.keys[k], p.values[k]  # (Bh_k, L, n, n_kv, hd)
            if n < width:  # left padding: the real positions stay just before the row's first token
                pad = (*part_keys.shape[:2], width - n, *part_keys.shape[3:])
                part_keys = torch.cat([part_keys.new_zeros(pad), part_keys], dim=2)
                part_values = torch.cat([part_values.new_zeros(pad), part_values], dim=2)
                mask = torch.cat([mask.new_zeros(len(k), width - n), mask], dim=1)
            keys.append(part_keys)
            values.append(part_values)
            masks.append(mask)
        prefix_mask = torch.cat(masks)
        answers = RoutedAnswers.regrouped(rows, [(p.answers, k) for p, k in live])
        # `roped` is recomputed by the next forward (the merge hook), `answers` stepped by it
        return Injection(rows=rows, keys=torch.cat(keys), values=torch.cat(values),
                         p_first=torch.cat([p.p_first[k] for p, k in live]),
                         prefix_mask=None if bool(prefix_mask.all()) else prefix_mask, answers=answers)  # fmt: skip

    def decode_step(self, ids: torch.Tensor) -> None:
        """ids (B, t) a decode step's new tokens (the whole batch): follow the answers."""
        if self.answers is not None:
            self.answers.step(ids)

    def answering(self, tq: int) -> torch.Tensor | None:
        """(Bh, tq) bool: the query positions of the forward in progress the prefix acts on
        (None: every position)."""
        return None if self.answers is None else self.answers.answering(tq)


def regrouped_decisions(name: str, how: Any, decisions: list[dict[str, Any]]) -> dict[str, Any]:
    """A prefix backend's `Editor._regroup` (LLP, RECIPE): each routed row of a regrouped
    batch keeps its prefix and answer state (`how`: an `editors.regroup.Regroup`;
    `decisions`: each part's routing decisions). {} when none of the parts is this backend's."""
    mine = entries(decisions, name)
    if mine is None:
        return {}
    if not all(m["done"] for m in mine):
        raise EditorError(f"{name}: cannot regroup a batch before its prefill")
    return {name: {"injection": Injection.regrouped(how, [m["injection"] for m in mine]), "done": True}}


def answers_of(injection: Injection | None) -> RoutedAnswers | None:
    """The routed rows' answers of the forward in progress, for the LM head's pointer hook."""
    return None if injection is None else injection.answers


class PrefixInjector:
    """Prefix keys/values for every layer, and the hooks that merge them into routed rows."""

    def __init__(self, host: ModelHost, layers: Sequence[int], owner: str) -> None:
        model, layout = host.model, host.profile.layout
        self.owner = owner  # the backend's name, for error messages
        self.layer_paths = [layout.path("layer", i) for i in layers]
        self.attn_paths = [layout.path("attention", i) for i in layers]
        self.attentions = [resolve_module(model, p) for p in self.attn_paths]
        self.proj = {part: getattr(layout, f"{part}_proj") for part in "qkvo"}  # names inside the attention block
        check_supported(model, self.attentions[0], list(self.proj.values()))
        parent = resolve_module(model, layout.layers.rsplit(".", 1)[0])
        self.rotary = getattr(parent, "rotary_emb", None)
        if self.rotary is None:
            raise UnsupportedModelError(f"{owner}: {type(parent).__name__} has no rotary_emb module")
        layers = [resolve_module(model, p) for p in self.layer_paths]
        self.runner = PrefixRunner(model, layers, self.attentions, [(f"{p}.{self.proj['k']}", f"{p}.{self.proj['v']}") for p in self.attn_paths], self.rotary)
        attn = self.attentions[0]
        self.kv_shape = (len(self.layer_paths), getattr(attn, self.proj["k"]).out_features // attn.head_dim, attn.head_dim)

    @torch.no_grad()
    def prefix_kv(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, n, D) vectors -> keys, values (E, L, n, n_kv, hd) at the injector's layers, keys before RoPE."""
        return self.runner(vectors)

    def specs(self, current: Callable[[], Injection | None]) -> list[HookSpec]:
        specs = []
        for j, path in enumerate(self.attn_paths):
            specs += [
                HookSpec(path, self._attn_pre(current), "forward_pre", with_kwargs=True),
                HookSpec(f"{path}.{self.proj['q']}", self._stash(current, "q")),
                HookSpec(f"{path}.{self.proj['k']}", self._stash(current, "k")),
                HookSpec(f"{path}.{self.proj['o']}", self._merge_hook(current, j), "forward_pre"),
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
                    "cache": find_cache(kwargs),
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
                    raise UnsupportedModelError(f"{self.owner}: cannot read keys from {type(stash['cache']).__name__}")
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
                o_in[rows], q, keys, mask, injection.roped[:, j], prefix_values.to(o_in.dtype), attention.scaling,
                injection.prefix_mask,
            )
            answering = injection.answering(tq)  # (Bh, tq)
            if answering is not None:  # positions past the stated answer run as the base model
                merged = torch.where(answering[..., None], merged, o_in[rows])
            return (o_in.index_copy(0, rows, merged),)

        return hook
