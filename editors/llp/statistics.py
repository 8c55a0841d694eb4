"""LLP's retrieval-layer states and the background statistics they are standardised with.

`RetrievalReader` runs prompts through layers 0..max(R) only and returns the outputs of the
retrieval layers R; `Background` is the mean/std of those outputs over texts the model
generated itself, which puts states and keys in one space (`standardize`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from kmd.editors.hooks import HookSpec, run_until
from kmd.editors.protocol import base_model
from kmd.editors.scoring import right_padded

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost


class RetrievalReader:
    """Reads the outputs of the retrieval layers R. Holds no edits: forks share it."""

    def __init__(self, host: ModelHost, retrieval: list[int], layer_paths: list[str]) -> None:
        self.host = host
        self.retrieval = retrieval
        self.layer_paths = layer_paths  # every layer's module path, by index
        self.last_path = layer_paths[max(retrieval)]  # a forward that only needs R stops after this layer

    def capture_specs(self, sink: dict[int, torch.Tensor]) -> list[HookSpec]:
        """Hooks that put retrieval layer i's output (B, T, D) into sink[i] (i: position in R)."""

        def grab(index: int):
            def hook(module, args, output):
                sink[index] = output[0] if isinstance(output, tuple) else output

            return hook

        return [HookSpec(self.layer_paths[layer], grab(i)) for i, layer in enumerate(self.retrieval)]

    def stacked(self, sink: dict[int, torch.Tensor]) -> torch.Tensor:
        """What `capture_specs` caught, as one (|R|, B, T, D) tensor (the model's dtype)."""
        return torch.stack([sink[i] for i in range(len(self.retrieval))])

    @torch.no_grad()
    def states(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Layer outputs at R for right-padded prompts, running only layers 0..max(R):
        {"states": (|R|, B, T, D) float32, "attention_mask": (B, T), "lengths": (B,) on the CPU}."""
        ids, attention = right_padded(self.host, prompts)  # (B, T) each
        sink: dict[int, torch.Tensor] = {}
        run_until(self.host, self.last_path, ids, attention, self.capture_specs(sink))
        states = self.stacked(sink).float()  # (|R|, B, T, D)
        return {"states": states, "attention_mask": attention, "lengths": attention.sum(dim=1).cpu()}

    @torch.no_grad()
    def messages_alone(self, messages: Sequence[tuple[int, str]], device: torch.device) -> dict[str, torch.Tensor]:
        """The retrieval-layer states of chat messages each run alone on the base model, as a
        bare prompt is when its key is made. messages: (row of the batch, user message) pairs.
        -> {"alone_rows": (Bc,), "alone_states": (|R|, Bc, Tc, D), "alone_mask": (Bc, Tc)}
        (right-padded; Bc may be 0). One message at a time, so a row's states never depend on
        the batch it came in."""
        rows = torch.tensor([row for row, _ in messages], dtype=torch.long, device=device)
        runs = []
        with base_model():
            for _, message in messages:
                got = self.states([message])
                runs.append((got["states"][:, 0], got["attention_mask"][0].bool()))
        nr, d = len(self.retrieval), self.host.model.config.hidden_size
        width = max((len(m) for _, m in runs), default=1)
        states = torch.zeros(nr, len(runs), width, d, device=device)
        mask = torch.zeros(len(runs), width, dtype=torch.bool, device=device)
        for i, (s, m) in enumerate(runs):
            states[:, i, : len(m)], mask[i, : len(m)] = s, m
        return {"alone_rows": rows, "alone_states": states, "alone_mask": mask}


@dataclass(frozen=True)
class Background:
    """Per retrieval layer mean and std of generated text: cosines are taken after
    standardising with them. Replaced, never written into (forks share it)."""

    center: torch.Tensor  # (|R|, D) mean
    scale: torch.Tensor  # (|R|, D) std (ones unless normalize is "zscore")
    ready: bool  # measured (or not needed: normalize "none")

    @classmethod
    def unmeasured(cls, layers: int, hidden: int, device: torch.device, normalize: str) -> Background:
        """Zero mean, unit std: the identity, final when normalize is "none"."""
        return cls(torch.zeros(layers, hidden, device=device), torch.ones(layers, hidden, device=device),
                   ready=normalize == "none")  # fmt: skip

    def measured(self, got: dict[str, torch.Tensor], normalize: Literal["zscore", "center", "none"]) -> Background:
        """The statistics of `RetrievalReader.states` output `got` (the background texts)."""
        mask = got["attention_mask"].bool().clone()
        mask[:, 0] = False  # the first token is an attention sink with an outlying state
        tokens = got["states"][:, mask]  # (|R|, K, D)
        center, scale = tokens.mean(1), self.scale
        if normalize == "zscore":
            std = tokens.std(1)
            scale = std.clamp(min=1e-3 * float(std.mean()))
        return dataclasses.replace(self, center=center, scale=scale, ready=True)

    def standardize(self, states: torch.Tensor) -> torch.Tensor:
        """(|R|, ..., D) retrieval-layer states in the space the keys live in."""
        shape = (self.center.shape[0],) + (1,) * (states.dim() - 2) + (-1,)
        return (states.float() - self.center.view(shape)) / self.scale.view(shape)
