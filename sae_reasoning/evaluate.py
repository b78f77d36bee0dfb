"""eval.py: base, thinking and hybrid (and the controls) on a question set; accuracy, gap recovered, plots.

Run folder layout:
    generations/<method>/shard-XXXXX.jsonl   per-problem records (resumable: a rerun generates missing shards only)
    generations/<method>/judge.jsonl         eval.second_opinion: the LLM judge's saved verdicts (resumable)
    results.jsonl                            every problem x method: extracted answer, decision, stats
                                             (+ judge_correct, judge_reply with eval.second_opinion)
    summary.json                             per method: accuracy + bootstrap 95% CI, gap recovered + CI, token stats
                                             (+ second_opinion: judge accuracy, agreement, failures, disagreements)
    accuracy.png, behaviors.png              accuracy per method with CIs; behavior usage of the hybrid methods
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sae_reasoning.artifacts import atomic_write_json, atomic_write_text, fill_shards, read_jsonl, shards_done
from sae_reasoning.data import Question
from sae_reasoning.grading import grade

BaselineMethods = ("base", "thinking")
HYBRID_METHODS = ("hybrid", "bias_only", "random_behavior", "random_vectors", "oracle", "unsteered_rerank")
METHOD_DOC = {
    "base": "base model, base prompt, greedy",
    "thinking": "thinking model, chat template, greedy, full budget",
    "hybrid": "base writes, thinking model + SAE choose the behavior vector",
    "bias_only": "control: only the bias vector",
    "random_behavior": "control: behavior chosen at random at the same decision points",
    "random_vectors": "control: random vectors of matched norm",
    "oracle": "control: thinking model's token wherever greedy base and thinking disagree (no steering)",
    "unsteered_rerank": "control: candidate mode without steering (thinking model re-ranks base candidates)",
}

BatchFn = Callable[[Sequence[Question], int], list[dict]]


def run_sharded(folder: Path, questions: Sequence[Question], batch_size: int, fn: BatchFn, desc: str,
                progress: bool = True, key: str = "") -> list[dict]:
    """Apply `fn(batch, batch_index)` to fixed batches of questions; one JSONL shard per batch, written atomically,
    so an interrupted run resumes with the missing batches only (no duplicated or lost problems). `key` fingerprints
    everything the generations depend on: shards made under another key are stale and are regenerated. So are
    shards cut with another batch size (shard b holds batch b: read with another size they would lose or repeat
    problems, e.g. after a rerun with a smaller eval.batch_size following an out-of-memory kill)."""
    def make_lines(batch: Sequence[Question], b: int) -> list[str]:
        records = fn(batch, b)
        if len(records) != len(batch):
            raise RuntimeError(f"{desc}: batch {b} returned {len(records)} records for {len(batch)} questions")
        return [json.dumps({"id": q.id, **r}, ensure_ascii=False) + "\n" for q, r in zip(batch, records)]

    shards = fill_shards(folder, questions, batch_size, make_lines, stamp={"key": key}, desc=desc, progress=progress)
    return [r for path in shards for r in read_jsonl(path)]


def sharded_done(folder: Path, questions: Sequence[Question], batch_size: int, key: str = "") -> bool:
    """Whether `run_sharded` with these arguments would find every shard done (and call `fn` for none)."""
    return shards_done(folder, len(questions), batch_size, {"key": key})


# ------------------------------------------------------------------------------------------------ statistics


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of a mean."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def gap_recovered(method: np.ndarray, base: np.ndarray, thinking: np.ndarray, n_boot: int = 2000,
                  seed: int = 0) -> dict[str, float | None]:
    """(method - base) / (thinking - base) with a paired bootstrap CI over problems (same resampled problems for
    all three). None when the gap is zero."""
    gap = thinking.mean() - base.mean()
    point = float((method.mean() - base.mean()) / gap) if gap != 0 else None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(method), size=(n_boot, len(method)))
    gaps = thinking[idx].mean(1) - base[idx].mean(1)
    ok = gaps != 0
    ratios = (method[idx].mean(1)[ok] - base[idx].mean(1)[ok]) / gaps[ok]
    if point is None or not ok.any():
        return {"gap_recovered": point, "gap_recovered_ci": None}
    return {"gap_recovered": point,
            "gap_recovered_ci": [float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))]}


def summarise(results: dict[str, list[dict]], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Per method: accuracy + CI, length, truncation, steering stats; gap recovered when base and thinking ran."""
    ids = [r["id"] for r in next(iter(results.values()))]
    correct = {}
    summary: dict[str, Any] = {}
    for method, records in results.items():
        by_id = {r["id"]: r for r in records}
        c = np.array([float(by_id[i]["correct"]) for i in ids])
        correct[method] = c
        lo, hi = bootstrap_ci(c, n_boot, seed)
        s = {"n": len(c), "accuracy": float(c.mean()), "accuracy_ci": [lo, hi], "doc": METHOD_DOC.get(method, ""),
             "mean_length": float(np.mean([r["n_new_tokens"] for r in records])),
             "truncation_rate": float(np.mean([r["truncated"] for r in records]))}
        for key in ("steered_fraction", "changed_fraction", "disagreement_rate"):
            values = [r[key] for r in records if r.get(key) is not None]
            if values:
                s[key] = float(np.mean(values))
        usage = Counter()
        for r in records:
            usage.update({str(k): v for k, v in (r.get("behavior_counts") or {}).items()})
        if usage:
            s["behavior_usage"] = dict(sorted(usage.items()))
        if any("judge_correct" in r for r in records):  # eval.second_opinion: the LLM judge beside math-verify
            from sae_reasoning.answer_judge import summarise_second_opinion

            s["second_opinion"] = summarise_second_opinion([by_id[i] for i in ids])
        summary[method] = s
    if "base" in correct and "thinking" in correct:
        for method, c in correct.items():
            if method not in ("base", "thinking"):
                summary[method].update(gap_recovered(c, correct["base"], correct["thinking"], n_boot, seed))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    head = f"{'method':<18}{'accuracy':>9}  {'95% CI':<15}{'gap rec.':>9}  {'95% CI':<17}{'steered':>8}" \
           f"{'changed':>8}{'length':>8}{'trunc.':>7}"
    lines = [head, "-" * len(head)]
    for method, s in summary.items():
        ci = "[{:.3f}, {:.3f}]".format(*s["accuracy_ci"])
        gap = f"{s['gap_recovered']:.3f}" if s.get("gap_recovered") is not None else "-"
        gci = "[{:.2f}, {:.2f}]".format(*s["gap_recovered_ci"]) if s.get("gap_recovered_ci") else "-"
        st = f"{s['steered_fraction']:.3f}" if "steered_fraction" in s else "-"
        ch = f"{s['changed_fraction']:.3f}" if "changed_fraction" in s else "-"
        lines.append(f"{method:<18}{s['accuracy']:>9.3f}  {ci:<15}{gap:>9}  {gci:<17}{st:>8}{ch:>8}"
                     f"{s['mean_length']:>8.1f}{s['truncation_rate']:>7.3f}")
    if any(s.get("second_opinion") for s in summary.values()):
        from sae_reasoning.answer_judge import format_second_opinion

        lines += ["", format_second_opinion(summary)]
    return "\n".join(lines)


