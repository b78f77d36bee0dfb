"""Tests of the cluster metrics and the scikit-learn baselines (cluster_metrics.py, clustering.py)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from sae_reasoning.cluster_metrics import assignment_metrics, cluster_sizes, label_metrics, planted_vectors
from sae_reasoning.clustering import (
    BASELINES,
    comparison_table,
    format_table,
    run_baselines,
    spherical_kmeans,
)
from sae_reasoning.sae import GridConfig, train_grid

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def planted():
    return planted_vectors(n=3000, d=64, n_behaviors=5, seed=0)


def test_label_metrics_known_values():
    labels = np.array(["a"] * 4 + ["b"] * 4)
    perfect = label_metrics(np.array([7] * 4 + [2] * 4), labels)  # cluster ids are arbitrary
    assert perfect["nmi"] == pytest.approx(1.0) and perfect["min_f1"] == 1.0
    assert perfect["best_cluster"] == {"a": 7, "b": 2}
    merged = label_metrics(np.zeros(8, dtype=int), labels)  # one cluster for everything
    assert merged["nmi"] == pytest.approx(0.0)
    assert merged["best_f1"] == {"a": pytest.approx(2 * 4 / (4 + 8)), "b": pytest.approx(2 * 4 / (4 + 8))}
    # a 3/1 split of label a: best F1 for a = 2*3/(4+3)
    split = label_metrics(np.array([0, 0, 0, 1, 2, 2, 2, 2]), labels)
    assert split["best_f1"]["a"] == pytest.approx(6 / 7) and split["best_f1"]["b"] == 1.0


def test_assignment_metrics_sizes_and_empty():
    m = assignment_metrics(np.array([0, 0, 3, 3, 3]), 5)
    assert m["cluster_sizes"] == [2, 0, 0, 3, 0] and m["n_empty"] == 3
    assert m["cluster_freq"] == pytest.approx([0.4, 0, 0, 0.6, 0]) and "nmi" not in m
    with pytest.raises(ValueError, match="cluster ids"):
        cluster_sizes(np.array([0, 5]), 5)
    with pytest.raises(ValueError, match="same shape"):
        label_metrics(np.array([0, 1]), [0])


def test_spherical_kmeans_unit_centres(planted):
    x, _ = planted
    x = x - x.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centres = spherical_kmeans(x, 5, seed=0, n_init=2)
    assert np.allclose(np.linalg.norm(centres, axis=1), 1.0)
    assert (x @ centres.T).max(1).mean() > 0.8  # each vector is close in angle to its centre
    assert np.array_equal(centres, spherical_kmeans(x, 5, seed=0, n_init=2))  # seeded


def test_baselines_recover_planted(planted):
    x, y = planted
    rows = run_baselines(x, n_clusters=(5,), labels=y, layer=3, progress=False)
    assert [r["method"] for r in rows] == list(BASELINES)
    for r in rows:
        assert r["nmi"] >= 0.9 and r["min_f1"] >= 0.9, r
        assert sum(r["cluster_sizes"]) == 300 and r["n_empty"] == 0  # scored on the 10% validation split
        assert 0 < r["val_fvu"] < 0.5


def test_comparison_table(planted):
    x, y = planted
    cfg = GridConfig(n_latents=(5,), ks=(3,), seeds=(0,), max_epochs=5, patience=2, progress=False)
    saes = train_grid({3: torch.from_numpy(x)}, cfg, labels=y)
    methods = ("kmeans", "agglomerative")
    base = run_baselines(x, n_clusters=(5, 8), methods=methods, labels=y, layer=3, progress=False)
    rows = comparison_table(saes, base)
    assert [r["method"] for r in rows] == ["sae_topk", "kmeans", "kmeans", "agglomerative", "agglomerative"]
    assert all(set(r) == set(rows[0]) for r in rows) and "val" not in rows[0]
    assert rows[0]["k"] == 3 and rows[1]["k"] is None and rows[2]["n_clusters"] == 8
    assert "val" in comparison_table(saes, base, full=True)[0]
    text = format_table(rows)
    assert len(text.splitlines()) == 6 and "sae_topk" in text
    # unlabelled: label columns are empty, the rest is there
    unlabelled = run_baselines(x, n_clusters=(5,), methods=("gmm",), progress=False)
    assert unlabelled[0]["nmi"] is None and unlabelled[0]["cluster_sizes"]
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baselines(x, methods=("dbscan",), progress=False)
