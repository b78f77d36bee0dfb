"""Baseline clusterers (scikit-learn) on the same vectors as the SAE, and one comparison table for both.

Every baseline sees what the SAE sees: the same train/validation split (`sae.split_indices`, same `data_seed`) and
the same normalisation (centred by the TRAIN mean, unit L2 norm; `sae.normalise`). Fitted on the train split,
scored on the validation split with `cluster_metrics.assignment_metrics`, like the SAE.

Methods (`BASELINES`):
- `kmeans`: sklearn KMeans (k-means++, n_init=10).
- `spherical_kmeans`: k-means on the unit sphere: assign by cosine to unit-norm centres, centre = normalised sum
  of members (k-means++ seeding, best of n_init by total cosine). Not plain KMeans on unit vectors, whose centres
  are not unit-norm (that is what `kmeans` already is here, since the inputs are unit vectors).
- `gmm`: GaussianMixture, diagonal covariances.
- `pca_kmeans` / `pca_gmm`: PCA to `n_components` (default 32) then k-means / diagonal GMM.
- `agglomerative`: Ward linkage on a seeded subsample of the train split (default 5000 vectors, since Ward is
  O(n^2) memory), then every vector joins the nearest (Euclidean) centroid of the subsample's clusters.

`val_fvu` of a baseline is the FVU of reconstructing each validation vector by the train centroid of its
cluster (comparable to a k=1 SAE), so the table has one reconstruction column for every method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans, kmeans_plusplus
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from tqdm.auto import tqdm

from sae_reasoning.cluster_metrics import assignment_metrics
from sae_reasoning.sae import Data, TrainedSAE, mean_rows, normalise, read_rows, split_indices


@dataclass
class Baseline:
    """A fitted clusterer: `predict(x_n [n, d]) -> [n]` cluster ids in [0, n_clusters)."""

    method: str
    n_clusters: int
    seed: int
    predict: Callable[[np.ndarray], np.ndarray]


def _unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def fit_kmeans(x: np.ndarray, n_clusters: int, seed: int = 0) -> Baseline:
    km = KMeans(n_clusters, n_init=10, random_state=seed).fit(x)
    return Baseline("kmeans", n_clusters, seed, km.predict)


def spherical_kmeans(
    x: np.ndarray, n_clusters: int, seed: int = 0, n_init: int = 10, max_iter: int = 300, tol: float = 1e-7
) -> np.ndarray:
    """Unit-norm centres `[n_clusters, d]` maximising the total cosine of each vector to its centre."""
    x = _unit_rows(x.astype(np.float64))
    rng = np.random.RandomState(seed)
    best_centres, best_score = None, -np.inf
    for _ in range(n_init):
        centres = _unit_rows(kmeans_plusplus(x, n_clusters, random_state=rng)[0])
        for _ in range(max_iter):
            sim = x @ centres.T  # [n, C]
            assign = sim.argmax(1)
            onehot = np.zeros((len(x), n_clusters))
            onehot[np.arange(len(x)), assign] = 1.0
            sums = onehot.T @ x  # [C, d]
            empty = onehot.sum(0) == 0
            if empty.any():  # re-seed an empty cluster with the vectors worst served by their centre
                worst = np.argsort(sim[np.arange(len(x)), assign])[: int(empty.sum())]
                sums[empty] = x[worst]
            new = _unit_rows(sums)
            shift = np.abs(new - centres).max()
            centres = new
            if shift < tol:
                break
        score = (x @ centres.T).max(1).sum()
        if score > best_score:
            best_centres, best_score = centres, score
    return best_centres


def fit_spherical_kmeans(x: np.ndarray, n_clusters: int, seed: int = 0) -> Baseline:
    centres = spherical_kmeans(x, n_clusters, seed)
    return Baseline("spherical_kmeans", n_clusters, seed, lambda v: (v @ centres.T).argmax(1))


def fit_gmm(x: np.ndarray, n_clusters: int, seed: int = 0) -> Baseline:
    gmm = GaussianMixture(n_clusters, covariance_type="diag", random_state=seed, max_iter=200).fit(x)
    return Baseline("gmm", n_clusters, seed, gmm.predict)


def _with_pca(fit: Callable[..., Baseline], name: str, n_components: int = 32):
    def fit_pca(x: np.ndarray, n_clusters: int, seed: int = 0) -> Baseline:
        pca = PCA(min(n_components, *x.shape), random_state=seed).fit(x)
        inner = fit(pca.transform(x), n_clusters, seed)
        return Baseline(name, n_clusters, seed, lambda v: inner.predict(pca.transform(v)))

    return fit_pca


def fit_agglomerative(x: np.ndarray, n_clusters: int, seed: int = 0, max_samples: int = 5000) -> Baseline:
    rng = np.random.RandomState(seed)
    sub = x[rng.choice(len(x), min(max_samples, len(x)), replace=False)]
    assign = AgglomerativeClustering(n_clusters, linkage="ward").fit_predict(sub)
    centres = np.stack([sub[assign == c].mean(0) for c in range(n_clusters)])  # Ward never leaves one empty
    sq_norms = (centres**2).sum(1)

    def predict(v: np.ndarray) -> np.ndarray:  # nearest centroid: argmin ||v||^2 - 2 v.c + ||c||^2
        return (sq_norms - 2 * v @ centres.T).argmin(1)

    return Baseline("agglomerative", n_clusters, seed, predict)


BASELINES: dict[str, Callable[..., Baseline]] = {
    "kmeans": fit_kmeans,
    "spherical_kmeans": fit_spherical_kmeans,
    "gmm": fit_gmm,
    "pca_kmeans": _with_pca(fit_kmeans, "pca_kmeans"),
    "pca_gmm": _with_pca(fit_gmm, "pca_gmm"),
    "agglomerative": fit_agglomerative,
}


def centroid_fvu(x_train: np.ndarray, a_train: np.ndarray, x_val: np.ndarray, a_val: np.ndarray, n: int) -> float:
    """FVU of reconstructing validation vectors by the train mean of their cluster (0 for an empty one)."""
    centres = np.zeros((n, x_train.shape[1]))
    for c in range(n):
        members = x_train[a_train == c]
        if len(members):
            centres[c] = members.mean(0)
    err = ((x_val - centres[a_val]) ** 2).sum()
    return float(err / ((x_val - x_val.mean(0)) ** 2).sum())


def run_baselines(
    x: Data,
    n_clusters: Sequence[int] = (5, 10),
    methods: Sequence[str] = tuple(BASELINES),
    seeds: Sequence[int] = (0,),
    labels: Sequence[Any] | None = None,
    val_frac: float = 0.1,
    data_seed: int = 0,
    layer: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Fit every (method, n_clusters, seed) on the train split of RAW vectors `x [n, d]`; score on validation.

    Returns rows of the comparison table (see `table_row`), with the full validation metrics under `val`.
    """
    unknown = set(methods) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baseline(s) {sorted(unknown)}; choose from {sorted(BASELINES)}")
    train_idx, val_idx = split_indices(len(x), val_frac, data_seed)
    norm_mean = mean_rows(x, train_idx, "cpu")  # the same statistic the SAE trainer uses
    x_train = normalise(read_rows(x, train_idx, "cpu"), norm_mean).numpy()
    x_val = normalise(read_rows(x, val_idx, "cpu"), norm_mean).numpy()
    y_val = None if labels is None else np.asarray(labels)[val_idx.numpy()]

    rows = []
    jobs = [(m, c, s) for m in methods for c in n_clusters for s in seeds]
    for method, n, seed in tqdm(jobs, desc="baselines", disable=not progress, leave=False):
        fitted = BASELINES[method](x_train, n, seed)
        a_train, a_val = fitted.predict(x_train), fitted.predict(x_val)
        val = assignment_metrics(a_val, n, y_val)
        fvu = centroid_fvu(x_train, a_train, x_val, a_val, n)
        rows.append(table_row(method, layer, n, None, seed, fvu, val))
    return rows


