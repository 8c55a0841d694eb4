"""Score and generate through a (possibly edited) model.

`editor=None` means the base model. With an editor, every forward runs inside
`editor.query(prompt_mask)`, so retrieval sees prompt tokens only, per row, and decode
steps reuse the decision made on the prompt (KV cache on).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from kmd.editors.batching import TeacherForcedBatch, chunks, left_padded_ids, teacher_forced_batch, teacher_forced_batch_ids
from kmd.editors.hooks import HookSpec, run_stopped, run_until

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import Editor


@dataclass(frozen=True)
class TargetScore:
    """Teacher-forced result for one `prompt + " " + target` row."""

    argmax: tuple[int, ...]  # the model's top token at each target position
    labels: tuple[int, ...]  # the target tokens
    nll: float  # mean negative log-likelihood of the target tokens

    @property
    def accuracy(self) -> float:
        return sum(a == b for a, b in zip(self.argmax, self.labels)) / max(len(self.labels), 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.nll, 50.0))

    def agreement(self, other: TargetScore) -> float:
        """Fraction of positions where both runs chose the same token (locality)."""
        return sum(a == b for a, b in zip(self.argmax, other.argmax)) / max(len(self.argmax), 1)


def _routed(editor: Editor | None, prompt_mask: torch.Tensor):
    return editor.query(prompt_mask) if editor is not None else nullcontext()


def score_targets(
    host: ModelHost,
    editor: Editor | None,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 16,
) -> list[TargetScore]:
    """Teacher-forced scores of `prompt + " " + target` for (prompt, target) text pairs."""
    return _score([teacher_forced_batch(host, chunk) for chunk in chunks(pairs, batch_size)], host, editor)


def score_token_targets(
    host: ModelHost,
    editor: Editor | None,
    encoded: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 16,
) -> list[TargetScore]:
    """The same for (prompt ids, target ids) pairs, e.g. recorded greedy continuations."""
    return _score([teacher_forced_batch_ids(host, chunk) for chunk in chunks(encoded, batch_size)], host, editor)


@torch.no_grad()
def _score(batches: Sequence[TeacherForcedBatch], host: ModelHost, editor: Editor | None) -> list[TargetScore]:
    out: list[TargetScore] = []
    for batch in batches:
        with _routed(editor, batch.prompt_mask):
            logits = host.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        picked = logits[batch.rows, batch.positions].float()  # (K, V)
        nll = F.cross_entropy(picked, batch.labels, reduction="none")
        top = picked.argmax(-1)
        for (a, b), row_nll in zip(batch.spans, batch.per_row(nll), strict=True):
            out.append(
                TargetScore(
                    argmax=tuple(top[a:b].tolist()),
                    labels=tuple(batch.labels[a:b].tolist()),
                    nll=float(row_nll.mean()) if b > a else 0.0,
                )
            )
    return out


def generate(
    host: ModelHost,
    editor: Editor | None,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int] = 16,
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy continuations (new token ids only) of prompts as the host formats them."""
    encoded = [host.encode(host.format_prompt(p)) for p in prompts]
    return generate_ids(host, editor, encoded, max_new_tokens, batch_size)


# done(i, new_tokens) -> True once row i (of the prompts given) needs no more tokens
RowDone = Callable[[int, Sequence[int]], bool]


