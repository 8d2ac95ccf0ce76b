"""Concept balancing and quality-tuning set selection (Emu / Movie Gen).

Web-scale data over-represents a few concepts. Balancing clusters the image embeddings with
k-means and gives each sample a weight proportional to 1/sqrt(its cluster's size): sampled
by weight, a cluster's share of training falls from n_c to sqrt(n_c), so big concepts still
come up more often than rare ones but no longer drown them.

Emu's quality-tuning (QT) set is a few thousand images chosen for aesthetics: here the train
rows ranked by a weighted sum of rank-normalised score columns, human "accept" labels first
and "reject" labels out, with at most `per_cluster_cap` per cluster so the set stays diverse.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import scipy.sparse
from numpy.typing import NDArray

# Rows per block of the point-to-centroid distance product: bounds memory at ~block x k floats.
_BLOCK = 65536


def default_cluster_count(n: int) -> int:
    """The usual rule of thumb k = sqrt(n / 2), at least 1 (and 0 for no samples)."""
    return 0 if n == 0 else max(1, round(math.sqrt(n / 2)))


def _nearest(x: NDArray[np.float32], centroids: NDArray[np.float32]) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Index of and squared distance to the nearest centroid, for each row of `x` (in blocks)."""
    labels = np.empty(x.shape[0], dtype=np.int64)
    distances = np.empty(x.shape[0], dtype=x.dtype)
    centroid_norms = np.einsum("kd,kd->k", centroids, centroids)
    for lo in range(0, x.shape[0], _BLOCK):
        block = x[lo:lo + _BLOCK]
        squared = np.einsum("nd,nd->n", block, block)[:, None] - 2.0 * block @ centroids.T + centroid_norms
        labels[lo:lo + _BLOCK] = np.argmin(squared, axis=1)
        distances[lo:lo + _BLOCK] = np.maximum(squared[np.arange(block.shape[0]), labels[lo:lo + _BLOCK]], 0.0)
    return labels, distances


def _kmeans_once(x: NDArray[np.float32], norms: NDArray[np.float32], k: int, rng: np.random.Generator,
                 max_iterations: int) -> tuple[NDArray[np.int64], float]:
    """One greedy k-means++ seeding plus Lloyd iterations: (labels, inertia)."""
    n = x.shape[0]
    # Greedy k-means++ (as scikit-learn): draw a few candidates with probability proportional to
    # squared distance and keep the one that lowers the total most.
    trials = 2 + int(math.log(k))
    centroids = np.empty((k, x.shape[1]), dtype=x.dtype)
    first = int(rng.integers(n))
    centroids[0] = x[first]
    closest = np.maximum(norms - 2.0 * x @ x[first] + norms[first], 0.0)
    for index in range(1, k):
        total = float(closest.sum())
        if total <= 0:
            candidates = rng.integers(n, size=trials)
        else:
            candidates = np.searchsorted(np.cumsum(closest, dtype=np.float64), rng.random(trials) * total)
            candidates = np.minimum(candidates, n - 1)
        distance = np.maximum(norms[:, None] - 2.0 * x @ x[candidates].T + norms[candidates], 0.0)
        candidate_closest = np.minimum(closest[:, None], distance)
        best = int(np.argmin(candidate_closest.sum(axis=0)))
        centroids[index] = x[candidates[best]]
        closest = candidate_closest[:, best]

    labels = np.full(n, -1, dtype=np.int64)
    distances = closest
    for _ in range(max_iterations):
        new_labels, distances = _nearest(x, centroids)
        sizes = np.bincount(new_labels, minlength=k)
        for empty in np.flatnonzero(sizes == 0):
            farthest = int(np.argmax(distances))
            new_labels[farthest] = empty
            distances[farthest] = 0.0
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        onehot = scipy.sparse.csr_matrix((np.ones(n, dtype=x.dtype), (labels, np.arange(n))), shape=(k, n))
        centroids = np.asarray(onehot @ x) / np.bincount(labels, minlength=k)[:, None].astype(x.dtype)
    return labels, float(distances.sum(dtype=np.float64))


