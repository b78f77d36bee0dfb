"""Tests of the top-k SAE, its grid trainer and its sae-lens checkpoints (sae_reasoning/sae.py)."""

import json
import math
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from sae_reasoning.cluster_metrics import planted_vectors
from sae_reasoning.sae import (
    GridConfig,
    SAESpec,
    TopKSAE,
    _Adam,
    _kmeanspp_batch,
    _lloyd_batch,
    _nearest,
    _padding_groups,
    _Stack,
    _topk_indices,
    euclidean_kmeans_centres,
    euclidean_kmeans_centres_many,
    init_params,
    init_params_many,
    load_sae,
    load_sae_lens,
    lr_for,
    norm_mean_of,
    normalise,
    read_metadata,
    save_sae,
    train_grid,
    train_sae,
)

torch.set_num_threads(1)
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


@pytest.fixture(scope="module")
def planted():
    x, y = planted_vectors(n=3000, d=64, n_behaviors=5, seed=0)
    return torch.from_numpy(x), y


@pytest.fixture(scope="module")
def recovery_grid(planted):
    """The paper's setting on planted data: k = 3, five seeds of n_latents = 5 (one stack), plus n_latents = 8."""
    x, y = planted
    cfg = GridConfig(n_latents=(5, 8), ks=(3,), seeds=(0, 1, 2, 3, 4), max_epochs=300, patience=10, progress=False)
    return cfg, train_grid({3: x}, cfg, labels=y)


def _random_sae(d_in, n, k, seed, norm_mean):
    sae = TopKSAE.from_init(d_in, n, k, seed, norm_mean)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():  # non-zero biases so that every term of the formula is exercised
        sae.b_enc.copy_(0.1 * torch.randn(n, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen))
    return sae


# ---------------------------------------------------------------------------------------------------------------
# The model


def test_reference_semantics(planted):
    x, _ = planted
    sae = _random_sae(64, 8, 3, 0, x.mean(0))
    with torch.no_grad():
        sae.b_enc -= 1.0  # push codes negative: no ReLU means they must survive
        z = sae.encode(x)
        x_n = normalise(x, x.mean(0))
        pre = sae.pre_acts(x_n)
    assert ((z != 0).sum(-1) == 3).all()  # exactly k, negative values included
    assert (z < 0).any()
    torch.testing.assert_close(z, sae.encode_normalised(x_n), rtol=0, atol=0)
    assert torch.equal(sae.behavior(x), pre.argmax(-1))  # argmax over pre == over the kept values
    kept_max = torch.where(z != 0, z, -math.inf).max(-1)
    assert torch.equal(kept_max.indices, sae.behavior(x))
    # normalisation is owned by the SAE: a shifted / rescaled copy of the data around the mean encodes the same
    x2 = x.mean(0) + 3.7 * (x - x.mean(0))
    torch.testing.assert_close(sae.encode(x2), z, rtol=1e-5, atol=1e-5)
    # decode gives the reconstruction of the normalised vector
    torch.testing.assert_close(sae(x), z @ sae.W_dec + sae.b_dec)
    assert torch.allclose(normalise(x, x.mean(0)).norm(dim=-1), torch.ones(len(x)))