def plot_summary(summary: dict[str, Any], run_dir: Path) -> list[Path]:
    """accuracy.png (per method, 95% CI error bars) and behaviors.png (behavior usage of hybrid methods)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    acc = [summary[m]["accuracy"] for m in methods]
    err = np.array([[a - summary[m]["accuracy_ci"][0], summary[m]["accuracy_ci"][1] - a] for m, a in
                    zip(methods, acc)]).T
    fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 2, 4))
    ax.bar(methods, acc, yerr=err, capsize=4, color=["#999" if m in BaselineMethods else "#4a7ab5" for m in methods])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% bootstrap CI)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    paths = [run_dir / "accuracy.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    hybrid = [m for m in methods if summary[m].get("behavior_usage")]
    if hybrid:
        behaviors = sorted({b for m in hybrid for b in summary[m]["behavior_usage"]})
        fig, ax = plt.subplots(figsize=(1.2 * len(hybrid) + 3, 4))
        bottom = np.zeros(len(hybrid))
        for b in behaviors:
            counts = np.array([summary[m]["behavior_usage"].get(b, 0) for m in hybrid], dtype=float)
            totals = np.array([max(sum(summary[m]["behavior_usage"].values()), 1) for m in hybrid])
            ax.bar(hybrid, counts / totals, bottom=bottom, label=b)
            bottom += counts / totals
        ax.set_ylabel("share of steered tokens")
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        fig.tight_layout()
        paths.append(run_dir / "behaviors.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def grade_records(records: list[dict], questions: Sequence[Question]) -> list[dict]:
    by_id = {q.id: q for q in questions}
    for r in records:
        q = by_id[r["id"]]
        g = grade(r["completion"], q.gold, kind=q.kind if q.kind in ("math", "number") else "math")
        r.update(correct=g.correct, extracted=g.extracted, extraction=g.method, gold=q.gold)
    return records


def write_results(run_dir: Path, results: dict[str, list[dict]], summary: dict) -> None:
    lines = []
    for method, records in results.items():
        for r in records:
            keep = {k: v for k, v in r.items() if k not in ("completion_ids",)}
            lines.append(json.dumps({"method": method, **keep}, ensure_ascii=False) + "\n")
    atomic_write_text(run_dir / "results.jsonl", "".join(lines))
    atomic_write_json(run_dir / "summary.json", summary)
