"""QC metrics on inputs whose answer is known."""
from __future__ import annotations

import math

import numpy as np

from vlit.quality.metrics import (balance_variance, balanced_resample, element_counts, hashing_embedder,
                                  instruction_diversity, minilm_embedder, response_clusters, response_diversity)


def test_two_word_communities():
    colours = ["red circle colour", "red circle shade", "colour shade red", "circle colour shade"]
    counting = ["count squares number", "number squares total", "total count number", "squares total count"]
    assert instruction_diversity(colours + counting) == 2
    assert instruction_diversity(colours) == 1
    assert instruction_diversity([]) == 0


def test_three_separated_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)
    points = np.concatenate([c + rng.normal(0, 0.1, size=(20, 2)) for c in centers])
    assert response_clusters(points, eps=0.5, min_samples=3) == 3
    assert math.isclose(response_diversity(points, eps=0.5, min_samples=3), math.log(3))


def test_embedders_separate_topics():
    texts = ["The circle is red."] * 3 + ["There are four squares in the picture."] * 3
    assert response_clusters(hashing_embedder(texts), eps=0.3) == 2
    emb = minilm_embedder(texts)
    assert emb.shape == (6, 384) and response_clusters(emb, eps=0.3) == 2


def test_complexity_and_balance():
    assert element_counts("What is red? Count the squares.") == {
        "words": 6, "content_words": 3, "sentences": 2, "questions": 1}
    assert balance_variance({"a": 2, "b": 4}) == 1.0
    rows = [{"task_name": t, "i": i} for t in "ab" for i in range(5 if t == "a" else 2)]
    out = balanced_resample(rows, per_task=2)
    assert sorted(r["task_name"] for r in out) == ["a", "a", "b", "b"]
