"""train.py's interpretation stage: label every SAE of the grid, score the taxonomies, choose one.

Reads the grid written by `train_sae` (grid.json + checkpoints) and the sentence texts of the activation store;
writes `taxonomy.json` (the choice, its labels, every SAE's scores) and `interpretation/<sae>.json` per SAE, and logs
one W&B latent-browser table per taxonomy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sae_reasoning.activations import ActivationStore
from sae_reasoning.artifacts import atomic_write_json
from sae_reasoning.errors import UserError
from sae_reasoning.interpret import choose_taxonomy, interpret_sae, wandb_latent_table_rows, write_taxonomy_json
from sae_reasoning.judges import make_labeller
from sae_reasoning.sae import load_sae, split_indices
from sae_reasoning.tracking import Tracker


def interpret_grid(cfg: Any, store: ActivationStore, records: list[dict], run_dir: Path, tracker: Tracker) -> dict:
    index = store.index()
    texts = [r["text"] for r in index]
    labels = [r["label"] for r in index]
    labels = labels if any(label is not None for label in labels) else None
    train_idx, eval_idx = (t.numpy() for t in split_indices(len(texts), cfg.sae.val_fraction, cfg.seed))
    labeller = make_labeller(cfg.judge, cache_dir=Path(cfg.cache_dir) / "judge", seed=cfg.seed)

    layer_x: dict[int, Any] = {}

    def vectors(layer: int):  # one layer in memory at a time (records are sorted by layer)
        if layer not in layer_x:
            layer_x.clear()
            layer_x[layer] = store.load(layer)
        return layer_x[layer]

    # Every SAE's assignment first (n ints each): an SAE's stability compares it with its other-seed siblings.
    assignments = {rec["name"]: load_sae(run_dir / rec["checkpoint"]).behavior(vectors(rec["layer"]))
                   for rec in records}
    results = []
    for rec in tqdm(records, desc="interpret", disable=not cfg.progress):
        sae = load_sae(run_dir / rec["checkpoint"])
        codes, assign = sae.encode(vectors(rec["layer"])), assignments[rec["name"]]
        siblings = [assignments[o["name"]] for o in records if o["name"] != rec["name"] and
                    (o["layer"], o["n_latents"], o["k"]) == (rec["layer"], rec["n_latents"], rec["k"])]
        result = interpret_sae(rec["name"], texts, codes, assign, labeller, train_idx=train_idx, eval_idx=eval_idx,
                               decoder=sae.W_dec.detach(), assign_other=siblings or None, labels=labels,
                               n_member_sentences=cfg.judge.n_member_sentences, seed=cfg.seed,
                               info={k: rec[k] for k in ("layer", "n_latents", "k", "seed", "checkpoint")})
        atomic_write_json(run_dir / "interpretation" / f"{rec['name']}.json", result)
        results.append(result)
    chosen = select_taxonomy(results, str(cfg.sae.select))
    write_taxonomy_json(run_dir / "taxonomy.json", chosen, results, selected_by=str(cfg.sae.select))
    all_rows = []  # one latent browser for the whole grid: filter it by the "sae" column in W&B
    for result in results:
        columns, rows = wandb_latent_table_rows(result)
        all_rows += [[result["name"], *row] for row in rows]
        if result is chosen or result["name"] == chosen["name"]:
            tracker.table("taxonomy/chosen_latents", columns, rows)
    tracker.table("taxonomy/all_latents", ["sae", *columns], all_rows)
    columns = ["name", "layer", "n_latents", "k", "seed", "score", "score_kind", "nmi", "min_f1", "balance",
               "orthogonality", "stability_nmi"]
    tracker.table("taxonomy/scores", columns, [[r["name"], *[r["info"][k] for k in ("layer", "n_latents", "k", "seed")],
                                                *[r["metrics"].get(k) for k in columns[5:]]] for r in results])
    tracker.summary({"taxonomy/chosen": chosen["name"], "taxonomy/score": chosen["metrics"]["score"]})
    print_taxonomy(chosen, str(cfg.sae.select))
    return chosen


def select_taxonomy(results: list[dict], select: str) -> dict:
    """`sae.select`: "score" = the label-free taxonomy score's choice; "truth" = the highest NMI with the ground-truth
    labels (ties: the score); otherwise the SAE of that name. Every result gets its selection score either way."""
    by_score = choose_taxonomy(results)
    if select == "score":
        return by_score
    if select == "truth":
        scored = [r for r in results if r["metrics"].get("truth_nmi") is not None]
        if not scored:
            raise UserError("sae.select=truth needs ground-truth sentence labels (the organism has them); these "
                            "traces have none: use sae.select=score or an SAE name")
        return max(scored, key=lambda r: (r["metrics"]["truth_nmi"], r.get("selection_score") or 0.0))
    for r in results:
        if r["name"] == select:
            return r
    raise UserError(f"sae.select={select}: no such SAE in this grid; choose one of "
                    f"{', '.join(r['name'] for r in results[:8])}{', ...' if len(results) > 8 else ''}")


def print_taxonomy(chosen: dict, select: str = "score") -> None:
    m = chosen["metrics"]
    truth = f", NMI with planted behaviors {m['truth_nmi']:.3f}" if m.get("truth_nmi") is not None else ""
    print(f"\nchosen taxonomy: {chosen['name']} "
          f"(sae.select={select}; score {m['score']:.3f}, {m['score_kind']}{truth})")
    for lat in chosen["latents"]:
        if lat["count"]:
            extra = lat["metrics"].get("truth_majority")
            extra = f"  [planted: {extra} {lat['metrics']['truth_purity']:.0%}]" if extra else ""
            print(f"  latent {lat['latent']:>3}  {lat['frequency']:6.1%}  {lat['title']}{extra}")
