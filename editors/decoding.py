"""Batched decoding that rows join and leave: the model runner of the serving engine.

    batch = DecodeBatch.prefill(host, editor, [ids_a, ids_b])   # one left-padded forward
    batch.logits                                  # (B, V) float32: each row's next-token logits
    batch.step(tokens)                            # (B,) each row's chosen token: one decode step
    batch = DecodeBatch.regroup([(batch, [0, 2]), (joining, [0])])   # rows 1.. left, one joined

What happens to a row is what `scoring.generate_ids` (transformers' `generate`, greedy, KV
cache) does to it: the same forwards, inputs, position ids (count of real tokens - 1) and
attention masks, routed by `editor.query(prompt_mask)` at the prefill, the decision kept
for the decode steps. A batch of other rows only adds left padding, as in `generate_ids`:

- the KV cache is (B, n_kv, S, hd) per layer with every row left-padded to S; regrouping
  drops the rows that leave (with the columns only they needed), left-pads the batches to
  the longest S and stacks the rows (the attention masks likewise), and a row's positions
  never change, so it keeps seeing exactly its own tokens;
- the routing decisions go with the rows (`Editor.regroup`: editors/regroup.py).

So a greedy row generates the same tokens alone, in a batch, joining one mid-way, or
recomputed from scratch at every step (tests/contract). `editor=None` is the base model:
its forwards run under `protocol.base_model()`, so no editor acts on them, whatever hooks
other threads' editors have installed (the console's "before" answers).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from kmd.editors.batching import left_padded_ids
from kmd.editors.protocol import Routing, base_model

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import Editor


@functools.cache
def _forward_options(model_class: type) -> tuple[str, bool]:
    """The name of the cache argument (transformers renamed it: `past_key_values` up to 5.23,
    `cache` from 5.24) and whether the model takes `logits_to_keep`."""
    parameters = inspect.signature(model_class.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values"), "logits_to_keep" in parameters


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class DecodeBatch:
    """Rows decoding together on one editor (or the base model), their KV cache kept between steps."""

    def __init__(self, host: ModelHost, editor: Editor | None, routing: Routing | None, cache: Any,
                 attention: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor) -> None:  # fmt: skip
        self.host, self.editor, self.routing = host, editor, routing
        self.cache = cache  # transformers' DynamicCache: per layer keys, values (B, n_kv, S, hd), rows left-padded
        self.attention = attention  # (B, S) long: 1 at each row's real tokens
        self.positions = positions  # (B,) the position id of each row's last token
        self.logits = logits  # (B, V) float32: each row's next-token logits

    @property
    def size(self) -> int:
        return int(self.attention.shape[0])

    # ----- forwards ---------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def prefill(cls, host: ModelHost, editor: Editor | None, prompts: Sequence[Sequence[int]]) -> DecodeBatch:
        """The prompts' forward (left-padded, routed on their prompt tokens): logits of each
        row's first new token, and the cache and routing its decode steps continue from."""
        ids, attention = left_padded_ids(host, prompts)  # (B, T)
        positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 0)  # as transformers' generate
        cache = _new_cache([])
        if editor is None:
            with base_model():
                logits = _forward(host.model, ids, attention, positions, cache)
            routing = None
        else:
            with editor.query(attention.bool()) as routing:
                logits = _forward(host.model, ids, attention, positions, cache)
        return cls(host, editor, routing, cache, attention, positions[:, -1].clone(), logits)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> None:
        """Feed every row its next token (B,): one decode step; `logits` then follow it."""
        self.attention = torch.cat([self.attention, self.attention.new_ones(self.size, 1)], dim=1)
        self.positions = self.positions + 1
        with self._routed():
            self.logits = _forward(self.host.model, tokens.view(-1, 1).to(self.attention.device), self.attention,
                                   self.positions[:, None], self.cache)  # fmt: skip

    @contextmanager
    def _routed(self) -> Iterator[None]:
        if self.editor is None:
            with base_model():
                yield
        else:
            with self.editor.resume(self.routing):
                yield

    # ----- rows joining and leaving -----------------------------------------------------------
    @classmethod
    def regroup(cls, parts: Sequence[tuple[DecodeBatch, Sequence[int]]]) -> DecodeBatch | None:
        """One batch of rows of `parts` (all on the same host and editor): batch k gives its
        rows `rows_k`, in that order, after those of batch k - 1; the others ended. None when
        no row is left. One copy of the KV cache, whatever joins and leaves."""
        parts = [(b, list(rows)) for b, rows in parts if len(rows)]
        if not parts:
            return None
        first = parts[0][0]
        if any(b.editor is not first.editor or b.host is not first.host for b, _ in parts):
            raise ValueError("only batches of one editor (or all of the base model) can decode together")
        if len(parts) == 1 and parts[0][1] == list(range(first.size)):
            return first  # nothing joined or left
        kept = []  # per part: row index, its attention, the first column a kept row attends to
        for batch, rows in parts:
            index = torch.tensor(rows, dtype=torch.long, device=batch.attention.device)
            attention = batch.attention[index]
            real = attention.any(dim=0).nonzero()  # columns only the leaving rows needed go
            kept.append((index, attention, int(real[0]) if len(real) else attention.shape[1]))
        width = max(attention.shape[1] - start for _, attention, start in kept)
        layers = []
        for k_and_v in zip(*(_layers(b.cache) for b, _ in parts), strict=True):  # per layer: each part's (keys, values)
            layers.append(tuple(torch.cat([_left_pad(kv[which].index_select(0, index)[:, :, start:], width, 2)
                                           for kv, (index, _, start) in zip(k_and_v, kept, strict=True)])
                                for which in (0, 1)))  # fmt: skip
        routing = None
        if first.editor is not None:
            routing = first.editor.regroup([(b.routing, index.cpu()) for (b, _), (index, _, _) in zip(parts, kept, strict=True)])
        attention = torch.cat([_left_pad(a[:, start:], width, 1) for _, a, start in kept])
        positions = torch.cat([b.positions[index] for (b, _), (index, _, _) in zip(parts, kept, strict=True)])
        logits = torch.cat([b.logits[index.to(b.logits.device)] for (b, _), (index, _, _) in zip(parts, kept, strict=True)])
        return cls(first.host, first.editor, routing, _new_cache(layers), attention, positions, logits)


def _new_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A transformers DynamicCache holding these keys/values (empty: a prefill's)."""
    from transformers import DynamicCache

    return DynamicCache(layers) if layers else DynamicCache()


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(getattr(layer, "is_sliding", False) for layer in layers):
        raise NotImplementedError(f"decoding rows that join and leave needs a plain KV cache, not {type(cache).__name__} "
                                  "with sliding-window layers")  # fmt: skip
    return [(layer.keys, layer.values) for layer in layers]


def _forward(model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
    """One forward with the cache; (B, V) float32 logits of the last position."""
    cache_keyword, keeps_logits = _forward_options(type(model))
    kwargs: dict[str, Any] = {cache_keyword: cache}
    if keeps_logits:
        kwargs["logits_to_keep"] = 1  # the LM head on the last position only, as generate does
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, **kwargs)
    return out.logits[:, -1].float()
