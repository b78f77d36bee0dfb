"""Interpretation on organism sentences with planted behaviors: members, offline labels, metrics checked against
independent computations, LLM metrics through a scripted judge (failures counted, never scored), the choice."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from sae_reasoning.interpret import (balance, choose_taxonomy, dead_fraction, decoder_orthogonality, interpret_sae,
                                     latent_members, stability, taxonomy_score, wandb_latent_table_rows,
                                     write_taxonomy_json)
from sae_reasoning.judges import LLMJudge, OfflineLabeller
from sae_reasoning.organism.corpus import BEHAVIORS, label_sentence, trace_sentences
from sae_reasoning.organism.task import sample_problem

CHARACTERISTIC = {"plan": ("plan", "operations"), "compute": ("step",), "verify": ("check",),
                  "correct": ("wait", "carry"), "conclude": ("answer",)}


@pytest.fixture(scope="module")
def organism():
    rng = random.Random(0)
    sents = [s for _ in range(300) for s in trace_sentences(sample_problem(rng, rng.randint(1, 4)))]
    texts, labels = [s.text for s in sents], [s.behavior for s in sents]
    perm = np.random.default_rng(0).permutation(len(texts))
    return texts, labels, perm[: len(texts) // 2], perm[len(texts) // 2:]  # train / held-out halves


def planted_sae(labels, noise: float, seed: int, n_latents: int = 5):
    """Codes of a top-3 SAE whose argmax is the planted behavior, except a `noise` share of random reassignments."""
    g = np.random.default_rng(seed)
    assign = np.array([BEHAVIORS.index(b) for b in labels])
    flip = g.random(len(assign)) < noise
    assign[flip] = g.integers(0, n_latents, flip.sum())
    codes = np.zeros((len(assign), n_latents), dtype=np.float32)
    for i, j in enumerate(assign):
        others = g.choice([k for k in range(n_latents) if k != j], 2, replace=False)
        codes[i, others] = g.random(2) * 0.5
        codes[i, j] = 0.6 + 0.4 * g.random() if flip[i] else 1 + g.random()  # misassigned: borderline
    decoder = torch.nn.functional.normalize(torch.randn(n_latents, 32, generator=torch.Generator().manual_seed(seed)),
                                            dim=1)
    return torch.from_numpy(codes), torch.from_numpy(assign), decoder


def test_latent_members_half_top_half_random(organism):
    texts, labels, train, _ = organism
    codes, assign, _ = planted_sae(labels, 0.05, seed=1)
    members = latent_members(texts, codes, assign, n_member_sentences=20, seed=3, idx=train)
    assert [m.latent for m in members] == list(range(5))
    compute = members[BEHAVIORS.index("compute")]
    j = compute.latent
    pool = [int(i) for i in train if assign[i] == j]
    assert compute.count == len(pool) and compute.frequency == pytest.approx(len(pool) / len(train))
    assert len(compute.sentences) == 20 and compute.n_top == 10 and len(set(compute.indices)) == 20
    assert set(compute.indices) <= set(pool)
    top_acts = sorted((float(codes[i, j]) for i in pool), reverse=True)[:10]
    assert compute.activations[:10] == pytest.approx(top_acts)
    assert compute.sentences == [texts[i] for i in compute.indices]
    again = latent_members(texts, codes, assign, n_member_sentences=20, seed=3, idx=train)[j]
    other = latent_members(texts, codes, assign, n_member_sentences=20, seed=4, idx=train)[j]
    assert again.indices == compute.indices and other.indices[10:] != compute.indices[10:]
    small = latent_members(texts, codes, assign, n_member_sentences=10_000, idx=train)[j]
    assert sorted(small.indices) == sorted(pool) and small.n_top == len(pool)


def test_offline_titles_name_each_planted_behavior(organism):
    texts, labels, train, _ = organism
    codes, assign, _ = planted_sae(labels, 0.1, seed=2)
    members = latent_members(texts, codes, assign, 200, seed=0, idx=train)
    names = OfflineLabeller().label(members)
    assert names == OfflineLabeller().label(members)  # deterministic
    for behavior, words in CHARACTERISTIC.items():
        title = names[BEHAVIORS.index(behavior)].title
        assert any(w in title.split(" / ") for w in words), (behavior, title)
        assert not re.search(r"\d", title)
    verify = names[BEHAVIORS.index("verify")]
    assert verify.description.count('"Check:') >= 3  # representative sentences, by activation


def test_deterministic_metrics_match_independent_computations():
    assign = np.array([0, 0, 0, 1, 1, 3, 3, 3, 3, 0])
    p = np.array([4, 2, 0, 4]) / 10
    entropy = -sum(x * math.log(x) for x in p if x > 0)
    assert balance(assign, 4) == pytest.approx(entropy / math.log(3))  # over the 3 live latents
    assert balance(np.zeros(5, int), 4) == 0.0
    assert dead_fraction(assign, 4) == 0.25
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    w = w / w.norm(dim=1, keepdim=True)
    cos = [abs(float(w[i] @ w[j])) for i in range(6) for j in range(6) if i != j]
    assert decoder_orthogonality(w) == pytest.approx(1 - np.mean(cos))
    assert decoder_orthogonality(torch.eye(4)) == pytest.approx(1.0)
    other = np.array([1, 1, 1, 0, 0, 2, 2, 2, 0, 1])
    s = stability(assign, other)
    assert s["stability_nmi"] == pytest.approx(normalized_mutual_info_score(assign, other))
    assert s["stability_ari"] == pytest.approx(adjusted_rand_score(assign, other))
    assert stability(assign, (assign + 1) % 4)["stability_ari"] == pytest.approx(1.0)  # ids need not match


def test_interpret_sae_offline_result(organism, tmp_path):
    texts, labels, train, held = organism
    codes, assign, decoder = planted_sae(labels, 0.05, seed=3)
    _, other, _ = planted_sae(labels, 0.05, seed=4)
    r = interpret_sae("L0-5", texts, codes, assign, OfflineLabeller(), train_idx=train, eval_idx=held,
                      decoder=decoder, assign_other=other, labels=labels, info={"layer": 0})
    m = r["metrics"]
    a_held = assign.numpy()[held]
    assert m["truth_nmi"] == pytest.approx(normalized_mutual_info_score([labels[i] for i in held], a_held))
    assert m["stability_nmi"] == pytest.approx(normalized_mutual_info_score(a_held, other.numpy()[held]))
    assert m["balance"] == pytest.approx(balance(a_held, 5))
    assert m["score_kind"] == "deterministic"
    assert m["score"] == pytest.approx(np.mean([m["balance"], m["orthogonality"], m["stability_nmi"]]))
    assert m["n_live"] == 5 and m["dead_fraction"] == 0.0
    _, other2, _ = planted_sae(labels, 0.3, seed=8)
    both = interpret_sae("x", texts, codes, assign, OfflineLabeller(), eval_idx=held, assign_other=[other, other2])
    s2 = stability(a_held, other2.numpy()[held])["stability_nmi"]
    assert both["metrics"]["stability_nmi"] == pytest.approx((m["stability_nmi"] + s2) / 2)
    assert "accuracy" not in m and "judge_stats" not in r
    lat = r["latents"][BEHAVIORS.index("verify")]
    assert lat["metrics"]["truth_majority"] == "verify" and lat["metrics"]["truth_purity"] > 0.8
    assert [a for _, a in lat["top_sentences"]] == sorted((a for _, a in lat["top_sentences"]), reverse=True)
    columns, rows = wandb_latent_table_rows(r, n_top=2)
    assert len(rows) == 5 and len(rows[0]) == len(columns) and columns[:2] == ["latent", "title"]
    top, rand = rows[2][-2], rows[2][-1]
    assert rows[2][1] == lat["title"] and top.count("\n") == 1 and "Check:" in top
    # random members are members too (their argmax is this latent), shown after the top ones
    members = {texts[i] for i in np.flatnonzero(assign.numpy() == BEHAVIORS.index("verify"))}
    assert lat["random_sentences"] and {s for s, _ in lat["random_sentences"]} <= members
    assert rand.count("\n") == 1 and rand.split("  ", 1)[1].split("\n")[0] == lat["random_sentences"][0][0]
    json.dumps(r)  # JSON-able


class OrganismJudge(LLMJudge):
    """An LLM stand-in that answers by the sentences' true behaviors; categories titled in `fail` get garbage."""

    backend = "organism-oracle"

    def __init__(self, fail=(), **kw):
        super().__init__("oracle", backoff_s=0.0, max_retries=1, **kw)
        self.fail = set(fail)

    def _complete(self, messages, attempt):
        text = messages[-1]["content"]
        items = re.findall(r"^\d+\. (.*)$", text, re.M)
        if text.startswith("These sentences"):
            title = Counter(label_sentence(s) for s in items).most_common(1)[0][0]
            return json.dumps({"title": title, "description": f"{title} sentences"})
        title = re.match(r"Category(?: A)?: (\w+):", text).group(1)
        if title in self.fail:
            return '{"decisions": [tru'
        if text.startswith("Category A"):
            return json.dumps({"distinct": [o.split(":")[0] != title for o in items]})
        if "rate from 0" in text:
            return json.dumps({"scores": [10 if label_sentence(s) == title else 0 for s in items]})
        return json.dumps({"decisions": [label_sentence(s) == title for s in items]})