def test_init_decoder_from_encoder():
    p = init_params(16, 6, seed=3)
    torch.testing.assert_close(p["W_dec"].norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(p["W_dec"], (p["W_enc"] / p["W_enc"].norm(dim=0)).T)
    assert torch.equal(init_params(16, 6, seed=3)["W_enc"], p["W_enc"])
    assert not torch.equal(init_params(16, 6, seed=4)["W_enc"], p["W_enc"])


def test_stack_equals_reference(planted):
    """Padded, mixed-(n_latents, k) stack == each SAE's plain reference encode / decode / behavior."""
    x, _ = planted
    saes = [_random_sae(64, n, k, s, x.mean(0)) for s, (n, k) in enumerate([(5, 3), (8, 1), (3, 3), (8, 2)])]
    params = [{p: getattr(s, p).detach() for p in PARAMS} for s in saes]
    stack = _Stack.build(params, [s.k for s in saes], [0.0] * len(saes), "cpu")
    x_n = normalise(x, x.mean(0))
    with torch.no_grad():
        x_hat, pre = stack.forward(x_n)
        for i, sae in enumerate(saes):
            n = sae.n_latents
            assert torch.isinf(pre[i, :, n:]).all()  # padding is never selectable
            torch.testing.assert_close(pre[i, :, :n], sae.pre_acts(x_n), rtol=0, atol=1e-6)
            torch.testing.assert_close(x_hat[i], sae(x), rtol=0, atol=1e-6)
            assert torch.equal(pre[i].argmax(-1), sae.behavior(x))


def _mixed_stack(x):
    """Four SAEs of mixed (n_latents, k) with non-zero biases, as a stack whose parameters require grad."""
    saes = [_random_sae(64, n, k, s, x.mean(0)) for s, (n, k) in enumerate([(5, 3), (8, 1), (3, 3), (8, 2)])]
    stack = _Stack.build([{p: getattr(s, p).detach() for p in PARAMS} for s in saes], [s.k for s in saes],
                         [0.0] * len(saes), "cpu")
    for p in stack.params():
        p.requires_grad_(True)
    return stack


def test_gram_errors_equal_dense_forward(planted):
    """`sq_errors` (the training loss without [S, B, d] tensors) == ||x_n - forward(x_n)||^2, values and gradients,
    on a mixed-(n_latents, k) stack with non-zero biases."""
    x, _ = planted
    stack = _mixed_stack(x)
    x_n = normalise(x[:700], x.mean(0))
    x_hat, _ = stack.forward(x_n)
    dense = (x_hat - x_n).pow(2).sum(-1)  # [S, B]
    gram = stack.sq_errors(x_n)
    assert gram.shape == dense.shape == (4, 700)
    torch.testing.assert_close(gram, dense, rtol=1e-5, atol=2e-6)
    weights = torch.rand(700, generator=torch.Generator().manual_seed(0))  # a non-uniform loss over rows
    g_dense = torch.autograd.grad((dense * weights).sum(), stack.params())
    g_gram = torch.autograd.grad((gram * weights).sum(), stack.params())
    for name, a, b in zip(_Stack.PARAMS, g_dense, g_gram):
        assert a.abs().max() > 0, name
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()), msg=name)


def test_written_out_gradients_equal_autograd(planted):
    """`loss_and_grads` (the training step's gradients, by hand) == autograd through `sq_errors`, with mixed k
    (k_s < k_max: the (k_s+1)-th latent must get no gradient) and non-zero biases."""
    x, _ = planted
    stack = _mixed_stack(x)
    x_n = normalise(x[:512], x.mean(0))
    want = torch.autograd.grad((stack.sq_errors(x_n) * 0.37).sum(), stack.params())
    err, got = stack.loss_and_grads(x_n, 0.37)
    torch.testing.assert_close(err, stack.sq_errors(x_n).detach())
    for name, a, b in zip(_Stack.PARAMS, want, got):
        assert a.abs().max() > 0, name
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()), msg=name)


def test_topk_indices_match_topk_and_argmax_ties():
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(3, 20, 257, generator=gen)
    pre[1, 15:] = -math.inf  # padding
    want = pre.topk(4, dim=1).indices
    assert torch.equal(_topk_indices(pre.clone(), 4), want)  # it overwrites its input
    tied = torch.zeros(2, 6, 5)
    tied[:, [1, 3, 4]] = 1.0  # three-way tie at the top: lowest index first, as argmax
    got = _topk_indices(tied.clone(), 3)
    assert torch.equal(got[:, 0], tied.argmax(1)) and (got == torch.tensor([1, 3, 4]).view(1, 3, 1)).all()


