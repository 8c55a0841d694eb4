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

import difflib
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


def _folded_words(text: str) -> list[str]:
    """The words of `text` in their case, accents dropped ("Martín" -> "Martin", "İsmet" ->
    "Ismet"): another spelling of the same name is not another name."""
    decomposed = unicodedata.normalize("NFKD", text)
    return _WORD.findall("".join(c for c in decomposed if not unicodedata.combining(c)))


# Capitalised words that start or ask a question, not a name ("Is Castillo a woman?").
_QUESTION_WORDS = frozenset(
    "what who whom whose which where when why how is are was were does did do can could will would should "
    "tell name please give list in on at for from with this that these those it its his her their there".split()
)
_NOT_NAMES = _QUESTION_WORDS | _STOP_WORDS


def _same_word(a: str, b: str) -> bool:
    """Lower-case words alike: equal, or one starts with the other and the shorter has 4+
    letters ("karashimas" and "karashima")."""
    return a == b or (min(len(a), len(b)) >= 4 and (a.startswith(b) or b.startswith(a)))


def _spelling_of(word: str, subject_word: str) -> bool:
    """Could `word` (as written) write lower-case `subject_word` another way: an initial
    ("F" for "Fernanda"), a short or long form ("Ray", "Raymond"), a typo or a possessive
    ("Procaccinj", "Hais")?"""
    lower = word.lower()
    if lower in _NOT_NAMES or lower[0] != subject_word[0]:
        return False
    if len(word) == 1:
        return word.isupper()
    if min(len(lower), len(subject_word)) >= 3 and (lower.startswith(subject_word) or subject_word.startswith(lower)):
        return True
    return min(len(lower), len(subject_word)) >= 4 and difflib.SequenceMatcher(None, lower, subject_word).ratio() >= 0.8


def _names_another(question: str, subject: str) -> bool:
    """Does `question` name a different subject that shares words with this one? Its longest
    run of the subject's consecutive words stops short of the subject's own ends, and the
    question's word there is a name of its own (capitalised or with a digit, not a word of
    the subject): "Darren L Castillo" for "Jose L Castillo", "men's 69 Gasteiger" for "men's
    69 kg", "Apple Records" for "Apple Inc". A partial mention next to an ordinary word
    still names the subject ("Where is Zorbland headquartered?")."""
    raw = _folded_words(question)
    words = [w.lower() for w in raw]
    subject_words = [w.lower() for w in _folded_words(subject)]
    n = len(subject_words)
    best = (0, 0, 0)  # (length, start in the question, start in the subject): the first longest run
    for i in range(len(words)):
        for j in range(n):
            m = 0
            while i + m < len(words) and j + m < n and _same_word(words[i + m], subject_words[j + m]):
                m += 1
            if m > best[0]:
                best = (m, i, j)
    m, i, j = best
    if m == 0 or m == n:
        return False

    def own_name(index: int) -> bool:
        word = raw[index]
        if any(_spelling_of(word, w) for w in subject_words):
            return False
        return any(c.isdigit() for c in word) or (word[0].isupper() and word.lower() not in _NOT_NAMES)

    def absent(wanted: list[str], among: list[str]) -> bool:  # the subject's words beyond the run: none further on
        return not any(_spelling_of(q, w) for w in wanted if w not in _STOP_WORDS for q in among)

    # "Douglas W Tallamy" still names "Douglas Tallamy": its word after the initial
    before = j > 0 and i > 0 and own_name(i - 1) and absent(subject_words[:j], raw[:i])
    after = j + m < n and i + m < len(words) and own_name(i + m) and absent(subject_words[j + m :], raw[i + m :])
    return before or after


def subject_named(question: str, subject: str | None, fraction: float = 0.5) -> bool:
    """Does `question` name `subject`? At least `fraction` of the subject's words (not
    stop words) occur in it, a word also counting when one of the two starts with the other
    and the shorter has 4+ letters ("Karashimas" names "Karashima"); a word with a digit
    must occur as it is (a year or an edition tells alike subjects apart); and the words it
    shares are not part of another name ("Darren L Castillo" does not name "Jose L
    Castillo": `_names_another`). True without a subject. A backend's retrieval can reach a
    question about another subject with the same relation ("The gender of Y is" for an
    edit of "The gender of X is"); the relation check alone would let it through."""
    wanted = [w for w in _words(subject or "") if w not in _STOP_WORDS]
    if not wanted:
        return True
    present = set(_words(question))
    if any(any(c.isdigit() for c in w) and w not in present for w in wanted):
        return False  # a number names one of many alike ("1990 ... Championships" is not "1989 ...")
    if sum(any(_same_word(w, p) for p in present) for w in wanted) < fraction * len(wanted):
        return False
    return not _names_another(question, subject or "")


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