def cluster_embeddings(embeddings: np.ndarray, n_clusters: int, seed: int = 0,
                       restarts: int = 3, max_iterations: int = 50) -> np.ndarray:
    """k-means cluster labels (int64, one per row) of `embeddings` [N, D]; deterministic for a seed.

    Greedy k-means++ seeding, then Lloyd iterations until no label changes (or
    `max_iterations`); the best of `restarts` runs (lowest inertia) wins, because a single
    k-means++ run now and then splits a big concept and merges two small ones, exactly what
    balancing must not do. An emptied cluster is re-seeded at the point farthest from its
    centroid. `n_clusters` 0 means about sqrt(N / 2); it is capped at N. Labels are numbered
    by first appearance, so the same data gives the same numbers. (``dedup._kmeans`` fits
    centroids on a sample for SemDeDup routing; balancing needs every point's final label.)
    """
    # float32 like the embeddings themselves: the products are BLAS-bound and labels do not
    # need more precision.
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or Inf")
    if n_clusters < 0:
        raise ValueError(f"n_clusters must be >= 0 (0 = about sqrt(n/2)), got {n_clusters}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    n = x.shape[0]
    k = min(n, n_clusters or default_cluster_count(n))
    if n == 0:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    norms = np.einsum("nd,nd->n", x, x)
    runs = [_kmeans_once(x, norms, k, rng, max_iterations) for _ in range(restarts)]
    labels = min(runs, key=lambda run: run[1])[0]

    _, first = np.unique(labels, return_index=True)
    renumber = np.empty(k, dtype=np.int64)
    renumber[labels[np.sort(first)]] = np.arange(first.size)
    return renumber[labels]


def balance_weights(clusters: np.ndarray) -> np.ndarray:
    """Per-sample weight proportional to 1/sqrt(cluster size), normalised to mean 1 (float64, N)."""
    clusters = np.asarray(clusters)
    if clusters.ndim != 1:
        raise ValueError(f"clusters must be one label per sample (1-D), got shape {clusters.shape}")
    if clusters.size == 0:
        return np.empty(0, dtype=np.float64)
    _, inverse, counts = np.unique(clusters, return_inverse=True, return_counts=True)
    weights = 1.0 / np.sqrt(counts[inverse].astype(np.float64))
    return weights / weights.mean()


def _rank_normalised(values: pd.Series) -> NDArray[np.float64]:
    """Rank of each value as a fraction 0 (worst) .. 1 (best, highest); missing values rank 0."""
    ranks = values.rank(method="average", ascending=True)
    count = int(ranks.notna().sum())
    if count <= 1:
        return np.where(ranks.notna(), 1.0, 0.0)
    return ((ranks - 1.0) / (count - 1.0)).fillna(0.0).to_numpy(dtype=np.float64)


def select_quality_tuning_set(manifest: pd.DataFrame, *, top_k: int, per_cluster_cap: int | None,
                              score_columns: dict[str, float], labels: dict[str, str]) -> pd.DataFrame:
    """Emu's quality-tuning set: the best `top_k` train rows, diverse across clusters.

    Each row's QT score is the weighted mean of its rank-normalised `score_columns` (0 = worst,
    1 = best in the train split; give a negative weight to a column where lower is better,
    e.g. ``{"brisque": -0.2}``; missing values rank worst). Human labels override the scores:
    ids labelled "reject" are never selected, ids labelled "accept" come first (best QT score
    first) and are not dropped by the cap, though they count towards it. The remaining rows
    are taken greedily in QT-score order (ties by id), skipping a row whose `cluster` already
    holds `per_cluster_cap` rows (None = no cap). Rows of other splits are ignored.

    Returns the selected rows in order with ``qt_rank`` (1 = best) and ``qt_score`` columns.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if per_cluster_cap is not None and per_cluster_cap < 1:
        raise ValueError(f"per_cluster_cap must be >= 1 or None, got {per_cluster_cap}")
    if not score_columns or sum(abs(w) for w in score_columns.values()) == 0:
        raise ValueError("score_columns must weight at least one manifest column, "
                         "e.g. {'aesthetic': 0.5, 'quality': 0.5}")
    missing = [column for column in score_columns if column not in manifest.columns]
    if missing:
        raise ValueError(f"the manifest has no score column {missing} (columns: {sorted(manifest.columns)})")
    if per_cluster_cap is not None and "cluster" not in manifest.columns:
        raise ValueError("per_cluster_cap needs a 'cluster' column in the manifest (run concept balancing first)")
    bad_labels = sorted({v for v in labels.values() if v not in ("accept", "reject")})
    if bad_labels:
        raise ValueError(f"labels must be 'accept' or 'reject', got {bad_labels}")

    train = manifest[manifest["split"] == "train"] if "split" in manifest.columns else manifest
    train = train.reset_index(drop=True)
    total_weight = sum(abs(w) for w in score_columns.values())
    qt_score = np.zeros(len(train), dtype=np.float64)
    for column, weight in score_columns.items():
        ranks = _rank_normalised(pd.to_numeric(train[column], errors="coerce"))
        # A negative weight ranks the column upside down, so the score stays in 0..1.
        qt_score += abs(weight) * (ranks if weight >= 0 else 1.0 - ranks)
    qt_score /= total_weight

    ids = train["id"].astype(str)
    label = ids.map(labels).fillna("")
    order = pd.DataFrame({"row": np.arange(len(train)), "accepted": label == "accept",
                          "score": qt_score, "id": ids})
    order = order[label != "reject"].sort_values(["accepted", "score", "id"], ascending=[False, False, True],
                                                kind="mergesort")

    chosen: list[int] = []
    taken_per_cluster: dict[object, int] = {}
    clusters = train["cluster"].to_numpy() if "cluster" in train.columns else None
    for row, accepted in zip(order["row"].to_numpy(), order["accepted"].to_numpy()):
        if len(chosen) >= top_k:
            break
        if clusters is not None and per_cluster_cap is not None:
            cluster = clusters[row]
            if not accepted and taken_per_cluster.get(cluster, 0) >= per_cluster_cap:
                continue
            taken_per_cluster[cluster] = taken_per_cluster.get(cluster, 0) + 1
        chosen.append(int(row))

    selected = train.iloc[chosen].copy()
    selected["qt_score"] = qt_score[chosen]
    selected["qt_rank"] = np.arange(1, len(chosen) + 1, dtype=np.int64)
    return selected.reset_index(drop=True)
