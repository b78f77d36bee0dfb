"""Labelling the latents of SAEs as reasoning behaviors and choosing a taxonomy (METHOD.md step 5).

Works on plain data so that it does not depend on the SAE class: for one SAE, `texts` (all sentences),
`codes [n, n_latents]` (dense encoded activations, zero off the top-k support), `assign [n]` (argmax latent = the
sentence's behavior), optionally `decoder [n_latents, d]` (unit rows), the train / held-out split and
ground-truth labels. `interpret_sae` gives one result dict per SAE; `choose_taxonomy` picks one of them and
`write_taxonomy_json` records the choice with every score.

Metrics (all on the held-out sentences, labels from the training ones):
- deterministic, always: `dead_fraction` (latents that are nobody's argmax: no category), `balance` (entropy of
  the live latents' use / log of their number), `orthogonality` (1 - mean |cos| between the live latents' decoder
  rows), `stability_nmi` / `stability_ari` (agreement with a second assignment of the same held-out sentences,
  e.g. by an SAE of another seed);
- ground truth, when labels are given (the organism): `truth_nmi`, `truth_best_f1` per behavior, ...;
- the paper's three, when the labeller is an LLM judge: `accuracy` (macro F1 of the judge deciding membership of
  held-out sentences, 20% members / 80% others), `completeness` (mean 0-10 fit of random held-out sentences to
  their assigned category, divided by 10), `independence` (share of category pairs judged distinct). A request
  that fails after its retries is counted in `*_failed` and left out of the score, never counted as a success;
  a metric with more than `max_failure_rate` of its judgements failed is None.

Score (`taxonomy_score`): with an LLM judge, the mean of accuracy, completeness and independence (the paper's);
otherwise the mean of balance, orthogonality and stability_nmi, over the components every compared SAE has (a
component missing for one SAE is dropped for all, so the scores stay comparable). Empty latents are not
penalised: the taxonomy is the set of live latents, and on planted data an SAE with spare latents often recovers
the behaviors better than one of exactly the right size, which has to merge some (stability shows that).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import Tensor

from sae_reasoning.artifacts import atomic_write_json
from sae_reasoning.cluster_metrics import label_metrics
from sae_reasoning.judges import Label, Labeller, completeness_ask, independence_ask, membership_ask

LLM_METRICS = ("accuracy", "completeness", "independence")
DETERMINISTIC_COMPONENTS = ("balance", "orthogonality", "stability_nmi")
SCORE_DOC = ("llm: mean of accuracy (membership F1), completeness (0-10 fit / 10) and independence (share of "
             "category pairs judged distinct); deterministic: mean of balance and orthogonality (both over the live "
             "latents) and stability_nmi, over the components every compared SAE has; dead_fraction is reported, "
             "not scored. The llm score is used when every SAE "
             "has all three LLM metrics, else the deterministic one for all.")


@dataclass
class LatentMembers:
    """The member sentences of one latent shown to a labeller: `sentences[:n_top]` are the top-activating members
    (by this latent's activation, descending), the rest random members; `indices` point into `texts`."""

    latent: int
    count: int  # members: sentences (of the split) whose argmax is this latent
    frequency: float  # count / sentences in the split
    sentences: list[str]
    activations: list[float]
    indices: list[int]
    n_top: int


def _np(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):  # numpy has no bfloat16: floats go through float32
        return (x.detach().float() if x.is_floating_point() else x.detach()).cpu().numpy()
    return np.asarray(x)


def latent_members(texts: Sequence[str], codes: Tensor, assign: Tensor, n_member_sentences: int = 200,
                   seed: int = 0, idx: Optional[Sequence[int]] = None) -> list[LatentMembers]:
    """Per latent, up to `n_member_sentences` members: half top-activating, half random (seeded) members.

    `idx` restricts everything to those sentences (the training split); frequency is relative to them.
    A latent with at most `n_member_sentences` members shows all of them, sorted by activation.
    """
    codes, assign = _np(codes), _np(assign)
    idx = np.arange(len(texts)) if idx is None else np.asarray(idx)
    out = []
    for j in range(codes.shape[1]):
        members = idx[assign[idx] == j]
        acts = codes[members, j]
        order = members[np.lexsort((members, -acts))]  # by activation descending, ties by index
        if len(order) <= n_member_sentences:
            chosen, n_top = order, len(order)
        else:
            n_top = n_member_sentences - n_member_sentences // 2
            rng = np.random.default_rng([seed, j])
            rest = rng.choice(order[n_top:], n_member_sentences // 2, replace=False)
            chosen = np.concatenate([order[:n_top], rest])
        out.append(LatentMembers(j, len(members), len(members) / max(len(idx), 1), [texts[i] for i in chosen],
                                 [float(codes[i, j]) for i in chosen], [int(i) for i in chosen], int(n_top)))
    return out


# ------------------------------------------------------------------------------------------------ deterministic


def live_latents(assign: Any, n_latents: int) -> np.ndarray:
    """Latents that are some sentence's argmax: the categories of the taxonomy."""
    return np.flatnonzero(np.bincount(_np(assign), minlength=n_latents) > 0)


def balance(assign: Any, n_latents: int) -> float:
    """Entropy of the live latents' shares of sentences / log(number of live latents): 1 = used equally.

    Over live latents only, so that an SAE with spare (empty) latents is not penalised twice (see dead_fraction);
    a taxonomy of a single category has balance 0."""
    counts = np.bincount(_np(assign), minlength=n_latents)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / math.log(len(p))) if len(p) > 1 else 0.0


def dead_fraction(assign: Any, n_latents: int) -> float:
    """Share of latents that are no sentence's argmax (an empty category)."""
    return float((np.bincount(_np(assign), minlength=n_latents) == 0).mean())


def decoder_orthogonality(decoder: Any) -> float:
    """1 - mean |cos| over distinct pairs of decoder rows (rows are renormalised here, to be safe)."""
    w = torch.as_tensor(_np(decoder), dtype=torch.float64)
    if w.shape[0] < 2:
        return 1.0
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (w @ w.T).abs()
    n = w.shape[0]
    return float(1 - (cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))


def stability(assign_a: Any, assign_b: Any) -> dict[str, float]:
    """Agreement of two assignments of the same sentences (latent ids need not correspond): ARI and NMI."""
    a, b = _np(assign_a), _np(assign_b)
    if a.shape != b.shape:
        raise ValueError(f"stability needs two assignments of the same sentences, got {a.shape} and {b.shape}")
    return {"stability_ari": float(adjusted_rand_score(a, b)),
            "stability_nmi": float(normalized_mutual_info_score(a, b))}


def deterministic_metrics(assign: Any, n_latents: int, decoder: Any = None,
                          assign_other: Optional[Sequence[Any]] = None) -> dict:
    """balance, dead_fraction, n_live; orthogonality of the LIVE latents' decoder rows; stability vs assign_other."""
    live = live_latents(assign, n_latents)
    out = {"balance": balance(assign, n_latents), "dead_fraction": dead_fraction(assign, n_latents),
           "n_live": int(len(live))}
    if decoder is not None:
        out["orthogonality"] = decoder_orthogonality(_np(decoder)[live])
    if assign_other is not None:  # one other assignment, or several (the mean agreement)
        pairs = [stability(assign, other) for other in assign_other]
        out.update({k: float(np.mean([p[k] for p in pairs])) for k in pairs[0]})
    return out


def ground_truth_metrics(assign: Any, labels: Sequence[Optional[str]]) -> dict:
    """NMI and best F1 per planted behavior (cluster_metrics.label_metrics) over the labelled sentences."""
    a = _np(assign)
    keep = [i for i, lab in enumerate(labels) if lab is not None]
    if not keep:
        return {}
    m = label_metrics(a[keep], [labels[i] for i in keep])
    return {"truth_nmi": m["nmi"], "truth_best_f1": m["best_f1"], "truth_best_latent": m["best_cluster"],
            "truth_min_f1": m["min_f1"], "truth_mean_f1": m["mean_f1"], "truth_n_labelled": len(keep)}


# ------------------------------------------------------------------------------------------------ LLM metrics


def _chunks(items: Sequence, size: int) -> list:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _rate(value: Optional[float], n_ok: int, n_failed: int, max_failure_rate: float) -> Optional[float]:
    total = n_ok + n_failed
    return None if n_ok == 0 or n_failed > max_failure_rate * total else value


def llm_metrics(judge: Any, labels: Sequence[Label], texts: Sequence[str], assign: Any, eval_idx: Sequence[int],
                *, seed: int = 0, n_accuracy: int = 50, n_completeness: int = 100, chunk_size: int = 10,
                max_failure_rate: float = 0.5) -> dict[str, Any]:
    """The paper's three metrics, asked of `judge` (an LLMJudge) about held-out sentences `eval_idx`.

    Only latents with members (labels whose source is not "empty") are categories. Returns the metrics, their
    failure counts (`*_failed` = sentences or pairs whose request failed) and per-latent values (`per_latent`).
    """
    assign, eval_idx = _np(assign), np.asarray(eval_idx)
    cats = [lab for lab in labels if lab.source != "empty"]
    by_latent = {lab.latent: lab for lab in cats}
    rng = np.random.default_rng(seed)
    asks, jobs = [], []  # jobs[i] = (metric, latent, payload) for asks[i]

    # accuracy: per category 20% members, 80% others of the held-out split, judged in shuffled chunks
    for lab in cats:
        pos = eval_idx[assign[eval_idx] == lab.latent]
        neg = eval_idx[assign[eval_idx] != lab.latent]
        n_pos = min(len(pos), max(1, round(0.2 * n_accuracy)))
        n_neg = min(len(neg), 4 * n_pos)
        if n_pos == 0:
            continue
        picked = [(int(i), True) for i in rng.choice(pos, n_pos, replace=False)]
        picked += [(int(i), False) for i in rng.choice(neg, n_neg, replace=False)]
        picked = [picked[k] for k in rng.permutation(len(picked))]
        for chunk in _chunks(picked, chunk_size):
            asks.append(membership_ask(lab, [texts[i] for i, _ in chunk]))
            jobs.append(("accuracy", lab.latent, [t for _, t in chunk]))
    # completeness: random held-out sentences, each rated against its own (assigned) category
    labelled = eval_idx[np.isin(assign[eval_idx], list(by_latent))]
    sample = rng.choice(labelled, min(n_completeness, len(labelled)), replace=False) if len(labelled) else []
    n_unlabelled = int(len(eval_idx) - len(labelled))
    for latent in sorted(by_latent):
        members = [int(i) for i in sample if assign[i] == latent]
        for chunk in _chunks(members, chunk_size):
            asks.append(completeness_ask(by_latent[latent], [texts[i] for i in chunk]))
            jobs.append(("completeness", latent, chunk))
    # independence: category i against every later category j > i (each unordered pair once)
    for i, lab in enumerate(cats):
        for chunk in _chunks(cats[i + 1:], chunk_size):
            asks.append(independence_ask(lab, chunk))
            jobs.append(("independence", lab.latent, chunk))

    replies = judge.ask_many(asks)
    per = {lab.latent: {"tp": 0, "fp": 0, "fn": 0, "acc_judged": 0, "acc_failed": 0, "scores": [], "comp_failed": 0}
           for lab in cats}
    distinct, ind_failed = [], 0
    for (metric, latent, payload), reply in zip(jobs, replies):
        p = per[latent]
        if metric == "accuracy":
            if reply is None:
                p["acc_failed"] += len(payload)
                continue
            p["acc_judged"] += len(payload)
            for truth, said in zip(payload, reply):
                p["tp"] += truth and said
                p["fp"] += said and not truth
                p["fn"] += truth and not said
        elif metric == "completeness":
            if reply is None:
                p["comp_failed"] += len(payload)
            else:
                p["scores"] += reply
        elif reply is None:
            ind_failed += len(payload)
        else:
            distinct += reply

    f1s, per_latent = [], {}
    for latent, p in per.items():
        entry: dict[str, Any] = {}
        if p["tp"] + p["fn"] > 0:  # F1 needs at least one judged member
            entry["accuracy_f1"] = 2 * p["tp"] / (2 * p["tp"] + p["fp"] + p["fn"])
            f1s.append(entry["accuracy_f1"])
        if p["scores"]:
            entry["completeness_0_10"] = float(np.mean(p["scores"]))
        per_latent[latent] = entry
    acc_failed = sum(p["acc_failed"] for p in per.values())
    acc_ok = sum(p["acc_judged"] for p in per.values())
    scores = [s for p in per.values() for s in p["scores"]]
    comp_failed = sum(p["comp_failed"] for p in per.values())
    return {
        "accuracy": _rate(float(np.mean(f1s)) if f1s else None, acc_ok, acc_failed, max_failure_rate),
        "accuracy_judged": acc_ok, "accuracy_failed": acc_failed,
        "completeness": _rate(float(np.mean(scores)) / 10 if scores else None, len(scores), comp_failed,
                              max_failure_rate),
        "completeness_0_10": float(np.mean(scores)) if scores else None,
        "completeness_judged": len(scores), "completeness_failed": comp_failed,
        "completeness_unlabelled": n_unlabelled,
        "independence": _rate(float(np.mean(distinct)) if distinct else None, len(distinct), ind_failed,
                              max_failure_rate),
        "independence_judged": len(distinct), "independence_failed": ind_failed,
        "per_latent": per_latent,
    }


# ------------------------------------------------------------------------------------------------ score and choice


def score_components(metrics: dict) -> dict[str, float]:
    """The deterministic components present in `metrics` (all in [0, 1], higher is better)."""
    return {k: metrics[k] for k in DETERMINISTIC_COMPONENTS if metrics.get(k) is not None}


def taxonomy_score(metrics: dict, kind: Optional[str] = None,
                   components: Optional[Sequence[str]] = None) -> tuple[Optional[float], str]:
    """`(score, kind)`. kind "llm": mean of the paper's three metrics (None unless all three are present);
    kind "deterministic": mean of `components` (default: every deterministic component present). Default kind:
    "llm" when all three are present, else "deterministic". See SCORE_DOC."""
    has_llm = all(metrics.get(k) is not None for k in LLM_METRICS)
    kind = kind or ("llm" if has_llm else "deterministic")
    if kind == "llm":
        return (float(np.mean([metrics[k] for k in LLM_METRICS])) if has_llm else None), kind
    comps = score_components(metrics)
    names = list(components) if components is not None else list(comps)
    values = [comps[c] for c in names if c in comps]
    return (float(np.mean(values)) if values and len(values) == len(names) else None), kind


def _selection(results: Sequence[dict]) -> tuple[str, list[str]]:
    """The score kind and deterministic components that every result supports."""
    if all(all(r["metrics"].get(k) is not None for k in LLM_METRICS) for r in results):
        return "llm", []
    common = [c for c in DETERMINISTIC_COMPONENTS if all(c in score_components(r["metrics"]) for r in results)]
    return "deterministic", common


def choose_taxonomy(results: Sequence[dict]) -> dict:
    """The result with the best comparable score (ties: the earliest). Every result gets `selection_score`."""
    if not results:
        raise ValueError("choose_taxonomy needs at least one result")
    kind, comps = _selection(results)
    best = None
    for r in results:
        r["selection_score"], r["selection_kind"] = taxonomy_score(r["metrics"], kind, comps)[0], kind
        if r["selection_score"] is not None and (best is None or r["selection_score"] > best["selection_score"]):
            best = r
    return best if best is not None else results[0]


def _summary(result: dict) -> dict:
    """A result without its per-latent sentences: labels and scores only."""
    labels = [{k: lat[k] for k in ("latent", "title", "description", "count", "frequency", "source")}
              for lat in result["latents"]]
    return {k: v for k, v in result.items() if k != "latents"} | {"labels": labels}


def write_taxonomy_json(path: str | Path, chosen: dict, all_results: Sequence[dict], selected_by: str = "score"
                        ) -> None:
    """`taxonomy.json` (atomic): the chosen SAE's full result, how it was chosen and scored, every result's summary."""
    kind, comps = _selection(all_results)
    atomic_write_json(path, {"chosen": chosen["name"], "selected_by": selected_by,
                             "score_choice": choose_taxonomy(all_results)["name"],
                             "score_kind": kind, "score_components": comps,
                             "score_doc": SCORE_DOC, "taxonomy": chosen,
                             "results": [_summary(r) for r in all_results]})


# ------------------------------------------------------------------------------------------------ one SAE


def _aligned(other: Any, n: int, eval_idx: np.ndarray) -> list[np.ndarray]:
    """`assign_other` as a list of held-out assignments (it may be one assignment or a list of them)."""
    many = isinstance(other, (list, tuple)) and len(other) > 0 and np.ndim(_np(other[0])) == 1
    out = []
    for o in (other if many else [other]):
        o = _np(o)
        if len(o) not in (n, len(eval_idx)):
            raise ValueError(f"assign_other has {len(o)} entries: give one per sentence ({n}) or per held-out one "
                             f"({len(eval_idx)})")
        out.append(o[eval_idx] if len(o) == n else o)
    return out


def interpret_sae(name: str, texts: Sequence[str], codes: Tensor, assign: Tensor, labeller: Labeller, *,
                  train_idx: Optional[Sequence[int]] = None, eval_idx: Optional[Sequence[int]] = None,
                  decoder: Any = None, assign_other: Any = None, labels: Optional[Sequence[Optional[str]]] = None,
                  n_member_sentences: int = 200, seed: int = 0, info: Optional[dict] = None,
                  llm_kwargs: Optional[dict] = None) -> dict:
    """Label one SAE's latents from `train_idx` sentences and measure its taxonomy on `eval_idx` sentences.

    `assign_other`: another assignment of the same sentences (all n, or the held-out ones), e.g. by the same-size SAE
    of another seed, or a list of them (mean agreement), for stability.
    Returns a JSON-able dict: name, info, n_latents, metrics (with `score`, `score_kind`), latents (per latent:
    title, description, keywords, source, count, frequency, top sentences with activations, per-latent metrics)
    and the judge's counters when the labeller is an LLM.
    """
    n, n_latents = len(texts), int(codes.shape[1])
    all_idx = np.arange(n)
    train_idx = all_idx if train_idx is None else np.asarray(train_idx)
    eval_idx = all_idx if eval_idx is None else np.asarray(eval_idx)
    a = _np(assign)
    members = latent_members(texts, codes, assign, n_member_sentences, seed, train_idx)
    names = labeller.label(members)
    metrics = deterministic_metrics(a[eval_idx], n_latents, decoder,
                                    None if assign_other is None else _aligned(assign_other, n, eval_idx))
    if labels is not None:
        metrics.update(ground_truth_metrics(a[eval_idx], [labels[i] for i in eval_idx]))
    per_latent: dict[int, dict] = {}
    if getattr(labeller, "is_llm", False):
        llm = llm_metrics(labeller, names, texts, a, eval_idx, seed=seed, **(llm_kwargs or {}))
        per_latent = llm.pop("per_latent")
        metrics.update(llm)
    metrics["score"], metrics["score_kind"] = taxonomy_score(metrics)
    latents = []
    for m, lab in zip(members, names):
        entry = {k: v for k, v in asdict(lab).items()} | {"count": m.count, "frequency": m.frequency,
                                                          "n_shown": len(m.sentences)}
        top = sorted(zip(m.activations[:m.n_top], m.sentences[:m.n_top]), key=lambda t: -t[0])[:10]
        entry["top_sentences"] = [[s, a_] for a_, s in top]
        # random members: what a typical member looks like (the labeller's random half; for a small latent,
        # shown whole, a seeded sample of the members beyond the top 10)
        shown = list(zip(m.sentences, m.activations))
        pool = shown[m.n_top:] or shown[10:] or shown
        pick = sorted(random.Random(seed * 100_003 + m.latent).sample(range(len(pool)), min(10, len(pool))))
        entry["random_sentences"] = [list(pool[i]) for i in pick]
        entry["metrics"] = dict(per_latent.get(m.latent, {}))
        if labels is not None and m.indices:
            truth = [labels[i] for i in m.indices if labels[i] is not None]
            if truth:
                major = max(sorted(set(truth)), key=truth.count)
                entry["metrics"] |= {"truth_majority": major, "truth_purity": truth.count(major) / len(truth)}
        latents.append(entry)
    out = {"name": name, "info": dict(info or {}), "n_latents": n_latents, "metrics": metrics, "latents": latents}
    if hasattr(labeller, "stats"):
        out["judge_stats"] = labeller.stats()
    return out


# ------------------------------------------------------------------------------------------------ W&B


LATENT_TABLE_COLUMNS = ["latent", "title", "description", "frequency", "count", "source", "metrics", "top_sentences",
                        "random_sentences"]


def wandb_latent_table_rows(result: dict, n_top: int = 5) -> tuple[list[str], list[list]]:
    """`(columns, rows)` of one taxonomy's latent browser: per latent its label, frequency, metrics (JSON), top
    and random member sentences with activations ("0.93  Check: 66 + 19 = 85.", one per line). The caller logs
    the table."""
    rows = []
    for lat in result["latents"]:
        top, rand = ("\n".join(f"{act:.3f}  {s}" for s, act in lat.get(key, [])[:n_top])
                     for key in ("top_sentences", "random_sentences"))
        rows.append([lat["latent"], lat["title"], lat["description"], lat["frequency"], lat["count"], lat["source"],
                     json.dumps(lat["metrics"], sort_keys=True), top, rand])
    return list(LATENT_TABLE_COLUMNS), rows