def test_llm_metrics_count_failures_and_never_score_them(organism):
    texts, labels, train, held = organism
    codes, assign, decoder = planted_sae(labels, 0.0, seed=5)
    judge = OrganismJudge(fail={"correct"})
    r = interpret_sae("L0-5", texts, codes, assign, judge, train_idx=train, eval_idx=held, decoder=decoder,
                      labels=labels, llm_kwargs={"n_accuracy": 50, "n_completeness": 100})
    m = r["metrics"]
    assert [lat["title"] for lat in r["latents"]] == list(BEHAVIORS)
    assert m["accuracy"] == 1.0 and m["completeness"] == 1.0 and m["independence"] == 1.0
    assert m["accuracy_failed"] == 50 and m["accuracy_judged"] == 200  # the "correct" category: 10 + 40 sentences
    held_correct = sum(int(assign[i]) == BEHAVIORS.index("correct") for i in held)
    assert 0 < m["completeness_failed"] <= held_correct
    assert m["independence_failed"] == 1 and m["independence_judged"] == 9  # pair (correct, conclude) failed
    assert "accuracy_f1" not in r["latents"][BEHAVIORS.index("correct")]["metrics"]
    assert m["score_kind"] == "llm" and m["score"] == 1.0
    n_failed_requests = 5 + math.ceil(m["completeness_failed"] / 10) + 1
    assert r["judge_stats"]["failures"] == n_failed_requests
    assert r["judge_stats"]["retries"] == n_failed_requests  # max_retries=1: each failure was asked twice
    strict = interpret_sae("x", texts, codes, assign, OrganismJudge(fail={"correct"}), train_idx=train,
                           eval_idx=held, llm_kwargs={"max_failure_rate": 0.1})["metrics"]
    assert strict["accuracy"] is None and strict["score_kind"] == "deterministic"  # 20% failed > 10% allowed


