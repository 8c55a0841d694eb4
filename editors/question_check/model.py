"""The question check's network: does a question ask for the same relation as an edit's prompt?

Both texts go through the packaged sentence encoder (all-MiniLM-L6-v2, frozen) with the
edit's subject replaced by `MASK` wherever it occurs, so what is compared is what is asked
about the subject, not the subject's name (the backend's own retrieval has already matched
the subject). A small MLP scores the pair:

    q = enc(mask(question)), p = enc(mask(edit prompt))          # (B, 384) unit vectors
    logit = MLP([q * p, |q - p|, q . p])                          # (B,)

The network depends on the sentence encoder only, not on the served model: one trained
file serves every base model. It is one safetensors file with JSON metadata (format,
shapes, how it was trained, the threshold chosen on validation); nothing is pickled.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "kmd-question-check/1"
MASK = "X"  # what the subject's name becomes in both texts


class QuestionCheckError(RuntimeError):
    """The trained question check is missing or unreadable."""


def mask_subject(text: str, subject: str | None) -> str:
    """`text` with every occurrence of `subject` (case-insensitive, whole) replaced by MASK.
    A one- or two-character subject ("맦", "U2") is masked only where it stands as a word of
    its own, not inside other words: left unmasked, "맦 follows" and "맦 is followed by"
    read alike to the network."""
    subject = (subject or "").strip()
    if not subject:
        return text
    pattern = re.escape(subject)
    if len(subject) < 3:
        pattern = rf"(?<!\w){pattern}(?!\w)"
    return re.sub(pattern, MASK, text, flags=re.IGNORECASE)


_STOP_WORDS = frozenset("the of a an and in on at to for de la le du von van der des di da del is by".split())
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def _words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def subject_named(question: str, subject: str | None, fraction: float = 0.5) -> bool:
    """Does `question` name `subject`? At least `fraction` of the subject's words (not
    stop words) occur in it, a word also counting when one of the two starts with the other
    and the shorter has 4+ letters ("Karashimas" names "Karashima"); a word with a digit
    must occur as it is (a year or an edition tells alike subjects apart). True without a
    subject. A backend's retrieval can reach a question about another subject with the
    same relation ("The gender of Y is" for an edit of "The gender of X is"); the relation
    check alone would let it through."""
    wanted = [w for w in _words(subject or "") if w not in _STOP_WORDS]
    if not wanted:
        return True
    present = set(_words(question))
    if any(any(c.isdigit() for c in w) and w not in present for w in wanted):
        return False  # a number names one of many alike ("1990 ... Championships" is not "1989 ...")

    def found(word: str) -> bool:
        return word in present or any(min(len(word), len(p)) >= 4 and (p.startswith(word) or word.startswith(p)) for p in present)

    return sum(found(w) for w in wanted) >= fraction * len(wanted)


@dataclass(frozen=True)
class CheckShape:
    encoder_dim: int = 384  # all-MiniLM-L6-v2
    hidden: int = 256


class CheckNetwork(nn.Module):
    def __init__(self, shape: CheckShape) -> None:
        super().__init__()
        self.shape = shape
        d = shape.encoder_dim
        self.mlp = nn.Sequential(nn.Linear(2 * d + 1, shape.hidden), nn.GELU(), nn.Linear(shape.hidden, shape.hidden),
                                 nn.GELU(), nn.Linear(shape.hidden, 1))  # fmt: skip

    def forward(self, questions: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """questions, prompts (B, D) unit embeddings of the masked texts -> (B,) logits."""
        product = questions * prompts
        features = torch.cat([product, (questions - prompts).abs(), product.sum(-1, keepdim=True)], dim=-1)
        return self.mlp(features).squeeze(-1)


@torch.no_grad()
def encode(texts: Sequence[str], device: torch.device | str) -> torch.Tensor:
    """(N, 384) unit embeddings from the packaged all-MiniLM-L6-v2 (frozen)."""
    from kmd.editors.encoder import load_sentence_encoder

    if not texts:
        return torch.empty(0, CheckShape.encoder_dim, device=device)
    out = load_sentence_encoder(str(device)).encode(
        list(texts), batch_size=64, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
    )
    return out.float().to(device)


def save_network(network: CheckNetwork, path: Path, threshold: float, training: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        "shape": json.dumps(asdict(network.shape), sort_keys=True),
        "threshold": json.dumps(threshold),
        "training": json.dumps(training, sort_keys=True),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def load_network(path: Path, device: torch.device | str = "cpu") -> tuple[CheckNetwork, float, dict[str, Any]]:
    """(network, threshold on its logit, training metadata)."""
    from safetensors import safe_open

    if not path.is_file():
        raise QuestionCheckError(f"question check: no trained network at {path} (train one: kmd question-check train)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
        if raw.get("format") != FORMAT:
            raise QuestionCheckError(f"question check: {path} is not a {FORMAT} file")
        network = CheckNetwork(CheckShape(**json.loads(raw["shape"])))
        network.load_state_dict(load_file(str(path)))
        threshold = float(json.loads(raw["threshold"]))
        training = json.loads(raw.get("training", "{}"))
    except QuestionCheckError:
        raise
    except Exception as exc:
        raise QuestionCheckError(f"question check: {path} is not readable ({exc})") from exc
    return network.to(device).eval().requires_grad_(False), threshold, training
