"""Computing one LLP edit: its key (InfoNCE per retrieval layer) and its b value vectors
(the target's NLL with the vectors prepended at layer z). The editor stores what they give.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kmd.editors.batching import TeacherForcedBatch
from kmd.editors.hooks import hooked
from kmd.editors.llp.config import LlpConfig
from kmd.editors.llp.statistics import RetrievalReader
from kmd.editors.prefix import Injection, PrefixInjector
from kmd.editors.protocol import EditorError
from kmd.editors.upper import UpperStack

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost

Standardize = Callable[[torch.Tensor], torch.Tensor]  # (|R|, ..., D) states -> the keys' space


def last_subject_token(host: ModelHost, text: str, subject: str | None) -> int:
    """Index of the last token of the last occurrence of `subject` in the formatted `text`
    (case-insensitive); the last token of the text when there is no subject or no match."""
    formatted = host.format_prompt(text)
    encoded = host.tokenizer(formatted, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if ids != host.encode(formatted):
        raise EditorError("llp: tokenizer offsets disagree with the host's encoding")
    if subject and subject.strip():
        start = formatted.lower().rfind(subject.strip().lower())
        if start >= 0:
            end = start + len(subject.strip())
            inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            if inside:
                return inside[-1]
    return len(ids) - 1


class EditTrainer:
    """Trains keys and values. Holds no edits (forks share it); the config comes with each
    call, as `configured(...)` may change it per edit."""

    def __init__(self, host: ModelHost, reader: RetrievalReader, injector: PrefixInjector) -> None:
        self.host = host
        self.reader = reader
        self.injector = injector  # layers z.. merge the prefix (the value vectors' keys/values)

    def subject_states(self, config: LlpConfig, standardize: Standardize, states: torch.Tensor, prompts: list[str],
                       subject: str | None, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(|R|, P, D) standardised `states` (|R|, P, T, D) of the variants `prompts` (row 0:
        the bare prompt) -> (|R|, P, D) last-subject-token states of the variants (and of the
        subject alone, when configured); (|R|, C, D) the bare prompt's other tokens."""
        device = states.device
        index = torch.tensor([last_subject_token(self.host, p, subject) for p in prompts], device=device)
        queries = states[:, torch.arange(len(prompts), device=device), index]
        if config.subject_query and subject:  # appended last: row 0 stays the bare prompt
            alone = standardize(self.reader.states([subject])["states"])  # (|R|, 1, T_s, D)
            last = last_subject_token(self.host, subject, subject)
            queries = torch.cat([queries, alone[:, :, last]], dim=1)
        own = int(prompt_mask[0].sum())
        context = [t for t in range(1, own) if t != int(index[0])]
        return queries, states[:, 0, context]

    def train_key(self, config: LlpConfig, queries: torch.Tensor, context: torch.Tensor, existing: torch.Tensor
                  ) -> torch.Tensor:  # fmt: skip
        """InfoNCE per retrieval layer: close to the subject queries (|R|, P, D), away from the
        existing keys (N, |R|, D) (and the context (|R|, C, D) when configured). -> (|R|, D)"""
        unit_queries = F.normalize(queries, dim=-1)
        init = unit_queries.mean(1)  # (|R|, D)
        if queries.shape[1] > 1:  # the bare prompt (row 0) weighs `bare_weight`, the other queries the rest
            init = config.bare_weight * unit_queries[:, 0] + (1 - config.bare_weight) * unit_queries[:, 1:].mean(1)
        negatives = []
        if len(existing) and config.key_negatives > 0:
            n = len(existing)
            sample = torch.randperm(n, generator=torch.Generator().manual_seed(n))[: config.key_negatives]
            negatives.append(existing[sample.to(existing.device)].transpose(0, 1))  # (|R|, M, D)
        if config.context_negatives and context.shape[1]:
            negatives.append(context)
        if not negatives or config.key_steps == 0:
            return init
        negative = F.normalize(torch.cat(negatives, dim=1), dim=-1)  # (|R|, M, D)
        anchors = F.normalize(queries, dim=-1)  # (|R|, P, D)
        # key = init + rms(init) * delta: `key_lr` is a step relative to the state's scale.
        scale = init.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)
        delta = torch.nn.Parameter(torch.zeros_like(init))
        optimiser = torch.optim.Adam([delta], lr=config.key_lr)
        with torch.enable_grad():
            for _ in range(config.key_steps):
                unit = F.normalize(init + scale * delta, dim=-1)
                positive = torch.einsum("lpd,ld->lp", anchors, unit)  # (|R|, P)
                push = torch.einsum("lmd,ld->lm", negative, unit)  # (|R|, M)
                logits = torch.cat([positive[..., None], push[:, None].expand(-1, positive.shape[1], -1)], -1)
                loss = F.cross_entropy(logits.flatten(0, 1) / config.key_temperature, torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.long, device=logits.device))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        return (init + scale * delta.detach()).float()

    def train_value(self, config: LlpConfig, stack: UpperStack, batch: TeacherForcedBatch) -> tuple[torch.Tensor, int, float]:
        """Optimise the b vectors entering layer z (rows: prompt variants + target).
        -> ((b, D) value, steps taken, final NLL)."""
        host = self.host
        b = config.n_values
        end = int(batch.attention_mask[0].sum())  # row 0 is the bare prompt + target
        init = stack.hidden[0, max(0, end - b) : end].float()
        if init.shape[0] < b:
            init = torch.cat([init[:1].expand(b - init.shape[0], -1), init])
        # Optimise a scale-free offset: value = init + rms(init) * delta, so `value_lr` is a
        # step relative to the stream's own scale (hidden-state norms vary a lot across models).
        scale = init.pow(2).mean().sqrt().clamp(min=1e-6)
        delta = torch.nn.Parameter(torch.zeros_like(init))
        init_norm = init.norm().clamp(min=1e-6)
        rows = batch.input_ids.shape[0]
        optimiser = torch.optim.Adam([delta], lr=config.value_lr)
        dtype = host.model.dtype
        nll = torch.tensor(float("inf"))
        steps = 0
        # The prefix every row of the step's forward gets (None while the prefix itself runs);
        # the editor's own hooks are off while an edit is computed.
        current: list[Injection | None] = [None]
        with torch.enable_grad(), hooked(host.model, self.injector.specs(lambda: current[0])):
            for steps in range(1, config.value_steps + 1):
                current[0] = None  # the prefix run itself gets no prefix
                value = init + scale * delta
                pk, pv = self.injector.runner(value[None].to(dtype))
                current[0] = Injection(
                    rows=torch.arange(rows, device=host.device),
                    keys=pk.expand(rows, *pk.shape[1:]),
                    values=pv.expand(rows, *pv.shape[1:]),
                    p_first=torch.zeros(rows, dtype=torch.long, device=host.device),
                )
                logits = stack.logits_at(stack.final_hidden(), batch.rows, batch.positions)
                nll = F.cross_entropy(logits.float(), batch.labels)
                if nll.item() < config.value_stop_loss or steps == config.value_steps:
                    break
                loss = nll + config.value_weight_decay * value.norm() / init_norm
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        return (init + scale * delta).detach().float(), steps, float(nll.item())