def test_taxonomy_score_kinds():
    m = {"balance": 0.8, "dead_fraction": 0.2, "orthogonality": 0.6}
    assert taxonomy_score(m) == (pytest.approx(0.7), "deterministic")  # dead_fraction is reported, not scored
    m |= {"accuracy": 0.9, "completeness": 0.6, "independence": 0.3}
    assert taxonomy_score(m) == (pytest.approx(0.6), "llm")
    assert taxonomy_score(m | {"independence": None})[1] == "deterministic"


@pytest.mark.parametrize("judge", [None, "llm"])
def test_choose_taxonomy_picks_planted_structure(organism, tmp_path, judge):
    texts, labels, train, held = organism
    results = []
    for name, seed, shuffle in [("shuffled", 7, True), ("planted", 6, False)]:
        codes, assign, decoder = planted_sae(labels, 0.1, seed=seed)
        _, other, _ = planted_sae(labels, 0.1, seed=seed + 100)
        if shuffle:  # same latent use, no relation to the behaviors, unstable across seeds
            g = torch.Generator().manual_seed(seed)
            perm = torch.randperm(len(texts), generator=g)
            codes, assign, other = codes[perm], assign[perm], other[torch.randperm(len(texts), generator=g)]
        labeller = OfflineLabeller() if judge is None else OrganismJudge()
        results.append(interpret_sae(name, texts, codes, assign, labeller, train_idx=train, eval_idx=held,
                                     decoder=decoder, assign_other=other, labels=labels))
    chosen = choose_taxonomy(results)
    assert chosen["name"] == "planted" and chosen["metrics"]["truth_nmi"] >= 0.8
    assert chosen["selection_kind"] == ("deterministic" if judge is None else "llm")
    assert results[0]["selection_score"] < chosen["selection_score"]
    write_taxonomy_json(tmp_path / "taxonomy.json", chosen, results)
    out = json.loads((tmp_path / "taxonomy.json").read_text())
    assert out["chosen"] == "planted" and out["score_kind"] == chosen["selection_kind"]
    assert out["taxonomy"]["latents"][0]["title"] and len(out["results"]) == 2
    assert [len(r["labels"]) for r in out["results"]] == [5, 5] and "latents" not in out["results"][0]


