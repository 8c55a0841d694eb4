"""Deciding whether two claimed objects are the same answer.

Exact-match normalisation first (`normalize_text`: case, spacing, punctuation, articles),
then, for forms that still differ, cosine similarity of sentence embeddings against the
policy's threshold. Forms whose numbers differ never match semantically ("1989" and "1990"
embed close together but are different answers). Subjects are only ever matched exactly: "Paris" and "Paris, Texas" are
close in embedding space but different subjects.

`TextEncoder` is the plug-in point: `MiniLMEncoder` (the packaged all-MiniLM-L6-v2) in the
daemon, `NgramEncoder` (hashed character trigrams, no model) in tests.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from kmd.sources.claims import normalize_text

__all__ = ["MiniLMEncoder", "NgramEncoder", "ObjectMatcher", "TextEncoder"]

_DIGITS_RE = re.compile(r"\d+")


def _numbers(text: str) -> tuple[str, ...]:
    return tuple(n.lstrip("0") or "0" for n in _DIGITS_RE.findall(text))


class TextEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 embeddings, each row L2-normalised."""
        ...


class MiniLMEncoder:
    """The packaged MiniLM sentence encoder; loaded on first use."""

    def __init__(self, device: str | None = "cpu", batch_size: int = 128):
        self.device = device
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        from kmd.editors.encoder import load_sentence_encoder

        model = load_sentence_encoder(self.device)
        out = model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )  # fmt: skip
        return np.asarray(out, dtype=np.float32)  # (N, 384)


class NgramEncoder:
    """A model-free encoder for tests: hashed character trigrams, L2-normalised.

    Similar spellings get high cosine, unrelated strings low; nothing semantic.
    """

    def __init__(self, dim: int = 512):
        self.dim = dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # (N, D)
        for i, text in enumerate(texts):
            padded = f"  {text.lower()}  "
            for j in range(len(padded) - 2):
                h = int.from_bytes(hashlib.blake2b(padded[j : j + 3].encode(), digest_size=4).digest(), "little")
                out[i, h % self.dim] += 1.0
            norm = np.linalg.norm(out[i])
            if norm:
                out[i] /= norm
        return out


class ObjectMatcher:
    """Groups object strings that name the same answer."""

    def __init__(self, encoder: TextEncoder | None, threshold: float, cache_size: int = 50_000):
        self.encoder = encoder
        self.threshold = threshold
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()  # normalised text -> (D,)
        self._cache_size = cache_size

    def prime(self, objects: Sequence[str]) -> None:
        """Encode many objects in one batch (far faster than one by one)."""
        if self.encoder is None:
            return
        missing = list(dict.fromkeys(n for n in map(normalize_text, objects) if n not in self._cache))
        if not missing:
            return
        vectors = self.encoder.encode(missing)  # (M, D)
        for text, vec in zip(missing, vectors, strict=True):
            self._cache[text] = vec
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _vectors(self, normalised: Sequence[str]) -> np.ndarray:
        self.prime([n for n in normalised if n not in self._cache])
        return np.stack([self._cache[n] for n in normalised])  # (K, D)

    def same(self, a: str, b: str) -> bool:
        na, nb = normalize_text(a), normalize_text(b)
        if na == nb:
            return True
        if self.encoder is None or _numbers(na) != _numbers(nb):
            return False
        va, vb = self._vectors([na, nb])
        return float(va @ vb) >= self.threshold

    def cluster(self, objects: Sequence[str]) -> list[int]:
        """A cluster label per object. Greedy: each distinct form joins the most similar
        existing cluster representative at or above the threshold, else starts a cluster."""
        forms = [normalize_text(o) for o in objects]
        distinct = list(dict.fromkeys(forms))
        label_of: dict[str, int] = {distinct[0]: 0} if distinct else {}
        if len(distinct) > 1 and self.encoder is not None:
            vectors = self._vectors(distinct)  # (K, D)
            reps: list[int] = [0]  # indices into distinct
            for i in range(1, len(distinct)):
                sims = vectors[reps] @ vectors[i]  # (R,)
                numbers = _numbers(distinct[i])
                sims[[_numbers(distinct[r]) != numbers for r in reps]] = -1.0
                best = int(np.argmax(sims))
                if sims[best] >= self.threshold:
                    label_of[distinct[i]] = label_of[distinct[reps[best]]]
                else:
                    label_of[distinct[i]] = len(reps)
                    reps.append(i)
        else:
            label_of = {form: i for i, form in enumerate(distinct)}
        return [label_of[f] for f in forms]
