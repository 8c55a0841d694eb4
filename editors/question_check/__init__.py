"""The question check: does a question ask for the fact an edit changed?

A backend's retrieval finds the edit a prompt is about, and it finds it by the subject:
"Where is Zorbland Robotics based?" retrieves the edit "The CEO of Zorbland Robotics is
-> Nadia Velmont" as surely as "Who runs Zorbland Robotics?" does, and the edit then
answers the other question with its own target (a hijack). So after a backend routes a
row to an edit, the check asks two things, and the row keeps its edit only when both
hold:

- the relation: what the row asks and what the edit's prompt asks, the subject's name
  masked in both, go through a small trained network (model.py) whose score must clear
  the threshold stored with it;
- the subject: the row names the edit's subject (at least half of its words, allowing
  a plural or a short typo, and every number in it) and not another subject that shares
  words with it ("Darren L Castillo" for "Jose L Castillo": `subject_named`), so a
  question with the same relation about another subject that retrieval reached by
  mistake stays the base model's.

Rows it turns away run as the base model: the pointer, the end rule and the edit's memory
never touch them.

The network is small and depends only on the packaged sentence encoder, so one trained
file (`trained/question-check.safetensors`, from `kmd question-check train`) serves
every base model; the threshold stored with it was set on validation pairs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from kmd.editors.question_check.model import (
    CheckNetwork,
    QuestionCheckError,
    encode,
    load_network,
    mask_subject,
    subject_named,
)


class AskedEdit(Protocol):
    """What the check reads of an edit request (kmd.editors.protocol.EditRequest): its
    prompt and subject. Structural, so the protocol module, which calls the check, is not
    imported back."""

    prompt: str
    subject: str | None

__all__ = ["PACKAGED", "QuestionCheck", "QuestionCheckError", "mask_subject", "subject_named"]

PACKAGED = Path(__file__).with_name("trained") / "question-check.safetensors"
MAX_CACHED_PROMPTS = 100_000  # edit prompts' embeddings kept (384 floats each)


class QuestionCheck:
    """The trained check on one device: `accepts(questions, requests)`."""

    _shared: dict[tuple[str, str], QuestionCheck] = {}
    _shared_lock = threading.Lock()

    def __init__(self, network: CheckNetwork, threshold: float, device: torch.device) -> None:
        self.network, self.threshold, self.device = network, threshold, device
        self._prompts: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()  # (prompt, subject) -> (D,)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path = PACKAGED, device: torch.device | str = "cpu") -> QuestionCheck:
        """The trained check at `path`, loaded once per process and device."""
        device = torch.device(device)
        key = (str(path), str(device))
        with cls._shared_lock:
            if key not in cls._shared:
                network, threshold, _ = load_network(path, device)
                cls._shared[key] = cls(network, threshold, device)
            return cls._shared[key]

    @torch.no_grad()
    def scores(self, questions: Sequence[str], requests: Sequence[AskedEdit]) -> torch.Tensor:
        """(R,) logits: does question i ask what request i's prompt asks (subject masked)?"""
        if not questions:
            return torch.empty(0, device=self.device)
        asked = encode([mask_subject(q, r.subject) for q, r in zip(questions, requests, strict=True)], self.device)
        return self.network(asked, self._prompt_embeddings(requests))

    def accepts(self, questions: Sequence[str], requests: Sequence[AskedEdit]) -> torch.Tensor:
        """(R,) bool: question i may be answered by request i's edit (names its subject and
        asks its relation)."""
        named = torch.tensor([subject_named(q, r.subject) for q, r in zip(questions, requests, strict=True)],
                             dtype=torch.bool, device=self.device)  # fmt: skip
        if not named.any():
            return named
        out = named.clone()
        rows = named.nonzero().flatten().tolist()
        out[rows] = self.scores([questions[i] for i in rows], [requests[i] for i in rows]) > self.threshold
        return out

    def _prompt_embeddings(self, requests: Sequence[AskedEdit]) -> torch.Tensor:
        """(R, D) the masked edit prompts' embeddings, each encoded once (kept by content, so an
        edit id that is reused for another request is never confused)."""
        keys = [(r.prompt, r.subject or "") for r in requests]
        with self._lock:
            missing = sorted({k for k in keys if k not in self._prompts})
        if missing:
            vectors = encode([mask_subject(prompt, subject) for prompt, subject in missing], self.device)
            with self._lock:
                for key, vector in zip(missing, vectors, strict=True):
                    self._prompts[key] = vector
                while len(self._prompts) > MAX_CACHED_PROMPTS:
                    self._prompts.popitem(last=False)
        with self._lock:
            return torch.stack([self._prompts.get(k) if k in self._prompts else encode([mask_subject(*k)], self.device)[0]
                                for k in keys])  # fmt: skip
