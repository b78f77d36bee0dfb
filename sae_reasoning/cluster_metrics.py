"""Metrics of a hard clustering (an assignment of each vector to one cluster / latent).

Shared by the SAE (assignment = argmax latent) and the baseline clusterers, so that every row of the comparison
table is computed by the same code. Everything here is numpy and cheap: a contingency matrix does all the work.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import normalized_mutual_info_score


def cluster_sizes(assign: np.ndarray, n_clusters: int) -> list[int]:
    """Members per cluster, `[n_clusters]`, zeros included (a cluster nobody joins is an empty / dead one)."""
    assign = np.asarray(assign)
    if assign.size and (assign.min() < 0 or assign.max() >= n_clusters):
        raise ValueError(f"cluster ids must lie in [0, {n_clusters}), got {assign.min()}..{assign.max()}")
    return np.bincount(assign, minlength=n_clusters).astype(int).tolist()


def contingency(assign: np.ndarray, labels: Sequence[Any]) -> tuple[np.ndarray, list[Any], np.ndarray]:
    """`counts[label, cluster]`, the sorted distinct labels, and the cluster ids (columns) that occur."""
    assign, labels = np.asarray(assign), np.asarray(labels)
    if assign.shape != labels.shape:
        raise ValueError(f"assignments {assign.shape} and labels {labels.shape} must have the same shape")
    label_values, label_ids = np.unique(labels, return_inverse=True)
    cluster_values, cluster_ids = np.unique(assign, return_inverse=True)
    counts = np.zeros((len(label_values), len(cluster_values)), dtype=np.int64)
    np.add.at(counts, (label_ids, cluster_ids), 1)
    return counts, label_values.tolist(), cluster_values


def label_metrics(assign: np.ndarray, labels: Sequence[Any]) -> dict[str, Any]:
    """Agreement of a clustering with ground-truth labels (e.g. the organism's planted behaviors).

    - `nmi`: sklearn's normalized mutual information (arithmetic normalisation), in [0, 1].
    - `best_f1[label]`: one-vs-rest F1 of "in cluster j" as a predictor of "has this label", maximised over
      clusters j; `best_cluster[label]` is that j. F1(label, j) = 2 |label ∩ j| / (|label| + |j|).
    - `min_f1`, `mean_f1`: over labels. Several labels may pick the same best cluster (that is a merge, and it
      shows up as low F1 for at least one of them unless the labels are tiny).
    """
    counts, label_values, cluster_values = contingency(assign, labels)
    n_label = counts.sum(1, keepdims=True)  # [n_labels, 1]
    n_cluster = counts.sum(0, keepdims=True)  # [1, n_clusters]
    f1 = 2 * counts / (n_label + n_cluster)  # [n_labels, n_clusters]
    best = f1.argmax(1)
    best_f1 = {str(lab): float(f1[i, best[i]]) for i, lab in enumerate(label_values)}
    return {
        "nmi": float(normalized_mutual_info_score(np.asarray(labels), np.asarray(assign))),
        "best_f1": best_f1,
        "best_cluster": {str(lab): int(cluster_values[best[i]]) for i, lab in enumerate(label_values)},
        "min_f1": float(min(best_f1.values())),
        "mean_f1": float(np.mean(list(best_f1.values()))),
    }


def assignment_metrics(
    assign: np.ndarray, n_clusters: int, labels: Sequence[Any] | None = None
) -> dict[str, Any]:
    """Sizes, shares and empty clusters of an assignment; plus `label_metrics` when labels are given."""
    sizes = cluster_sizes(assign, n_clusters)
    n = max(len(assign), 1)
    out: dict[str, Any] = {
        "n": int(len(assign)),
        "n_clusters": int(n_clusters),
        "cluster_sizes": sizes,
        "cluster_freq": [s / n for s in sizes],
        "n_empty": int(sum(s == 0 for s in sizes)),
    }
    if labels is not None:
        out.update(label_metrics(assign, labels))
    return out


def planted_vectors(
    n: int = 3000,
    d: int = 64,
    n_behaviors: int = 5,
    seed: int = 0,
    noise: float = 0.1,
    secondary: float = 0.3,
    offset: float = 10.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic sentence vectors with planted behaviors, for tests and demos: `(x [n, d] float32, labels [n])`.

    Each vector = its behavior's random unit direction + two other behaviors' directions with weights
    U(0, secondary) (a sparse code, as a top-3 SAE assumes) + isotropic noise of norm ~`noise`, all shifted by a
    large common offset (norm ~ offset * sqrt(d)) so that a clusterer that does not centre fails.
    """
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_behaviors, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    labels = rng.integers(0, n_behaviors, n)
    others = (labels[:, None] + rng.integers(1, n_behaviors, (n, 2))) % n_behaviors if n_behaviors > 1 else None
    x = dirs[labels] + noise * rng.standard_normal((n, d)) / np.sqrt(d)
    if others is not None:
        x += (secondary * rng.random((n, 2, 1)) * dirs[others]).sum(1)
    x += offset * rng.standard_normal(d)
    return x.astype(np.float32), labels
