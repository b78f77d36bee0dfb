"""train.py's SAE stage: fit the configured grid on cached sentence activations, save checkpoints, compare baselines.

Writes into the run folder:
    saes/<layer{L}_n{N}_k{K}_seed{S}>/   one sae-lens checkpoint per SAE (+ our metadata and metrics)
    grid.json                           machine-readable summary: config, metrics and checkpoint path per SAE
    comparison.json                     SAE and baseline clusterers side by side (same split, same metrics)
One layer's vectors are in memory at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae_reasoning.activations import ActivationStore
from sae_reasoning.artifacts import atomic_write_json, fingerprint
from sae_reasoning.clustering import comparison_table, format_table, run_baselines, sae_rows
from sae_reasoning.config import as_int_list
from sae_reasoning.errors import UserError
from sae_reasoning.models import resid_post_hook_name, resolve_device
from sae_reasoning.sae import GridConfig, TrainedSAE, save_sae, train_grid
from sae_reasoning.tracking import Tracker

BASELINE_METHODS = ("kmeans", "spherical_kmeans", "gmm", "pca_kmeans", "agglomerative")


def grid_config(cfg: Any) -> GridConfig:
    s = cfg.sae
    device = resolve_device(cfg.model.device)
    return GridConfig(n_latents=tuple(as_int_list(s.n_latents, "sae.n_latents")), ks=tuple(as_int_list(s.k, "sae.k")),
                      seeds=tuple(as_int_list(s.seeds, "sae.seeds")), batch_size=s.batch_size,
                      max_epochs=s.max_epochs, patience=s.patience, val_frac=s.val_fraction, data_seed=cfg.seed,
                      base_lr=s.lr_scale, init=s.init, device=str(device), progress=cfg.progress)


def _log_history(tracker: Tracker, trained: list[TrainedSAE]) -> None:
    """Loss curves: one W&B metric per SAE, x-axis = epoch."""
    if tracker.run is None:
        return
    longest = max(len(t.history.get("val_fvu", [])) for t in trained)
    for epoch in range(longest):
        row = {"epoch": epoch}
        for t in trained:
            for key in ("train_fvu", "val_fvu"):
                values = t.history.get(key, [])
                if epoch < len(values):
                    row[f"sae/{t.spec.name}/{key}"] = values[epoch]
        tracker.log(row)


def sae_record(t: TrainedSAE, path: Path, run_dir: Path) -> dict:
    m = t.metrics
    return {"name": t.spec.name, "layer": t.spec.layer, "n_latents": t.spec.n_latents, "k": t.spec.k,
            "seed": t.spec.seed, "checkpoint": str(path.relative_to(run_dir)), "train_fvu": m["train_fvu"],
            "val_fvu": m["val_fvu"], "epochs": m.get("epochs"), "best_epoch": m.get("best_epoch"),
            "stopped_early": m.get("stopped_early"), "l0": m["val"]["l0"], "dead_latents": m["val"]["dead_latents"],
            "nmi": m["val"].get("nmi"), "min_f1": m["val"].get("min_f1"), "mean_f1": m["val"].get("mean_f1"),
            "best_f1": m["val"].get("best_f1"), "cluster_sizes": m["val"].get("cluster_sizes"),
            "cluster_freq": m["val"].get("cluster_freq")}


def train_grid_stage(cfg: Any, store: ActivationStore, run_dir: Path, tracker: Tracker) -> list[dict]:
    gcfg = grid_config(cfg)
    labels = store.labels()
    labels = labels if any(label is not None for label in labels) else None
    n = store.meta["n_sentences"]
    n_val = round(n * gcfg.val_frac)
    if n_val < 2 or n - n_val < max(gcfg.n_latents):
        raise UserError(f"only {n} sentences: too few for SAEs of up to {max(gcfg.n_latents)} latents with a "
                        f"{gcfg.val_frac:.0%} validation split; raise data.limit or lower sae.n_latents")
    records, sae_rows_all, baseline_rows = [], [], []
    for layer in sorted(cfg.model.sae_layers):
        done = run_dir / "saes" / f"layer{layer}.done.json"
        key = fingerprint({"grid": str(gcfg), "baselines": cfg.sae.baselines, "layer": layer,
                           "activations": store.meta.get("fingerprint")})
        saved = json.loads(done.read_text()) if done.exists() else None
        if saved is not None and saved.get("key") == key:  # resume: this layer finished before an interruption

            records += saved["records"]
            sae_rows_all += saved["sae_rows"]
            baseline_rows += saved["baselines"]
            continue
        x = store.load(layer)
        trained = train_grid({layer: x}, gcfg, labels=labels)
        layer_records = []
        for t in trained:
            path = run_dir / "saes" / t.spec.name
            save_sae(path, t.sae, layer=layer, model_name=cfg.model.thinking.path, hook=resid_post_hook_name(layer),
                     metrics=t.metrics, extra={"activations": store.meta.get("fingerprint"),
                                               "n_sentences": store.meta["n_sentences"]})
            layer_records.append(sae_record(t, path, run_dir))
        _log_history(tracker, trained)
        layer_baselines = []
        if cfg.sae.baselines:
            # one seed: the baselines are a reference point, and Ward / GMM are the slowest part of the stage
            layer_baselines = run_baselines(x, n_clusters=gcfg.n_latents, methods=BASELINE_METHODS,
                                            seeds=gcfg.seeds[:1], labels=labels, val_frac=gcfg.val_frac,
                                            data_seed=gcfg.data_seed, layer=layer, progress=cfg.progress)
        layer_sae_rows = sae_rows(trained)
        atomic_write_json(done, {"key": key, "records": layer_records, "sae_rows": layer_sae_rows,
                                 "baselines": layer_baselines})
        records += layer_records
        sae_rows_all += layer_sae_rows
        baseline_rows += layer_baselines
        del x
    table = comparison_table([], [*sae_rows_all, *baseline_rows])
    atomic_write_json(run_dir / "comparison.json", table)
    atomic_write_json(run_dir / "grid.json", {
        "activations": str(store.folder), "traces": str(getattr(store, "traces_dir", "")),
        "activations_fingerprint": store.meta.get("fingerprint"),
        "n_sentences": store.meta["n_sentences"], "has_labels": labels is not None,
        "grid": {"layers": sorted(cfg.model.sae_layers), "n_latents": list(gcfg.n_latents), "k": list(gcfg.ks),
                 "seeds": list(gcfg.seeds)}, "config_fingerprint": fingerprint(str(gcfg)), "saes": records})
    columns = ["method", "layer", "n_clusters", "k", "seed", "val_fvu", "nmi", "min_f1", "mean_f1", "n_empty"]
    tracker.table("grid/comparison", columns, [[r.get(c) for c in columns] for r in table])
    sae_columns = ["name", "layer", "n_latents", "k", "seed", "train_fvu", "val_fvu", "epochs", "dead_latents",
                   "nmi", "min_f1", "mean_f1", "checkpoint"]
    tracker.table("grid/saes", sae_columns, [[r.get(c) for c in sae_columns] for r in records])
    print(format_table(table))
    return records