def test_choose_taxonomy_compares_like_with_like():
    base = {"balance": 0.5, "dead_fraction": 0.0, "orthogonality": 0.5}
    a = {"name": "a", "metrics": base | {"stability_nmi": 0.1}, "latents": []}
    b = {"name": "b", "metrics": dict(base), "latents": []}  # no stability: dropped for both
    c = {"name": "c", "metrics": base | {"orthogonality": 0.6, "accuracy": 1.0, "completeness": 1.0,
                                         "independence": 1.0}, "latents": []}
    assert choose_taxonomy([a, b, c])["name"] == "c"  # c lacks nothing deterministic and is more orthogonal
    assert a["selection_kind"] == "deterministic" and a["selection_score"] == b["selection_score"]


def test_select_taxonomy_by_score_truth_or_name():
    from sae_reasoning.errors import UserError
    from sae_reasoning.interpret_stage import select_taxonomy

    base = {"balance": 0.5, "dead_fraction": 0.0, "orthogonality": 0.5, "stability_nmi": 1.0}
    a = {"name": "layer0_n5_k3_seed0", "metrics": base | {"balance": 0.9, "truth_nmi": 0.7}, "latents": []}
    b = {"name": "layer1_n5_k1_seed0", "metrics": base | {"truth_nmi": 1.0}, "latents": []}
    assert select_taxonomy([a, b], "score")["name"] == a["name"]  # more balanced
    assert select_taxonomy([a, b], "truth")["name"] == b["name"]  # what the planted labels say
    assert select_taxonomy([a, b], b["name"]) is b
    with pytest.raises(UserError, match="no such SAE.*layer0_n5_k3_seed0"):
        select_taxonomy([a, b], "layer9_n5_k3_seed0")
    no_truth = [{**r, "metrics": {k: v for k, v in r["metrics"].items() if k != "truth_nmi"}} for r in (a, b)]
    with pytest.raises(UserError, match="needs ground-truth"):
        select_taxonomy(no_truth, "truth")
