"""Steering vectors (steering.py) on the tiny real Llama stories260K: examples, objective, hook, generation, files.

Synthetic "thinking traces" are short stories in which one sentence per trace has a distinctive form (it starts
with the rare word "Zebra"); the behavior latent 0 is those sentences, latent 1 the rest. An SAE-shaped linear
probe (a real TopKSAE whose encoder is the mean difference of the two groups) stands in for a trained SAE when
classifying generations. The organism test at the end runs only once the organism's weights exist.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import torch

from sae_reasoning import steering as st
from sae_reasoning.activations import ActivationStore, extract_activations
from sae_reasoning.errors import UserError
from sae_reasoning.hooks import add_to_resid_post, capture_resid_post, positions_delta
from sae_reasoning.models import LoadedModel, load_model
from sae_reasoning.prompts import base_prompt
from sae_reasoning.sae import TopKSAE, normalise
from sae_reasoning.sentences import thinking_span
from sae_reasoning.tracking import Tracker

STEER_LAYER = 2
SAE_LAYER = 3
NORMAL = ["Tom ran to the park.", "Lily had a big red ball.", "The sun was hot and bright.", "Mom made a cake for Sue.",
          "The dog wanted to play.", "Ben saw a little bird.", "They went home together.", "The cat sat on the mat."]
ZEBRA = ["Zebra ran to the tree.", "Zebra saw a big fish.", "Zebra was very happy.", "Zebra said hello to Tom.",
         "Zebra liked the red ball.", "Zebra jumped in the water."]


def story_traces(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    traces = []
    for i in range(n):
        sents = rng.sample(NORMAL, 3)
        sents.insert(rng.randint(0, 3), rng.choice(ZEBRA))  # sometimes the first thinking sentence
        traces.append({"id": f"t{i}", "question": f"Tell a story about friend number {i}.",
                       "prompt": f"user: story {i}\nassistant: <think>\n",
                       "completion": " ".join(sents) + "\n</think>\nThe end."})
    return traces


@pytest.fixture(scope="module")
def lm(stories_path):
    return load_model(str(stories_path), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def data(lm, tmp_path_factory):
    """Traces, the real sentence index and activations (layers 2, 3), and the planted assignment."""
    traces = story_traces(48)
    folder = extract_activations(lm, traces, [SAE_LAYER], tmp_path_factory.mktemp("acts"), batch_size=16,
                                 min_words=3, progress=False)
    store = ActivationStore(folder)
    index = store.index()
    assign = torch.tensor([0 if r["text"].startswith("Zebra") else 1 for r in index])
    codes = torch.zeros(len(index), 3)
    codes[torch.arange(len(index)), assign] = 1.0 + torch.arange(len(index)) / 1000  # distinct activations
    return {"traces": traces, "index": index, "assign": assign, "codes": codes, "acts": store.load(SAE_LAYER)}


@pytest.fixture(scope="module")
def examples(lm, data):
    sets, skipped = st.build_examples(data["traces"], data["index"], data["codes"], data["assign"], [0, 1, 2], 24,
                                      base=lm, val_fraction=0.25, seed=0)
    return sets, skipped


def probe_sae(acts: torch.Tensor, assign: torch.Tensor) -> TopKSAE:
    """A 2-latent, k=1 TopKSAE that is a linear probe: latent 0 = closer to the Zebra sentences' mean."""
    sae = TopKSAE(acts.shape[1], 2, k=1)
    norm_mean = acts.mean(0)
    x_n = normalise(acts, norm_mean)
    mu0, mu1 = x_n[assign == 0].mean(0), x_n[assign == 1].mean(0)
    w = mu0 - mu1
    c = float(w @ (mu0 + mu1) / 2)
    params = {"W_enc": torch.stack([w, -w], 1), "b_enc": torch.tensor([-c, c]),
              "W_dec": torch.stack([w, -w]) / w.norm(), "b_dec": torch.zeros(acts.shape[1])}
    return sae.load_params(params, norm_mean)