@torch.no_grad()
def generate_ids(
    host: ModelHost,
    editor: Editor | None,
    encoded: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int] = 16,
    batch_size: int = 16,
    done: RowDone | None = None,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts, KV cache on, left-padded batches.

    `max_new_tokens` may be one number or one per prompt (rows are cut to their own
    length); a row ends with its EOS when it produced one. With `done`, a row also ends
    (cut right there) once `done(index, its new tokens)` says so, and a batch ends when
    each of its rows has ended: a row's tokens up to its end are those it gets without
    `done` (a finished row only feeds padding to the forwards that follow).
    """
    limits = [max_new_tokens] * len(encoded) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    eos = host.tokenizer.eos_token_id
    out: list[list[int]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        chunk_limits = limits[start : start + batch_size]
        ids, attention = left_padded_ids(host, chunk)
        stop = _RowsDone(ids.shape[1], start, eos, done) if done is not None else None
        with _routed(editor, attention.bool()):
            generated = _greedy(host, ids, attention, max(chunk_limits), stop)
        for b, (row, limit) in enumerate(zip(generated[:, ids.shape[1] :].tolist(), chunk_limits, strict=True)):
            row = row[: min(limit, stop.cut.get(b, limit)) if stop is not None else limit]
            if eos in row:  # after EOS the rest is padding
                row = row[: row.index(eos) + 1]
            out.append(row)
    return out


class _RowsDone:
    """A stopping criterion for `generate`: ends each row once `done` says so (remembering
    where, since the padding that follows may be the EOS token)."""

    def __init__(self, width: int, offset: int, eos: int | None, done: RowDone) -> None:
        self.width, self.offset, self.eos, self.done = width, offset, eos, done
        self.cut: dict[int, int] = {}  # row of the batch -> its new tokens when it was done

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.width :].tolist()  # (B, t) the tokens written so far
        for b, tokens in enumerate(new):
            if b not in self.cut and (self.eos is None or self.eos not in tokens) and self.done(self.offset + b, tokens):
                self.cut[b] = len(tokens)
        return torch.tensor([b in self.cut for b in range(len(new))], dtype=torch.bool, device=input_ids.device)


# Generation settings that make `generate` pick other than the argmax of the model's logits,
# with the values that leave it alone.
_NEUTRAL = {"repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
            "bad_words_ids": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "sequence_bias": (None,),
            "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
            "exponential_decay_length_penalty": (None,)}  # fmt: skip


def greedy_is_argmax(host: ModelHost) -> bool:
    """Is a greedy token `generate_ids` writes the argmax of the (edited) model's logits at
    that position, as a teacher-forced pass reads them? Not when the model's generation
    config adds logits rules (a repetition penalty, suppressed tokens, a minimum length)."""
    config = getattr(host.model, "generation_config", None)
    return config is None or all(getattr(config, name, None) in neutral for name, neutral in _NEUTRAL.items())


def _greedy(host: ModelHost, ids: torch.Tensor, attention: torch.Tensor, max_new_tokens: int,
            stop: _RowsDone | None = None) -> torch.Tensor:  # fmt: skip
    from transformers import StoppingCriteriaList

    return host.model.generate(
        input_ids=ids,
        attention_mask=attention,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=host.tokenizer.pad_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
        stopping_criteria=StoppingCriteriaList([stop] if stop is not None else []),
    )


@torch.no_grad()
def capture_prefill(
    host: ModelHost, ids: torch.Tensor, attention: torch.Tensor, specs: Sequence[HookSpec], stop_after: str | None = None
) -> None:
    """Run the base model's prefill of `generate_ids` on a left-padded batch (same inputs,
    positions and masks as generation computes), with capture hooks `specs`; stop after
    the module `stop_after` when given. No editor acts on this forward."""
    from kmd.editors.protocol import base_model

    with base_model():
        run_stopped(host.model, specs, lambda: _greedy(host, ids, attention, 1), stop_after)


def right_padded(host: ModelHost, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as the model is asked them (`format_prompt`), right-padded: (B, T) token ids
    and (B, T) attention mask (1 on real tokens), on the model's device."""
    encoded = [host.encode(host.format_prompt(p)) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), host.tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)], attention[row, : len(tokens)] = torch.tensor(tokens), 1
    return ids.to(host.device), attention.to(host.device)


@torch.no_grad()
def prompt_inputs(host: ModelHost, path: str, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The first input (B, T, ...) of the module at `path` for right-padded prompts (one plain
    forward of the base model, stopped there), and their (B, T) attention mask (long)."""
    from kmd.editors.protocol import base_model

    ids, attention = right_padded(host, prompts)
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args, output):
        seen["a"] = args[0]

    with base_model():  # also when called during a routed forward (a chat turn's message)
        run_until(host, path, ids, attention, [HookSpec(path, grab)])
    return seen["a"], attention


def module_input(host: ModelHost, path: str, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """The first input (B, T, ...) of the module at `path` in the base model's prefill of a
    left-padded batch (`capture_prefill`, stopping at that module)."""
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args, output):
        seen["a"] = args[0]

    capture_prefill(host, ids, attention, [HookSpec(path, grab)], stop_after=path)
    return seen["a"]


def generate_text(
    host: ModelHost, editor: Editor | None, prompts: Sequence[str], max_new_tokens: int = 24
) -> list[str]:
    return [
        host.tokenizer.decode(tokens, skip_special_tokens=True)
        for tokens in generate(host, editor, prompts, max_new_tokens)
    ]
