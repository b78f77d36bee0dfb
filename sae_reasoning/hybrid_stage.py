"""Wiring of the hybrid generator for eval.py: the chosen taxonomy's SAE (train.py run) + the steering vectors
(steer.py run) + the thinking/base pair, one `HybridGenerator` per method (the hybrid itself or a control)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae_reasoning.config import resolve_path
from sae_reasoning.errors import UserError
from sae_reasoning.models import LoadedModel
from sae_reasoning.sae import load_sae

CONTROL_OF_METHOD = {"hybrid": "none", "bias_only": "bias_only", "random_behavior": "random_behavior",
                     "random_vectors": "random_vectors", "oracle": "oracle", "unsteered_rerank": "unsteered_rerank"}


def chosen_taxonomy(train_dir: str | Path) -> dict:
    path = resolve_path(str(Path(train_dir) / "taxonomy.json"))
    if path is None:
        raise UserError(f"{train_dir}/taxonomy.json is missing: run train.py into that folder first (train_dir=...)")
    try:
        taxonomy = json.loads(path.read_text())
        return {"name": taxonomy["chosen"], **taxonomy["taxonomy"]["info"],
                "titles": {lat["latent"]: lat["title"] for lat in taxonomy["taxonomy"]["latents"]}}
    except (json.JSONDecodeError, KeyError) as exc:
        raise UserError(f"{path} is not a valid taxonomy.json ({type(exc).__name__}: {exc}); rerun train.py") from None


def load_chosen_sae(train_dir: str | Path, taxonomy: dict):
    """The chosen SAE checkpoint; a missing or damaged one is one line, not a traceback."""
    path = Path(resolve_path(str(train_dir))) / taxonomy["checkpoint"]
    try:
        return load_sae(path)
    except Exception as exc:  # noqa: BLE001 - FileNotFoundError, JSONDecodeError, SafetensorError...: all "damaged"
        raise UserError(f"{path}: the chosen SAE checkpoint is missing or corrupt ({type(exc).__name__}); rerun "
                        "train.py into that folder") from None


def read_grid(train_dir: str | Path) -> dict:
    path = Path(resolve_path(str(train_dir))) / "grid.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is missing or not valid JSON ({type(exc).__name__}); rerun train.py into that "
                        "folder") from None


def behavior_latent(key: Any, titles: dict[int, str]) -> int:
    """The latent a `hybrid.behavior_scales` key names: its index, its title, or one " / "-separated part of the
    title (case-insensitive). A key that names no latent, or several, is a UserError listing the titles."""
    k = str(key).strip().lower()
    hits = sorted({lat for lat, title in titles.items()
                   if k == str(lat) or k == title.strip().lower()
                   or k in (part.strip().lower() for part in title.split(" / "))})
    if len(hits) != 1:
        listing = "; ".join(f"{lat}: {title!r}" for lat, title in sorted(titles.items()))
        what = "names no latent" if not hits else f"names latents {hits}"
        raise UserError(f"hybrid.behavior_scales key {key!r} {what}: use a latent index, a title or one "
                        f"' / '-separated part of one (taxonomy: {listing})")
    return hits[0]


def resolve_behavior_scales(scales: Any, titles: dict[int, str], vectors: dict[int, Any]) -> dict[str, float]:
    """`hybrid.behavior_scales` ({key: multiplier}, keys as `behavior_latent` reads them) with each key replaced by
    its latent index, as `HybridGenerator` takes it. Two keys for one latent, or a latent without a steering vector,
    is a UserError."""
    out: dict[str, float] = {}
    seen: dict[int, Any] = {}
    for key, scale in dict(scales or {}).items():
        latent = behavior_latent(key, titles)
        if latent in seen:
            raise UserError(f"hybrid.behavior_scales: keys {seen[latent]!r} and {key!r} both name latent {latent}")
        if latent not in vectors:
            raise UserError(f"hybrid.behavior_scales key {key!r}: latent {latent} ({titles[latent]!r}) has no "
                            "steering vector (steer.py skipped it); drop the key")
        seen[latent] = key
        out[str(latent)] = float(scale)
    return out


def method_overrides(method: str) -> dict[str, Any]:
    """The HybridGenerator settings that make eval.py's `method` (hybrid or a control)."""
    return {"control": CONTROL_OF_METHOD[method], **({"candidate_mode": True} if method == "unsteered_rerank" else {})}


def hybrid_batch_fn(cfg: Any, thinking: LoadedModel, base: LoadedModel, method: str, budget: int):
    """`fn(batch, batch_index) -> records` generating with the hybrid (or one of its controls)."""
    from sae_reasoning.hybrid import HybridGenerator
    from sae_reasoning.steering import load_vectors

    taxonomy = chosen_taxonomy(cfg.train_dir)
    sae = load_chosen_sae(cfg.train_dir, taxonomy)
    layer = cfg.steering.layer if cfg.steering.layer is not None else cfg.model.steering_layer
    vectors = load_vectors(resolve_path(cfg.steer_dir), model_id=cfg.model.base.path, layer=layer,
                           d_model=base.d_model)
    overrides = {**method_overrides(method), "seed": cfg.seed, "max_new_tokens": budget, "progress": False,
                 "behavior_scales": resolve_behavior_scales(cfg.hybrid.get("behavior_scales"), taxonomy["titles"],
                                                            vectors.vectors)}
    generator = HybridGenerator(thinking, base, sae, taxonomy["layer"], vectors.vectors, vectors.bias,
                                vectors.layer, cfg.hybrid, **overrides)

    def fn(batch, _batch_index):
        from sae_reasoning.traces import check_context

        for lm, idx in ((base, 0), (thinking, 1)):
            check_context(lm, [len(generator.prompts(q.question)[idx]) for q in batch], [q.question for q in batch])
        records = []
        for r in generator.generate(batch):
            records.append({"completion": r["text"], "completion_ids": r["token_ids"], "n_new_tokens": r["n_tokens"],
                            "truncated": r["truncated"], **{k: r.get(k) for k in (
                                "steered_fraction", "changed_fraction", "disagreement_rate", "bias_fraction",
                                "substituted_fraction", "reranked_fraction", "n_decisions")},
                            "behavior_counts": {f"{int(k)} {taxonomy['titles'].get(int(k), '')}".strip(): v
                                                for k, v in (r.get("behavior_counts") or {}).items()}})
        return records

    return fn