# ------------------------------------------------------------------------------------------- examples, seam


def test_examples_selection_split_and_skip(lm, examples, data):
    sets, skipped = examples
    assert set(sets) == {0, 1} and 2 in skipped and "no sentence" in skipped[2]
    for latent, ex in sets.items():
        assert (len(ex.train), len(ex.val)) == (18, 6)
        keys = {(e.trace_id, e.sentence_index) for e in ex.train}
        assert keys.isdisjoint({(e.trace_id, e.sentence_index) for e in ex.val})
        for e in ex.train + ex.val:
            assert (e.target.startswith("Zebra")) == (latent == 0)
            trace = next(t for t in data["traces"] if t["id"] == e.trace_id)
            text = trace["prompt"] + trace["completion"]
            assert text.startswith(e.thinking_prefix + e.target)  # the sentence's own span, not a search
            t0 = thinking_span(text)[0]
            assert t0 == len(trace["prompt"]) - 1  # right after "<think>"
            # the base context: base prompt + " " + the thinking text so far, verbatim
            assert e.context == base_prompt(trace["question"]) + " " + e.thinking_prefix[t0:].lstrip()
    assert (sets[0].n_candidates, sets[1].n_candidates) == (48, 144)
    # too few examples -> skipped with a reason naming the count
    few, why = st.build_examples(data["traces"], data["index"], data["codes"], data["assign"], [0], 3,
                                 base=lm, min_examples=8)
    assert few == {} and "only 6 usable examples" in why[0]


def test_hardest_examples_are_kept(lm, data):
    """Of the 2n top-activation candidates, the n with the highest unsteered CE are kept."""
    sets, _ = st.build_examples(data["traces"], data["index"], data["codes"], data["assign"], [1], 10, base=lm,
                                seed=0)
    kept = sets[1].train + sets[1].val
    members = (data["assign"] == 1).nonzero().flatten()
    top20 = members[torch.sort(data["codes"][members, 1], descending=True, stable=True).indices[:20]].tolist()
    cands = [st.sentence_example(next(t for t in data["traces"] if t["id"] == data["index"][i]["trace_id"]),
                                 data["index"][i]["char_start"], data["index"][i]["char_end"], lm.tokenizer)
             for i in top20]
    losses = st.example_losses(lm, None, cands, 0).tolist()
    threshold = sorted(losses, reverse=True)[9]
    assert len(kept) == 10 and min(e.base_loss for e in kept) >= threshold - 1e-6
    assert {e.target for e in kept} <= {c.target for c in cands}


def test_no_special_token_at_the_seam(lm, examples):
    tok = lm.tokenizer
    special = set(tok.all_special_ids)
    # the reference mistake: tokenising the target on its own puts a BOS in front of it
    assert tok("Zebra saw a big fish.")["input_ids"][0] == tok.bos_token_id
    sets, _ = examples
    exs = sets[0].train + sets[0].val
    assert any(e.context.endswith("answer: ") for e in exs)  # some targets are the first thinking sentence
    for e in exs:
        ids = e.input_ids
        assert ids[0] == tok.bos_token_id and not special & set(ids[1:])
        assert ids[1:] == tok(e.context + e.target, add_special_tokens=False)["input_ids"]  # joined, once
        assert tok.decode(ids[e.t_start: e.t_end]).strip() == e.target
        assert e.t_end == len(ids)  # the target ends the example
        assert tok.decode(ids[1: e.t_start]).strip() == e.context.strip()


def test_bias_examples(lm, data):
    train, val = st.bias_examples(data["traces"], 20, lm.tokenizer, val_fraction=0.25, seed=1)
    assert (len(train), len(val)) == (15, 5)
    for e in train + val:
        trace = next(t for t in data["traces"] if t["id"] == e.trace_id)
        assert e.context == base_prompt(trace["question"]) + " "
        assert e.target == trace["completion"].split("\n</think>")[0]
        assert e.thinking_prefix == trace["prompt"]