def test_kmeanspp_batch_draws_by_inverse_cdf(planted):
    """Each run of the batched k-means++ seeding makes the D^2 draws that an independent float64 numpy
    computation makes from the same uniforms, and a run does not depend on the others in its batch."""
    x = planted[0][:500].float()
    u = torch.rand(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    idx = _kmeanspp_batch(x, x.T.contiguous(), x.pow(2).sum(1), u)
    xd = x.double().numpy()
    for r in range(4):
        chosen = [min(int(u[r, 0] * len(xd)), len(xd) - 1)]
        d2 = ((xd - xd[chosen[0]]) ** 2).sum(1)
        for j in range(1, 6):
            cdf = np.cumsum(d2)
            chosen.append(int(np.searchsorted(cdf, u[r, j].item() * cdf[-1], side="right")))
            d2 = np.minimum(d2, ((xd - xd[chosen[-1]]) ** 2).sum(1))
        assert idx[r].tolist() == chosen
        assert torch.equal(_kmeanspp_batch(x, x.T.contiguous(), x.pow(2).sum(1), u[r:r + 1])[0], idx[r])
    assert all(len(set(row)) == 6 for row in idx.tolist())  # an already chosen row has probability 0


def test_lloyd_batch_equals_runs_alone(planted):
    """Lloyd rounds of R runs in lockstep (converged runs leaving the batch) give each run exactly its own result,
    also when the runs need different numbers of rounds or run out of them."""
    x = planted[0].float()
    x_t, sq = x.T.contiguous(), x.pow(2).sum(1)
    u = torch.rand(5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    start = x[_kmeanspp_batch(x, x_t, sq, u)]
    for iters in (2, 50):
        c, inertia = _lloyd_batch(x, x_t, sq, start.clone(), iters)
        for r in range(5):
            c1, i1 = _lloyd_batch(x, x_t, sq, start[r:r + 1].clone(), iters)
            assert torch.equal(c[r], c1[0]) and torch.equal(inertia[r], i1[0])
            assign = torch.cdist(x.double(), c[r].double()).argmin(1)  # inertia = the sum over nearest centres
            assert inertia[r].item() == pytest.approx(float((x.double() - c[r].double()[assign]).pow(2).sum()),
                                                      rel=1e-3)  # float32 distances
        if iters == 50:  # every centre is the mean of its points (up to the few points that flip at near-ties
            for r in range(5):  # from round to round; a wrong sum or offset would be off by the clusters' spread)
                assign = (c[r].pow(2).sum(1) - 2 * x @ c[r].T).argmin(1)  # the assignment rule of the rounds
                for j in assign.unique():
                    assert torch.allclose(c[r, j], x[assign == j].mean(0), atol=1e-2)


def test_nearest_in_blocks_equals_whole_argmin(monkeypatch):
    """On a CPU `_nearest` scores the points block by block (cache-sized); with many blocks, a last partial block
    and exact ties it returns the whole product's argmin, the lowest centre index among ties."""
    import sae_reasoning.sae as sae_mod

    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (1000, 8), generator=gen).float()  # small integers: exact ties between centres
    c = torch.stack([x[torch.randperm(1000, generator=gen)[:7]] for _ in range(3)])  # [3 runs, 7 centres, 8]
    c[:, 5] = c[:, 2]  # a duplicated centre: every point of centre 2 ties with 5 and must get 2
    d2 = torch.cdist(x.double(), c.double()).pow(2)  # [3, 1000, 7], float64, independent of the blocks
    want = torch.stack([torch.tensor([row.tolist().index(min(row.tolist())) for row in dr]) for dr in d2.round()])
    x_t, sq = x.T.contiguous(), x.pow(2).sum(1)
    whole = _nearest(x_t, sq, c)
    monkeypatch.setattr(sae_mod, "_NEAREST_BLOCK_ELEMENTS", 3 * 7 * 300)  # blocks of 300 points: 4, the last 100
    blocks = _nearest(x_t, sq, c)
    assert torch.equal(whole, want) and torch.equal(blocks, want)
    assert (want == 2).any() and not (want == 5).any()


def test_kmeans_centres_as_good_as_sklearn(planted):
    """The data init's k-means (10 restarts, best inertia) is as good as scikit-learn's KMeans on the same data."""
    from sklearn.cluster import KMeans

    x = planted[0].float()
    for n in (5, 8):  # (with more latents than planted behaviors, scikit-learn's greedy k-means++ seeding can win
        ours = euclidean_kmeans_centres(x, n, seed=0)  # by about 1%: a seeding variant not used here)
        ref = KMeans(n, n_init=10, random_state=0).fit(x.double().numpy())
        inertia = float(torch.cdist(x.double(), ours.double()).pow(2).min(1).values.sum())
        assert inertia <= ref.inertia_ * 1.01
        assert torch.equal(ours, euclidean_kmeans_centres(x, n, seed=0))  # seeded


def test_kmeans_of_several_sizes_in_one_batch_equal_each_alone(planted):
    """`euclidean_kmeans_centres_many` (what a GPU grid runs: every restart of every SAE of a layer in one batch,
    smaller runs padded with centres that never get a point) gives each (n_latents, seed) exactly the centres it
    gets alone, sizes and seeds mixed, duplicates included; `init_params_many` equals `init_params` per key (on a CPU
    it runs them one at a time)."""
    x = planted[0].float()
    keys = [(8, 0), (3, 0), (5, 1), (8, 2), (3, 0)]
    many = euclidean_kmeans_centres_many(x, keys)
    assert [tuple(c.shape) for c in many] == [(n, x.shape[1]) for n, _ in keys]
    for (n, seed), c in zip(keys, many):
        assert torch.equal(c, euclidean_kmeans_centres(x, n, seed))
    assert not torch.equal(many[0], many[3])  # another seed, other centres
    # off the CPU the keys go in groups that pad to at most 1.5x the centres they would compute alone
    paper = [(n, 0) for n in range(5, 55, 5)]
    assert len(_padding_groups(paper)) == 2  # (rather than 10 batches of one SAE)
    groups = _padding_groups(paper + [(5, 1)])
    assert sorted(k for g in groups for k in g) == sorted(paper + [(5, 1)])
    assert all(len(g) * max(n for n, _ in g) <= 1.5 * sum(n for n, _ in g) for g in groups)
    params = init_params_many(x.shape[1], keys, x, "data", "cpu")
    assert list(params) == list(dict.fromkeys(keys))
    for (n, seed), p in params.items():
        assert all(torch.equal(p[k], v) for k, v in init_params(x.shape[1], n, seed, x, "data", "cpu").items())


def test_vectorised_adam_equals_torch_adam(planted):
    """Per-SAE learning rates, exactly torch.optim.Adam's arithmetic, one optimiser per SAE."""
    x, _ = planted
    specs = [(5, 3, 0), (8, 2, 1)]
    refs = [TopKSAE.from_init(64, n, k, s, x.mean(0)) for n, k, s in specs]
    opts = [torch.optim.Adam(r.parameters(), lr=lr_for(r.n_latents)) for r in refs]
    inits = [init_params(64, n, s) for n, _, s in specs]
    stack = _Stack.build(inits, [k for _, k, _ in specs], [lr_for(n) for n, _, _ in specs], "cpu")
    for p in stack.params():
        p.requires_grad_(True)
    adam = _Adam(stack.params())
    for step in range(5):
        batch = x[step * 512 : (step + 1) * 512]
        x_n = normalise(batch, x.mean(0))
        x_hat, _ = stack.forward(x_n)
        fvu = (x_hat - x_n).pow(2).sum((1, 2)) / (x_n - x_n.mean(0)).pow(2).sum()
        adam.step(stack.params(), torch.autograd.grad(fvu.sum(), stack.params()), stack.lrs())
        for ref, opt in zip(refs, opts):
            opt.zero_grad()
            (((ref(batch) - x_n).pow(2).sum()) / (x_n - x_n.mean(0)).pow(2).sum()).backward()
            opt.step()
    for i, ref in enumerate(refs):
        got = stack.unstack(i)
        for p in PARAMS:
            torch.testing.assert_close(got[p], getattr(ref, p).detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Training


def test_recovers_planted_behaviors(recovery_grid):
    """Chosen without labels (lowest validation FVU), the SAE's argmax latents are the planted behaviors."""
    cfg, results = recovery_grid
    best = min(results, key=lambda r: r.metrics["val_fvu"])
    val = best.metrics["val"]
    print(f"best {best.spec.name}: val_fvu={best.metrics['val_fvu']:.4f} nmi={val['nmi']:.3f} f1={val['best_f1']}")
    assert val["nmi"] >= 0.9
    assert val["min_f1"] >= 0.9
    assert len(set(val["best_cluster"].values())) == 5  # five different latents, no merges


def test_training_invariants(recovery_grid):
    cfg, results = recovery_grid
    for r in results:
        m = r.metrics
        # early stopping stops, and keeps the best epoch's parameters
        assert m["stopped_early"] and m["epochs"] < cfg.max_epochs
        assert m["epochs"] == m["best_epoch"] + cfg.patience
        assert m["val_fvu"] == pytest.approx(min(r.history["val_fvu"]), abs=1e-6)
        assert len(r.history["train_fvu"]) == m["epochs"]
        torch.testing.assert_close(r.sae.W_dec.norm(dim=-1), torch.ones(r.spec.n_latents))
        assert m["val"]["l0"] == pytest.approx(r.spec.k)
        assert m["val"]["fvu"] == pytest.approx(m["val_fvu"], abs=1e-4)
        assert 0 < m["train_fvu"] < 0.5 and sum(m["val"]["cluster_sizes"]) == 300
        assert m["lr"] == pytest.approx(2e-4 / math.sqrt(r.spec.n_latents / 2**14))
        assert r.history["val_fvu"][-1] >= m["val_fvu"]


def test_grid_equals_one_at_a_time(planted):
    """One stacked job == each SAE trained alone with the same seed (same init, same batches)."""
    x, y = planted
    cfg = GridConfig(n_latents=(4, 7), ks=(1, 3), seeds=(0, 1), max_epochs=25, patience=4, progress=False)
    grid = train_grid({2: x}, cfg)
    assert [r.spec for r in grid] == cfg.specs([2])
    for r in grid:
        alone = train_sae(x, r.spec.n_latents, r.spec.k, r.spec.seed, cfg, layer=2)
        assert abs(alone.metrics["val_fvu"] - r.metrics["val_fvu"]) <= 0.01
        assert abs(alone.metrics["val_fvu"] - r.metrics["val_fvu"]) <= 1e-3  # in practice ~1e-7 or bit-identical


def test_saes_differing_in_k_alone_share_one_init(planted, monkeypatch):
    """The (data) init depends on (n_latents, seed) only: a grid over k runs k-means once per (n_latents, seed), and
    each SAE still starts where it would alone (test_grid_equals_one_at_a_time checks the trained results)."""
    import sae_reasoning.sae as sae_mod

    x, _ = planted
    calls = []
    real = sae_mod.init_params
    monkeypatch.setattr(sae_mod, "init_params", lambda *a, **kw: calls.append(a[1:3]) or real(*a, **kw))
    cfg = GridConfig(n_latents=(4, 6), ks=(1, 2, 3), seeds=(0, 1), max_epochs=1, progress=False)
    train_grid({0: x}, cfg)
    assert sorted(calls) == [(4, 0), (4, 1), (6, 0), (6, 1)]


def test_deterministic_and_dtypes(planted):
    """Same seeds -> identical parameters; float16 / bfloat16 / numpy inputs are cast to float32 per batch."""
    x, _ = planted
    cfg = GridConfig(n_latents=(5,), ks=(2,), seeds=(0,), max_epochs=6, patience=3, progress=False)
    x16 = x.to(torch.float16)
    a = train_grid({0: x16, 1: x16.float()}, cfg)
    b = train_grid({0: x16.float().numpy(), 1: x16}, cfg)
    for r in [*a, *b]:
        for p in PARAMS:
            assert torch.equal(getattr(r.sae, p), getattr(a[0].sae, p))
    bf = train_grid({0: x.to(torch.bfloat16)}, cfg)[0]
    assert np.isfinite(bf.metrics["val_fvu"])


def test_last_batch_of_one(planted):
    x, _ = planted
    cfg = GridConfig(n_latents=(5,), seeds=(0,), max_epochs=3, progress=False)
    r = train_grid({0: x[:570]}, cfg)[0]  # 513 train vectors: batches of 512 and 1
    assert all(np.isfinite(r.history["train_fvu"])) and np.isfinite(r.metrics["val_fvu"])


def test_bad_inputs(planted):
    x, _ = planted
    with pytest.raises(ValueError, match="same rows"):
        train_grid({0: x, 1: x[:10]}, GridConfig(progress=False))
    with pytest.raises(ValueError, match="k <= n_latents"):
        train_grid({0: x}, GridConfig(progress=False), [SAESpec(0, 2, 3)])
    with pytest.raises(ValueError, match="k <= n_latents"):
        TopKSAE(8, 2, 3)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_save_load_roundtrip(recovery_grid, planted, tmp_path):
    x, _ = planted
    r = recovery_grid[1][0]
    path = save_sae(tmp_path / "sae", r.sae, layer=3, model_name="toy/model", metrics=r.metrics)
    files = ["cfg.json", "sae_reasoning.json", "sae_reasoning.safetensors", "sae_weights.safetensors"]
    assert sorted(p.name for p in path.iterdir()) == files
    ours = load_sae(path)
    assert torch.equal(ours.encode(x), r.sae.encode(x)) and torch.equal(ours.norm_mean, r.sae.norm_mean)
    meta = read_metadata(path)
    assert meta["hook_name"] == "blocks.3.hook_resid_post" and meta["model_name"] == "toy/model"
    assert meta["metrics"]["val_fvu"] == r.metrics["val_fvu"] and meta["k"] == 3
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["normalize_activations"] == "none" and cfg["d_sae"] == 5
    save_sae(path, r.sae, layer=3)  # overwrite in place, no temporary left behind
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_sae_lens_reproduces_encodings(recovery_grid, planted, tmp_path):
    """sae-lens loads the checkpoint as a TopK SAE; on normalise(x) it reproduces our codes (see load_sae_lens)."""
    from sae_lens import SAE, TopKSAE as SaeLensTopK

    x, _ = planted
    trained = recovery_grid[1][0].sae
    ours = TopKSAE(64, 5, 3).load_params({p: getattr(trained, p) for p in PARAMS}, trained.norm_mean)
    with torch.no_grad():
        ours.b_enc -= 1.0  # many negative kept values, and some rows whose values are all negative
    path = save_sae(tmp_path / "sae", ours, layer=3, model_name="toy")
    plain = SAE.load_from_disk(path)
    assert isinstance(plain, SaeLensTopK) and plain.cfg.k == 3
    assert plain.cfg.metadata.hook_name == "blocks.3.hook_resid_post" and plain.cfg.metadata.model_name == "toy"

    with torch.no_grad():
        z = ours.encode(x)
        x_n = normalise(x, norm_mean_of(path))
        assert (z < 0).any() and ((z.max(-1).values <= 0).any())
        # plain sae-lens: same top-k selection, ReLU on the kept values
        assert torch.equal(plain.encode(x_n), z.clamp_min(0))
        positive = z.max(-1).values > 0
        assert torch.equal(plain.encode(x_n).argmax(-1)[positive], ours.behavior(x)[positive])
        assert torch.equal(plain.decode(z), ours.decode(z))
        # with our signed top-k swapped in: identical codes and reconstructions
        signed = load_sae_lens(path)
        assert torch.equal(signed.encode(x_n), z)
        assert torch.equal(signed(x_n), ours(x))
