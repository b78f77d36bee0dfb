"""eval.py statistics against independent computations: bootstrap CIs, gap recovered, the summary table."""

import numpy as np

from sae_reasoning.evaluate import bootstrap_ci, gap_recovered, summarise


def test_bootstrap_ci_matches_a_plain_loop():
    rng = np.random.default_rng(1)
    values = (rng.random(200) < 0.3).astype(float)
    lo, hi = bootstrap_ci(values, n_boot=500, seed=7)
    gen = np.random.default_rng(7)
    idx = gen.integers(0, len(values), size=(500, len(values)))
    means = [values[row].mean() for row in idx]
    assert (lo, hi) == (np.quantile(means, 0.025), np.quantile(means, 0.975))
    assert lo < values.mean() < hi


def test_gap_recovered_point_and_paired_ci():
    base = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=float)
    thinking = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=float)
    hybrid = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=float)
    g = gap_recovered(hybrid, base, thinking, n_boot=300, seed=0)
    assert abs(g["gap_recovered"] - (0.5 - 0.1) / (0.8 - 0.1)) < 1e-12
    lo, hi = g["gap_recovered_ci"]
    assert lo <= g["gap_recovered"] <= hi
    assert gap_recovered(hybrid, base, base)["gap_recovered"] is None  # no gap: undefined, not a division by zero


def test_summarise_per_method():
    recs = lambda correct, extra=None: [{"id": f"q{i}", "correct": c, "n_new_tokens": 10 + i, "truncated": i == 0,
                                         **(extra or {})} for i, c in enumerate(correct)]
    results = {"base": recs([0, 0, 1, 0]), "thinking": recs([1, 1, 1, 0]),
               "hybrid": recs([1, 0, 1, 0], {"steered_fraction": 0.25, "behavior_counts": {"3 plan": 2}})}
    s = summarise(results, n_boot=100)
    assert s["base"]["accuracy"] == 0.25 and s["thinking"]["accuracy"] == 0.75 and s["hybrid"]["accuracy"] == 0.5
    assert s["hybrid"]["gap_recovered"] == (0.5 - 0.25) / (0.75 - 0.25)
    assert s["hybrid"]["steered_fraction"] == 0.25 and s["hybrid"]["behavior_usage"] == {"3 plan": 8}
    assert s["base"]["truncation_rate"] == 0.25 and s["base"]["mean_length"] == 11.5