# ------------------------------------------------------------------------------------------- hook, gradient


def test_hook_changes_exactly_the_intended_positions_and_layer(lm, examples):
    sets, _ = examples
    exs = [sets[0].train[0], sets[1].train[1]]
    batch = st.collate(exs, lm.tokenizer.pad_token_id)
    assert (batch.steer_mask.sum(1) == torch.tensor([e.t_end - e.t_start for e in exs])).all()
    vec = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0)) * 3
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    first = batch.steer_mask.float().argmax(1)  # first steered position per row
    real = batch.attention_mask.bool()
    for layer in range(lm.n_layers):
        clean = capture_resid_post(lm.model, layer, **kw)
        with add_to_resid_post(lm.model, STEER_LAYER, positions_delta(vec, batch.steer_mask)):
            steered = capture_resid_post(lm.model, layer, **kw)
        diff = steered - clean
        if layer < STEER_LAYER:
            assert torch.equal(steered, clean)
        elif layer == STEER_LAYER:
            expected = batch.steer_mask[..., None].float() * vec
            torch.testing.assert_close(diff, expected, atol=1e-5, rtol=0)
        else:
            for r in range(len(exs)):
                assert torch.equal(steered[r, : first[r]], clean[r, : first[r]])  # earlier positions untouched
                moved = diff[r, first[r]:][real[r, first[r]:]].norm(dim=-1)
                assert (moved > 1e-3).all()  # every later real position is affected


@pytest.mark.parametrize("objective", ["ce", "kl"])
def test_gradient_matches_finite_difference(stories_path, examples, objective):
    lm64 = load_model(str(stories_path), dtype="float32", device="cpu")
    lm64.model.to(torch.float64)
    sets, _ = examples
    exs = [sets[0].train[0], sets[0].train[1], sets[1].val[0]]
    gen = torch.Generator().manual_seed(1)
    v0 = torch.randn(lm64.d_model, generator=gen, dtype=torch.float64)
    v = v0.clone().requires_grad_(True)

    def loss(x):
        return st.batch_loss(lm64, x, exs, STEER_LAYER, objective=objective, thinking=lm64)

    loss(v).backward()
    grad = v.grad.clone()
    assert grad.norm() > 1e-4
    # Llama's RMSNorm computes in float32 even in a float64 model, so the loss carries ~1e-7 relative noise:
    # eps = 1e-3 balances that noise (~1e-4 / eps) against the O(eps^2) truncation error; measured |error| < 5e-5.
    eps = 1e-3
    with torch.no_grad():
        for _ in range(3):
            u = torch.randn(lm64.d_model, generator=gen, dtype=torch.float64)
            fd = (loss(v0 + eps * u) - loss(v0 - eps * u)) / (2 * eps)
            assert abs(float(fd) - float(grad @ u)) <= 3e-4 * max(1.0, abs(float(fd)))
        for i in (0, 17):
            e = torch.zeros_like(v0)
            e[i] = 1
            fd = (loss(v0 + eps * e) - loss(v0 - eps * e)) / (2 * eps)
            assert abs(float(fd) - float(grad[i])) <= 3e-4 * max(1.0, abs(float(fd)))


def test_kl_objective_is_the_kl_to_the_thinking_model(lm, examples):
    """Where the two tokenisations agree, the KL loss is KL(thinking || steered base) computed by hand."""
    sets, _ = examples
    ex = next(e for e in sets[1].train if not e.context.endswith("answer: "))
    tok = lm.tokenizer
    t_ids = tok(ex.thinking_prefix + ex.target, add_special_tokens=False)["input_ids"]
    n = ex.t_end - ex.t_start
    assert t_ids[-n:] == ex.input_ids[ex.t_start: ex.t_end]  # the targets align token by token
    vec = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mask = torch.zeros(1, len(ex.input_ids), dtype=torch.bool)
        mask[0, ex.t_start - 1: ex.t_end - 1] = True
        with add_to_resid_post(lm.model, STEER_LAYER, positions_delta(vec, mask)):
            b_logp = lm.model(torch.tensor([ex.input_ids])).logits[0, ex.t_start - 1: ex.t_end - 1].log_softmax(-1)
        t_logp = lm.model(torch.tensor([t_ids])).logits[0, -n - 1: -1].log_softmax(-1)
        expected = (t_logp.exp() * (t_logp - b_logp)).sum(-1).mean()
        got = st.batch_loss(lm, vec, [ex], STEER_LAYER, objective="kl", thinking=lm, reduce=False)
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-4)
    assert float(got[0]) > 0