def table_row(
    method: str, layer: int | None, n_clusters: int, k: int | None, seed: int, val_fvu: float, val: Mapping
) -> dict[str, Any]:
    """One row of the comparison table. Label columns are None when there were no labels."""
    return {
        "method": method,
        "layer": layer,
        "n_clusters": n_clusters,
        "k": k,
        "seed": seed,
        "val_fvu": val_fvu,
        "nmi": val.get("nmi"),
        "min_f1": val.get("min_f1"),
        "mean_f1": val.get("mean_f1"),
        "n_empty": val["n_empty"],
        "cluster_sizes": val["cluster_sizes"],
        "val": dict(val),
    }


def sae_rows(trained: Sequence[TrainedSAE]) -> list[dict[str, Any]]:
    """Comparison-table rows for trained SAEs (argmax latent = cluster)."""
    rows = []
    for t in trained:
        sp = t.spec
        m = t.metrics
        rows.append(table_row("sae_topk", sp.layer, sp.n_latents, sp.k, sp.seed, m["val_fvu"], m["val"]))
    return rows


def comparison_table(
    trained: Sequence[TrainedSAE], baselines: Sequence[Mapping[str, Any]] = (), full: bool = False
) -> list[dict[str, Any]]:
    """SAE rows then baseline rows, one list of dicts (drop the nested `val` metrics unless `full`)."""
    rows = [*sae_rows(trained), *map(dict, baselines)]
    if not full:
        for r in rows:
            r.pop("val", None)
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of the scalar columns, for logs and `make demo`."""
    cols = ["method", "layer", "n_clusters", "k", "seed", "val_fvu", "nmi", "min_f1", "mean_f1", "n_empty"]

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    table = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in table)