def test_kl_objective_needs_one_tokenizer(lm):
    from sae_reasoning.organism.tokenizer import build_tokenizer

    other = LoadedModel(lm.model, build_tokenizer(), "organism-tokenizer", lm.n_layers, lm.d_model)
    with pytest.raises(UserError, match="share a tokenizer"):
        st.check_same_tokenizer(lm, other)
    st.check_same_tokenizer(lm, lm)


# ------------------------------------------------------------------------------------------- training, generation


def test_training_lowers_validation_loss(lm, examples):
    sets, _ = examples
    ex = sets[0]
    logged = []
    tv = st.train_vector(lm, ex.train, ex.val, STEER_LAYER, st.TrainSettings(max_epochs=8, batch_size=8),
                         progress=False, log=logged.append)
    assert tv.val_loss_before == pytest.approx(float(st.split_loss(lm, None, ex.val, STEER_LAYER)))
    assert tv.val_loss_after < tv.val_loss_before - 0.3, (tv.val_loss_before, tv.val_loss_after)
    assert tv.train_loss_after < tv.train_loss_before
    assert [r["epoch"] for r in logged] == list(range(1, tv.epochs + 1)) and tv.best_epoch >= 1
    assert tv.val_loss_after == pytest.approx(min(r["val_loss"] for r in logged))
    # the best vector really has that validation loss, and max_norm is enforced
    assert float(st.split_loss(lm, tv.vector, ex.val, STEER_LAYER)) == pytest.approx(tv.val_loss_after, rel=1e-5)
    capped = st.train_vector(lm, ex.train, ex.val, STEER_LAYER,
                             st.TrainSettings(max_epochs=2, batch_size=8, lr=0.2, max_norm=0.5), progress=False)
    assert float(capped.vector.norm()) <= 0.5 + 1e-5


def test_length_buckets_and_length_ordered_losses(lm, examples):
    """Training batches: every example once per epoch, seeded, less padding than plain shuffled batches; the
    length-ordered evaluation gives each example its own loss (batch of one) in the caller's order."""
    sets, _ = examples
    ex = sets[1].train + sets[0].train  # two groups of different lengths
    lengths = [len(e.input_ids) for e in ex]

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    batches = st.bucketed_batches(ex, 4, torch.Generator().manual_seed(0), window=3)
    assert sorted(i for b in batches for i in b) == list(range(len(ex)))
    assert all(len(b) <= 4 for b in batches) and len(batches) == -(-len(ex) // 4)
    assert batches == st.bucketed_batches(ex, 4, torch.Generator().manual_seed(0), window=3)
    perm = torch.randperm(len(ex), generator=torch.Generator().manual_seed(0)).tolist()
    assert padded(batches) < padded([perm[i: i + 4] for i in range(0, len(ex), 4)])
    losses = st.example_losses(lm, None, ex, STEER_LAYER, batch_size=5)
    one_by_one = torch.cat([st.example_losses(lm, None, [e], STEER_LAYER, batch_size=1) for e in ex])
    assert torch.allclose(losses, one_by_one, atol=1e-5)


def test_generation_applies_the_vector_as_in_training(lm, examples):
    """Cached, left-padded generation with the vector at the current last position == the training forward."""
    sets, _ = examples
    exs = sets[0].val[:4]
    vec = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(3)) * 4
    ctxs = [e.context_ids for e in exs]
    assert len({len(c) for c in ctxs}) > 1  # rows of different lengths: left padding is exercised
    sents, gens = st.generate_sentences(lm, ctxs, vec.expand(len(exs), -1), STEER_LAYER, max_new_tokens=20,
                                        return_ids=True)
    plain = st.generate_sentences(lm, ctxs, None, STEER_LAYER, max_new_tokens=20)
    assert sents != plain
    for ctx, g in zip(ctxs, gens):
        assert g
        full = st.Example("x", None, "", "", "", "", list(ctx) + g, len(ctx), len(ctx) + len(g))
        logits = st.steered_logits(lm, vec, st.collate([full], lm.tokenizer.pad_token_id), STEER_LAYER)
        assert logits.argmax(-1).tolist() == g
    for s in sents:  # one sentence each
        assert s and len(st.split_sentences(s, min_words=1)) == 1


# ------------------------------------------------------------------------------------------- end to end, files


def test_train_steering_end_to_end_with_hit_rates(lm, data, tmp_path):
    sae = probe_sae(data["acts"], data["assign"])
    assert (sae.behavior(data["acts"]) == data["assign"]).float().mean() == 1.0  # the probe separates the groups

    class Recorder(Tracker):
        def __init__(self):
            super().__init__(None)
            self.logs, self.tables, self.summaries = [], [], []

        def log(self, metrics, step=None):
            self.logs.append(metrics)

        def table(self, key, columns, rows):
            self.tables.append((key, list(columns), [list(r) for r in rows]))

        def summary(self, values):
            self.summaries.append(values)

    cfg = type("Cfg", (), dict(n_examples=24, val_fraction=0.25, lr=0.05, max_epochs=20, patience=5, batch_size=8,
                               max_norm=None, objective="ce"))()
    rec = Recorder()
    t = time.time()
    meta = st.train_steering(lm, data["traces"], data["index"], data["acts"], sae, layer=STEER_LAYER,
                             out_dir=tmp_path / "vec", model_id="stories260K", cfg=cfg, titles={0: "zebra", 1: "story"},
                             thinking=lm, sae_layer=SAE_LAYER, tracker=rec, progress=False, max_new_tokens=24,
                             n_hit_examples=16)
    print(f"train_steering: {time.time() - t:.1f}s")
    assert set(meta["vectors"]) == {"latent_0", "latent_1", "bias"}
    for key, r in meta["vectors"].items():
        assert r["val_loss_after"] < r["val_loss_before"], key
        print(key, {k: r[k] for k in ("norm", "val_loss_before", "val_loss_after")}, r.get("hit_rates", {}))
    hits = meta["vectors"]["latent_0"]["hit_rates"]
    assert hits["n"] == 16 and set(hits) >= {"steered", "unsteered", "random", "classified", "samples"}
    # measured on this setup (6 val + 10 other held-out contexts): steered 0.94-1.0 ("Zebra was very happy."),
    # unsteered 0.0, random vector of the same norm 0.17-0.25
    assert hits["steered"] > hits["unsteered"] and hits["steered"] > hits["random"]
    loaded = st.load_vectors(tmp_path / "vec", model_id="stories260K", layer=STEER_LAYER, d_model=lm.d_model)
    assert set(loaded.vectors) == {0, 1} and loaded.bias is not None and loaded.titles == {0: "zebra", 1: "story"}
    # W&B: loss curves for every vector and one hit-rate table
    assert any("steer/latent_0/val_loss" in m for m in rec.logs) and any("steer/bias/train_loss" in m for m in rec.logs)
    (key, cols, rows), = rec.tables
    assert key == "steer/hit_rates" and cols == st.HIT_TABLE_COLUMNS and len(rows) == 3


def test_save_load_round_trip_and_mismatches(tmp_path):
    d = 64
    gen = torch.Generator().manual_seed(0)
    vecs = {"latent_3": torch.randn(d, generator=gen) * 20, "latent_0": torch.randn(d, generator=gen),
            "bias": torch.randn(d, generator=gen)}
    meta = {"model_id": "org/base", "layer": 5, "d_model": d,
            "vectors": {"latent_3": {"title": "verification", "n_train": 10, "n_val": 3, "hit_rates": {"steered": 0.5}},
                        "latent_0": {"title": "planning"}, "bias": {"title": "bias"}}}
    st.save_vectors(tmp_path, vecs, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors.json", "vectors.safetensors"]
    j = json.loads((tmp_path / "vectors.json").read_text())
    assert j["hook_name"] == "blocks.5.hook_resid_post" and j["vectors"]["latent_3"]["norm"] == pytest.approx(
        float(vecs["latent_3"].norm()))
    sv = st.load_vectors(tmp_path, model_id="org/base", layer=5, d_model=d)
    assert list(sv.vectors) == [0, 3] and sv.layer == 5 and sv.titles == {0: "planning", 3: "verification"}
    assert torch.equal(sv.vectors[3], vecs["latent_3"]) and torch.equal(sv.bias, vecs["bias"])
    st.load_vectors(tmp_path)  # no checks requested

    def one_line_error(match, **kw):
        with pytest.raises(UserError, match=match) as info:
            st.load_vectors(tmp_path, **kw)
        assert "\n" not in str(info.value)

    one_line_error("trained on 'org/base', not 'org/other'", model_id="org/other")
    one_line_error("trained at layer 5 .*not layer 4: set steering.layer=5", layer=4)
    one_line_error("d_model=64 but the model has d_model=128", d_model=128)
    # corrupt tensor file: checksum differs / unreadable
    blob = (tmp_path / "vectors.safetensors").read_bytes()
    (tmp_path / "vectors.safetensors").write_bytes(blob[: len(blob) // 2])
    one_line_error("does not match")
    j.pop("tensor_sha256")
    (tmp_path / "vectors.json").write_text(json.dumps(j))
    one_line_error("unreadable")
    (tmp_path / "vectors.json").write_text("{not json")
    one_line_error("vectors.json is unreadable")
    (tmp_path / "vectors.json").unlink()
    one_line_error("vectors.json is missing")
    with pytest.raises(ValueError, match="shape"):
        st.save_vectors(tmp_path, {"latent_1": torch.zeros(3)}, meta)


# ------------------------------------------------------------------------------------------- organism

# the committed organism; SAE_REASONING_ORGANISM_WEIGHTS points the test at another trained pair (thinking/, base/)
ORGANISM = Path(os.environ.get("SAE_REASONING_ORGANISM_WEIGHTS",
                               Path(__file__).resolve().parent.parent / "sae_reasoning" / "organism" / "weights"))


def organism_steering(weights: Path, work: Path, *, n_questions: int = 400, n_examples: int = 128,
                      sae_layer: int = 1, steer_layer: int = 1, n_latents: int = 5, k: int = 1,
                      n_hit: int = 16) -> dict:
    """The whole steering stage on the organism: thinking traces -> sentence activations -> SAE -> vectors for
    its latents on the base model, with hit rates (and ground-truth labels of the generated sentences).
    Returns vectors.json; each title names the latent's majority ground-truth behavior."""
    from sae_reasoning.organism import label_sentence
    from sae_reasoning.organism.corpus import chat_prompt, thinking_response
    from sae_reasoning.organism.task import make_splits
    from sae_reasoning.sae import GridConfig, train_grid

    thinking = load_model(str(weights / "thinking"), dtype="float32", device="cpu")
    base = load_model(str(weights / "base"), dtype="float32", device="cpu")
    # the traces the thinking model was trained to write (its greedy traces equal them on ~89% of problems; no
    # generation needed): prompt = its chat prompt, completion = its response
    problems = make_splits(seed=0, n_train=n_questions, n_val=0, n_test=0)["train"]
    traces = [{"id": p.id, "question": p.question, "prompt": chat_prompt(p.question),
               "completion": thinking_response(p)} for p in problems]
    store = ActivationStore(extract_activations(thinking, traces, [sae_layer], work / "acts", batch_size=64,
                                                label_fn=label_sentence, progress=False))
    index, acts = store.index(), store.load(sae_layer)
    # layer 1, k 1, the lowest validation FVU of three seeds: chosen without labels, the SAE whose latents are the
    # planted behaviors (tests/test_organism_sae.py)
    grid = train_grid({sae_layer: acts}, GridConfig(n_latents=(n_latents,), ks=(k,), seeds=(0, 1, 2), progress=False))
    sae = min(grid, key=lambda r: r.metrics["val_fvu"]).sae
    assign = sae.behavior(acts).tolist()
    titles = {}
    for latent in sorted(set(assign)):
        truth = [r["label"] for r, a in zip(index, assign) if a == latent]
        major = max(sorted(set(truth), key=str), key=truth.count)
        titles[latent] = f"{major} ({truth.count(major) / len(truth):.0%} of {len(truth)})"
    # lr 0.05 / batch 8: the organism's sets are small; with lr 1e-2 and 48 training examples the plan vector stayed
    # at norm ~4 and did not flip the base into step mode, at lr 0.05 it reaches ~20 and does. 128 examples (as in
    # `make demo`): with 64, session 7's base got a conclude vector that hit only 9 of 16 contexts
    cfg = type("Cfg", (), dict(n_examples=n_examples, val_fraction=0.25, lr=0.05, max_epochs=20, patience=5,
                               batch_size=8, max_norm=None, objective="ce"))()
    return st.train_steering(base, traces, index, acts, sae, layer=steer_layer, out_dir=work / "vectors",
                             model_id=str(weights / "base"), cfg=cfg, titles=titles, thinking=thinking,
                             sae_layer=sae_layer, progress=False, max_new_tokens=32, n_hit_examples=n_hit,
                             label_fn=label_sentence)


@pytest.mark.skipif(not (ORGANISM / "base" / "config.json").exists(), reason="organism weights not trained yet")
def test_organism_vectors_lower_val_loss_and_hit_rates(tmp_path):
    t = time.time()
    meta = organism_steering(ORGANISM, tmp_path)
    print(f"organism steering: {time.time() - t:.1f}s")
    for key, r in meta["vectors"].items():
        h = r.get("hit_rates", {})
        print(key, r["title"], f"norm={r['norm']:.1f} val {r['val_loss_before']:.4f}->{r['val_loss_after']:.4f}",
              {c: h.get(c) for c in ("n", "steered", "unsteered", "random")}, h.get("true_rates"))
    behaviors = {k: r for k, r in meta["vectors"].items() if k != "bias"}
    assert len(behaviors) == 5
    assert all(r["val_loss_after"] < r["val_loss_before"] for r in behaviors.values())  # every behavior learns
    for r in meta["vectors"].values():  # the best vector is kept: never worse than no vector
        assert r["val_loss_after"] <= r["val_loss_before"]
    # The organism's base knows every behavior but not when (corpus.BASE_WHEN): from the first-sentence contexts it
    # answers directly, before a later step it re-states its plan, after a borrow it does not check, after a slip it
    # does not correct, at the end it writes "The answer is N." rather than concluding. Each vector makes it do so
    # at the held-out contexts where the thinking model did.
    planted = {r["hit_rates"].get("target_label"): r for r in behaviors.values()}
    assert set(planted) == {"plan", "compute", "verify", "correct", "conclude"}, planted.keys()
    for behavior, r in planted.items():
        h = r["hit_rates"]
        for t in (h["true_rates"], h):  # by the ground truth, and the paper's way: by the thinking model + SAE
            assert t["steered"] >= 0.75 and t["steered"] >= t["unsteered"] + 0.5 and \
                t["steered"] >= t["random"] + 0.5, (behavior, t)
    # without the SAE's "outside" test the direct answers at the first position would all count as plan
    assert planted["plan"]["hit_rates"]["classified"]["unsteered"].get("outside", 0) >= 12
