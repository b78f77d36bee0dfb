"""The top-k SAE of METHOD.md step 4, used as a clusterer of sentence vectors, and its vectorised grid trainer.

Model (one SAE, `TopKSAE`, the plain reference written the obvious way):

    x_n   = (x - norm_mean) / ||x - norm_mean||          normalisation owned by the SAE; callers pass RAW x
    pre   = (x_n - b_dec) @ W_enc + b_enc                 [n, n_latents]
    z     = pre on its top-k entries, 0 elsewhere         exactly k entries, NO ReLU: values may be negative
    x_hat = z @ W_dec + b_dec                             [n, d_in], W_dec rows have unit norm

- `decode` and `forward` return reconstructions of the NORMALISED vector x_n (the per-sample scale is not kept,
  so the raw vector cannot be recovered); FVU is always measured against x_n:
  FVU = sum ||x_n - x_hat||^2 / sum ||x_n - mean(x_n)||^2 over the rows of a split (metrics: train / val).
  The training loss of a batch is its share of the train-split FVU: sum over the batch of ||x_n - x_hat||^2
  divided by (batch size x the train split's per-vector variance), well defined for any batch size.
- A sentence's behavior is `argmax(pre)`, i.e. the largest of its k kept values; ties go to the lowest latent
  index (torch.argmax returns the first maximum). It is computed from `pre`, not from the dense `z`, because a
  dense argmax would pick an off-support zero when all k kept values are negative.
- Layouts follow sae-lens (W_enc `[d_in, n_latents]`, W_dec `[n_latents, d_in]`), so the same ops in the same
  order give the same bits in sae-lens.

Grid trainer (`train_grid`): all SAEs of one layer (every n_latents x k x seed) are trained as one stack, their
latents concatenated (`_Stack`); the loss is computed without reconstructing x_hat (`_Stack.sq_errors`) and its
gradients are written out (`_Stack.loss_and_grads`). k may differ per SAE: the stack takes the top k_max and keeps
the first k_s of them (sorted). Adam is written out vectorised so that each SAE gets its own learning rate
lr = base_lr / sqrt(n_latents / 2**14), with exactly torch.optim.Adam's arithmetic. Each SAE early-stops on its own
validation FVU: it keeps its best parameters and is dropped from the stack.

Determinism: an SAE's initial parameters depend only on (d_in, n_latents, seed); the train/val split and the batch
order depend only on `data_seed` and are shared by every SAE of the grid, so an SAE trained alone sees exactly
the batches it sees inside the grid.

sae-lens compatibility (checked against sae-lens 6.54): see `save_sae` and `load_sae_lens`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_reasoning.cluster_metrics import assignment_metrics

NORM_EPS = 1e-6  # floor on ||x - norm_mean|| so a vector equal to the mean maps to 0 instead of NaN
SAE_LENS_CFG = "cfg.json"
SAE_LENS_WEIGHTS = "sae_weights.safetensors"
OUR_META = "sae_reasoning.json"
OUR_TENSORS = "sae_reasoning.safetensors"  # norm_mean; kept out of sae_weights because sae-lens loads strictly
NORMALISATION_DOC = (
    "x_n = (x - norm_mean) / max(||x - norm_mean||_2, 1e-6), applied per vector before encode; norm_mean is in "
    "sae_reasoning.safetensors. cfg.json says architecture 'topk' (top-k then ReLU); our SAE keeps the k values "
    "without ReLU: sae_reasoning.sae.load_sae_lens(dir) loads it with the signed top-k swapped in."
)


def hook_name(layer: int) -> str:
    """TransformerLens name of the residual stream output of block `layer` (the one definition is in models.py)."""
    from sae_reasoning.models import resid_post_hook_name

    return resid_post_hook_name(layer)


def normalise(x: Tensor, norm_mean: Tensor, eps: float = NORM_EPS) -> Tensor:
    """Raw vectors `[..., d_in]` (any float dtype) -> centred, unit-L2-norm float32 vectors."""
    x_c = x.float() - norm_mean.float()
    return x_c / x_c.norm(dim=-1, keepdim=True).clamp_min(eps)


def lr_for(n_latents: int, base_lr: float = 2e-4, ref_latents: int = 2**14) -> float:
    """The paper's size-scaled learning rate: base_lr / sqrt(n_latents / 2**14)."""
    return base_lr / math.sqrt(n_latents / ref_latents)


INITS = ("data", "spherical", "random")


def init_params(d_in: int, n_latents: int, seed: int, x_n: Tensor | None = None,
                method: str = "data", device: str | torch.device | None = None) -> dict[str, Tensor]:
    """Initial parameters of one SAE, a function of (d_in, n_latents, seed) and, for a data init, `x_n`.

    - "random" (or x_n None): W_enc ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (nn.Linear's default, as in sparsify), b_enc 0.
    - "data" (x_n = normalised training vectors): Euclidean k-means on x_n (`euclidean_kmeans_centres`: k-means++, 10
      restarts, the lowest-inertia run kept; on `device`). Encoder column i = centre c_i and b_enc_i = -|c_i|^2 / 2, so
      that the initial pre-activation x.c_i - |c_i|^2/2 = (|x|^2 - |x - c_i|^2) / 2 and the initial argmax latent IS the
      k-means assignment (nearest centre). Why: a random init often leaves the argmax assignment in a poor local minimum
      (two behaviors sharing a latent while a third splits). On the organism, at layer 1, k-means has two nearly equal
      solutions (the five behaviors, or additions vs subtractions with verify + correct merged); which one a seed lands
      in varies, and the trained k = 1 SAEs' validation FVU prefers the behaviors, so a grid with a few seeds and a
      label-free pick by FVU finds them (tests/test_organism_sae.py).
    - "spherical": the encoder's columns are spherical k-means centres (k-means++ seeds from x_n, 10 Lloyd
      rounds, unit columns), b_enc 0: the initial argmax is the nearest centre by cosine.
    Either way W_dec = W_enc.T with unit rows (decoder initialised from the encoder) and b_dec = 0.
    """
    if method not in INITS:
        raise ValueError(f"SAE init {method!r}: choose one of {', '.join(INITS)}")
    gen = torch.Generator().manual_seed(seed)
    b_enc = torch.zeros(n_latents)
    if x_n is None or method == "random":
        W_enc = (torch.rand(d_in, n_latents, generator=gen) * 2 - 1) / math.sqrt(d_in)  # [d_in, L]
    elif method == "spherical":
        W_enc = kmeanspp_seeds(x_n, n_latents, seed).T.contiguous()  # [d_in, L], unit columns
    else:
        return _params_from_centres(euclidean_kmeans_centres(x_n, n_latents, seed, device=device))
    return _params_with_tied_decoder(W_enc, b_enc)


def _params_from_centres(centres: Tensor) -> dict[str, Tensor]:
    """The data init's parameters from k-means centres [L, d_in] (`init_params`, "data")."""
    return _params_with_tied_decoder(centres.T.contiguous(), -0.5 * centres.pow(2).sum(-1))


def _params_with_tied_decoder(W_enc: Tensor, b_enc: Tensor) -> dict[str, Tensor]:
    W_dec = W_enc.T.clone()
    W_dec /= W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [L, d_in]
    return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": torch.zeros(W_enc.shape[0])}


def init_params_many(d_in: int, keys: Sequence[tuple[int, int]], x_n: Tensor | None = None, method: str = "data",
                     device: str | torch.device | None = None, progress: bool = False, desc: str = "init"
                     ) -> dict[tuple[int, int], dict[str, Tensor]]:
    """`init_params` for every (n_latents, seed) of `keys`, equal to calling it for each. Off the CPU, the data
    init's k-means runs for several of them in one batch (`euclidean_kmeans_centres_many`; `_padding_groups`: the
    paper's sizes 5..50 make two batches): on an H200 each SAE's k-means took ~0.12 s, mostly launches and syncs of
    small kernels, so a grid's init cost more than its training. On a CPU they run one at a time (a progress bar
    when `progress`): there the k-means is bound by its products, which a batch pads to its largest n_latents."""
    keys = list(dict.fromkeys(keys))
    if method == "data" and x_n is not None and torch.device(device or x_n.device).type != "cpu" and len(keys) > 1:
        out = {}
        for group in _padding_groups(keys):
            out.update(zip(group, map(_params_from_centres, euclidean_kmeans_centres_many(x_n, group, device=device))))
        return {key: out[key] for key in keys}
    return {(n, seed): init_params(d_in, n, seed, x_n, method, device)
            for n, seed in tqdm(keys, desc=desc, disable=not progress, leave=False)}


def _padding_groups(keys: Sequence[tuple[int, int]], max_padding: float = 1.5) -> list[list[tuple[int, int]]]:
    """`keys` (n_latents, seed) by increasing n_latents, cut into groups that one padded batch computes with at most
    `max_padding` times the centres the group's runs would compute alone (each run padded to the group's largest)."""
    groups: list[list[tuple[int, int]]] = []
    for key in sorted(keys):
        group = groups[-1] if groups else None
        if group is not None and (len(group) + 1) * key[0] <= max_padding * (sum(n for n, _ in group) + key[0]):
            group.append(key)
        else:
            groups.append([key])
    return groups


def _sq_dists(x_t: Tensor, sq: Tensor, c: Tensor) -> Tensor:
    """Squared distances [R, m, N] of the centres `c` [R, m, d] to the points (`x_t` [d, N], `sq` their squared
    norms [N]), clamped against rounding below 0."""
    return torch.baddbmm(c.pow(2).sum(-1, keepdim=True) + sq, c, x_t.expand(len(c), -1, -1), alpha=-2).clamp_min_(0)


def _kmeanspp_batch(x: Tensor, x_t: Tensor, sq: Tensor, u: Tensor) -> Tensor:
    """k-means++ seeding (D^2 sampling) of R independent runs at once: row indices [R, n] of `x` [N, d] (`x_t` =
    `x.T`, `sq` its squared row norms). `u` [R, n] (uniform in [0, 1), float64, drawn up front from the seeded
    generator) makes each draw: the first row uniform, each next by inverse CDF of the squared distances to the
    nearest row chosen so far. Drawing the uniforms up front (instead of one `multinomial` per centre on the CPU)
    keeps the R runs in lockstep on the data's device with no transfer or sync per centre: on a GPU those were
    most of the data init's time (benchmarks/README.md)."""
    R, n = u.shape
    N = len(x)
    idx = torch.empty(R, n, dtype=torch.long, device=x.device)
    idx[:, 0] = (u[:, 0] * N).long().clamp_(max=N - 1)
    d2 = _sq_dists(x_t, sq, x[idx[:, :1]])[:, 0].double()  # [R, N]
    for j in range(1, n):
        cdf = d2.cumsum(1)
        total = cdf[:, -1:]
        # side="right": the first row whose cdf exceeds the target has d2 > 0 (never an already chosen row);
        # with every distance 0 (fewer distinct rows than n) the draw falls back to uniform
        pick = torch.searchsorted(cdf, u[:, j:j + 1].to(x.device) * total, right=True)[:, 0].clamp_(max=N - 1)
        pick = torch.where(total[:, 0] > 0, pick, (u[:, j].to(x.device) * N).long())
        idx[:, j] = pick.clamp_(max=N - 1)
        d2 = torch.minimum(d2, _sq_dists(x_t, sq, x[pick][:, None])[:, 0].double())
    return idx


# scores per block of points in `_nearest`: on a CPU 2**18 floats (1 MB) stay in the core's L2 cache; elsewhere the
# block only bounds the memory (2**28 floats, 1 GiB, and as much again for the reduction's temporary)
_NEAREST_BLOCK_ELEMENTS = 2**18
_NEAREST_GPU_BLOCK_ELEMENTS = 2**28


def _nearest(x_t: Tensor, sq: Tensor, c: Tensor, valid: Tensor | None = None) -> Tensor:
    """Index [R, N] of each point's nearest centre in each run (`c` [R, n, d]; `valid` [R, n]: the run's own
    centres, where runs of several sizes share a batch), the lowest index among ties.
    argmin_j |x - c_j|^2 = argmin_j (|c_j|^2 - 2 x.c_j), laid out [R, n, N] so that the reduction over the centres
    vectorises over the points (`_topk_indices`: argmin over a 50-wide row was most of a round).
    On a CPU the points go in blocks whose scores fit in the cache: the reduction's passes over a whole [R, n, N]
    block (20 MB at 10 runs x 50 centres x 10k points) had cost more than the product; in blocks a round at 50
    centres takes half the time (benchmarks/README.md). A GPU takes up to 1 GiB of scores at once."""
    R, n, _ = c.shape
    N = x_t.shape[1]
    c_sq = c.pow(2).sum(-1, keepdim=True)
    if valid is not None:  # another run's padding: never the nearest
        c_sq = c_sq.masked_fill(~valid[..., None], math.inf)
    per_block = _NEAREST_BLOCK_ELEMENTS if x_t.device.type == "cpu" else _NEAREST_GPU_BLOCK_ELEMENTS
    block = max(256, per_block // (R * n))
    out = []
    for i in range(0, N, block):
        scores = torch.baddbmm(c_sq, c, x_t[:, i:i + block].expand(R, -1, -1), alpha=-2)
        out.append(_topk_indices(scores.neg_(), 1)[:, 0])
    return out[0] if len(out) == 1 else torch.cat(out, 1)


def _lloyd_batch(x: Tensor, x_t: Tensor, sq: Tensor, c: Tensor, iters: int, valid: Tensor | None = None
                 ) -> tuple[Tensor, Tensor]:
    """Lloyd rounds for R runs at once from centres `c` [R, n, d] (updated in place), each until its assignment
    stops changing or `iters` rounds; returns (centres, inertia [R]). Each run's rounds are exactly those it would
    make alone; a run that has converged leaves the batch. `valid` [R, n]: each run's own centres, where runs of
    fewer centres are padded to n (a padding centre never gets a point, so it never moves)."""
    R, n, d = c.shape
    valid_all = valid
    assign = _nearest(x_t, sq, c, valid)  # [R, N]
    # cluster sums kept up to date by the points that moved (float64, so that the updates do not drift): a full
    # index_add over every point each round was a quarter of the init at d = 1536, and late rounds move few points
    x64 = x.double()
    sums = torch.stack([x64.new_zeros(n, d).index_add_(0, a, x64) for a in assign])
    counts = torch.stack([torch.bincount(a, minlength=n) for a in assign]).double()  # [R, n]
    run_ids = torch.arange(R, device=x.device)  # the runs still in the batch
    c_run = c.clone()
    for _it in range(iters):
        keep = counts > 0  # an empty cluster keeps its centre
        c_run[keep] = (sums[keep] / counts[keep][:, None]).float()
        new = _nearest(x_t, sq, c_run, valid)
        run, point = (new != assign).nonzero(as_tuple=True)
        moving = torch.zeros(len(run_ids), dtype=torch.bool, device=x.device)
        moving[run] = True
        c[run_ids[~moving]] = c_run[~moving]
        if len(run) == 0:
            break
        old_f, new_f = assign[run, point] + run * n, new[run, point] + run * n
        x_moved = x64[point]
        flat = sums.view(-1, d)
        flat.index_add_(0, old_f, x_moved, alpha=-1).index_add_(0, new_f, x_moved)
        counts.view(-1).add_(torch.bincount(new_f, minlength=counts.numel()) -
                             torch.bincount(old_f, minlength=counts.numel()))
        assign = new
        if not bool(moving.all()):  # converged runs leave the batch
            run_ids, c_run, sums, counts, assign = (t[moving] for t in (run_ids, c_run, sums, counts, assign))
            valid = None if valid is None else valid[moving]
    else:
        c[run_ids] = c_run  # the rounds ran out
    best = _nearest(x_t, sq, c, valid_all)
    inertia = torch.stack([(x - c[r][best[r]]).pow(2).sum() for r in range(R)])
    return c, inertia


def euclidean_kmeans_centres(x_n: Tensor, n: int, seed: int, n_init: int = 10, iters: int = 50,
                             device: str | torch.device | None = None) -> Tensor:
    """`n` Euclidean k-means centres of `x_n` [N, d]: `n_init` seeded runs of k-means++ (D^2 sampling) then Lloyd
    (up to `iters` rounds, until the assignment stops changing); the run with the lowest inertia wins (the first
    among equals). [n, d] float32 on the CPU. Written in torch rather than with scikit-learn's KMeans so that it
    runs on the SAE's device (at d = 1536 and 20k rows, 10 restarts for each SAE of a grid took scikit-learn
    minutes on CPU), with the restarts batched: one product per round for all of them, and no sync per centre."""
    return euclidean_kmeans_centres_many(x_n, [(n, seed)], n_init, iters, device)[0]


def euclidean_kmeans_centres_many(x_n: Tensor, keys: Sequence[tuple[int, int]], n_init: int = 10, iters: int = 50,
                                  device: str | torch.device | None = None) -> list[Tensor]:
    """`euclidean_kmeans_centres(x_n, n, seed)` for every (n, seed) of `keys`, all restarts of all of them in one
    batch: runs with fewer centres are padded to the largest n with centres that never get a point (`valid`).
    Each run makes the draws and rounds it makes alone; only the products are wider."""
    dev = torch.device(device) if device is not None else x_n.device
    x = x_n.float().to(dev)
    ns = [n for n, _ in keys]
    if len(x) < max(ns):
        raise ValueError(f"data init needs at least n_latents={max(ns)} vectors, got {len(x)}")
    u = torch.full((len(keys) * n_init, max(ns)), 0.5, dtype=torch.float64)  # (draws past a run's n: unused)
    for i, (n, seed) in enumerate(keys):
        u[i * n_init:(i + 1) * n_init, :n] = torch.rand(n_init, n, generator=torch.Generator().manual_seed(seed),
                                                        dtype=torch.float64)
    valid = (torch.arange(max(ns)) < torch.tensor(ns).repeat_interleave(n_init)[:, None]).to(dev)  # [R, n_max]
    sq = x.pow(2).sum(1)
    x_t = x.T.contiguous()  # [d, N], made contiguous once for every round
    idx = _kmeanspp_batch(x, x_t, sq, u)
    centres, inertia = _lloyd_batch(x, x_t, sq, x[idx].clone(), iters, None if valid.all() else valid)
    best = inertia.view(len(keys), n_init).argmin(1).tolist()
    return [centres[i * n_init + b, :n].cpu() for i, (n, b) in enumerate(zip(ns, best))]


def kmeanspp_seeds(x_n: Tensor, n: int, seed: int, max_rows: int = 20_000, lloyd_iters: int = 10) -> Tensor:
    """`n` unit directions from `x_n` [N, d]: k-means++ (D^2 sampling) on a seeded subsample, then `lloyd_iters`
    rounds of spherical k-means; [n, d] float32."""
    gen = torch.Generator().manual_seed(seed)
    x = x_n.float().cpu()
    if len(x) > max_rows:
        x = x[torch.randperm(len(x), generator=gen)[:max_rows]]
    if len(x) < n:
        raise ValueError(f"data init needs at least n_latents={n} vectors, got {len(x)}")
    u = torch.rand(1, n, generator=gen, dtype=torch.float64)
    c = x[_kmeanspp_batch(x, x.T.contiguous(), x.pow(2).sum(1), u)[0]]
    c = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    for _ in range(lloyd_iters):  # spherical k-means refinement: assign by cosine, centre = normalised member sum
        assign = (x @ c.T).argmax(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = sums.norm(dim=-1) == 0
        sums[empty] = c[empty]  # an empty cluster keeps its seed
        c = sums / sums.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return c


# ----------------------------------------------------------------------------------------------------------------
# The reference SAE


class TopKSAE(nn.Module):
    """One top-k SAE with its input normalisation. The plain reference the grid trainer is tested against."""

    def __init__(self, d_in: int, n_latents: int, k: int = 3):
        super().__init__()
        if not 1 <= k <= n_latents:
            raise ValueError(f"need 1 <= k <= n_latents, got k={k}, n_latents={n_latents}")
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        self.W_enc = nn.Parameter(torch.zeros(d_in, n_latents))  # [d_in, L]
        self.b_enc = nn.Parameter(torch.zeros(n_latents))  # [L]
        self.W_dec = nn.Parameter(torch.zeros(n_latents, d_in))  # [L, d_in]
        self.b_dec = nn.Parameter(torch.zeros(d_in))  # [d_in]
        self.register_buffer("norm_mean", torch.zeros(d_in))  # [d_in]

    @classmethod
    def from_init(cls, d_in: int, n_latents: int, k: int = 3, seed: int = 0, norm_mean: Tensor | None = None):
        sae = cls(d_in, n_latents, k)
        sae.load_params(init_params(d_in, n_latents, seed), norm_mean)
        return sae

    @torch.no_grad()
    def load_params(self, params: Mapping[str, Tensor], norm_mean: Tensor | None = None) -> "TopKSAE":
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(self, name).copy_(params[name])
        if norm_mean is not None:
            self.norm_mean.copy_(norm_mean)
        return self

    def normalise(self, x: Tensor) -> Tensor:
        return normalise(x, self.norm_mean)

    def pre_acts(self, x_n: Tensor) -> Tensor:
        """Normalised `[n, d_in]` -> encoder pre-activations `[n, L]` (same ops as sae-lens' TopKSAE.encode)."""
        return (x_n - self.b_dec) @ self.W_enc + self.b_enc

    def encode_normalised(self, x_n: Tensor) -> Tensor:
        pre = self.pre_acts(x_n)
        vals, idx = pre.topk(self.k, dim=-1)  # [n, k]
        return torch.zeros_like(pre).scatter(-1, idx, vals)  # [n, L], no ReLU

    def encode(self, x: Tensor) -> Tensor:
        """RAW vectors `[n, d_in]` -> dense codes `[n, L]`: the top-k values per row, zeros elsewhere."""
        return self.encode_normalised(self.normalise(x))

    def decode(self, z: Tensor) -> Tensor:
        """Codes `[n, L]` -> reconstruction of the NORMALISED input `[n, d_in]`."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def behavior(self, x: Tensor) -> Tensor:
        """RAW vectors -> argmax latent `[n]` (int64); ties to the lowest index."""
        return self.pre_acts(self.normalise(x)).argmax(-1)

    @torch.no_grad()
    def fvu(self, x: Tensor) -> float:
        """Fraction of variance of the normalised vectors left unexplained (one batch, its own mean)."""
        x_n = self.normalise(x)
        err = (self.decode(self.encode_normalised(x_n)) - x_n).pow(2).sum()
        return float(err / (x_n - x_n.mean(0)).pow(2).sum())

    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class SignedTopK(nn.Module):
    """Top-k without ReLU, a drop-in for sae-lens' `TopK` activation (which applies ReLU to the kept values)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        vals, idx = x.topk(self.k, dim=-1)
        return torch.zeros_like(x).scatter(-1, idx, vals)


# ----------------------------------------------------------------------------------------------------------------
# The stacked (grid) SAE


@dataclass
class _Stack:
    """S SAEs of one layer with their latents concatenated, no padding: N = sum of the n_latents.

    Parameters: W_enc_t [N, d] (the encoder's columns, as rows), b_enc [N], W_dec [N, d], b_dec [S, d].
    Per SAE: n [S] (n_latents), k [S], lr [S]. Derived (`_index`): seg [N], the SAE of each latent, and
    pad_map [S, L] (L = max n), the row of SAE s's latent j, or N for j >= n_s; slots [N], the inverse. The
    top-k runs on a padded [S, L, B] copy of the pre-activations (-inf on padding), with no gradient, and
    everything else on the N real rows.
    Why concatenated: with the paper's sizes 5..50 padding to 50 wasted 45% of every product and Adam update."""

    W_enc_t: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    n: Tensor
    k: Tensor
    lr: Tensor
    seg: Tensor = field(init=False)
    pad_map: Tensor = field(init=False)
    slots: Tensor = field(init=False)
    keep_k: Tensor = field(init=False)

    PARAMS = ("W_enc_t", "b_enc", "W_dec", "b_dec")

    def __post_init__(self) -> None:
        self._index()

    def _index(self) -> None:
        device = self.W_dec.device
        ns = self.n.tolist()
        starts = torch.tensor([0, *np.cumsum(ns)[:-1].tolist()], device=device)
        self.seg = torch.repeat_interleave(torch.arange(len(ns), device=device), self.n.to(device))
        j = torch.arange(max(ns), device=device)
        real = j < self.n.to(device).view(-1, 1)  # [S, L]
        self.pad_map = torch.where(real, starts.view(-1, 1) + j, sum(ns))
        self.slots = real.view(-1).nonzero().squeeze(1)  # [N]: where row i sits in the flattened [S, L]
        # [S, k_max, 1]: which of the k_max top slots each SAE keeps; made here, on the device, because a per-step
        # copy of k to a GPU would make every training step wait for the GPU's queue
        self.keep_k = (torch.arange(int(self.k.max()), device=device) < self.k.to(device).view(-1, 1)).unsqueeze(2)

    @classmethod
    def build(cls, params: Sequence[Mapping[str, Tensor]], ks: Sequence[int], lrs: Sequence[float], device):
        return cls(
            W_enc_t=torch.cat([p["W_enc"].T for p in params]).to(device),
            b_enc=torch.cat([p["b_enc"] for p in params]).to(device),
            W_dec=torch.cat([p["W_dec"] for p in params]).to(device),
            b_dec=torch.stack([p["b_dec"] for p in params]).to(device),
            n=torch.tensor([p["W_enc"].shape[1] for p in params]),
            k=torch.tensor(list(ks)),
            lr=torch.tensor(list(lrs), dtype=torch.float32),
        )

    def params(self) -> list[Tensor]:
        return [getattr(self, p) for p in self.PARAMS]

    def lrs(self) -> list[Tensor]:
        """Per-parameter learning rates shaped to broadcast against `params()` (each latent row takes its SAE's)."""
        lr = self.lr.to(self.W_dec.device)
        per_row = lr[self.seg]
        return [per_row.view(-1, 1), per_row, per_row.view(-1, 1), lr.view(-1, 1)]

    def _rows(self, s: int) -> Tensor:
        """The latent rows of SAE `s`."""
        return self.pad_map[s, : int(self.n[s])]

    def keep_rows(self, keep: Tensor) -> list[Tensor]:
        """For SAEs `keep` (indices into S): the rows of each parameter (and of its optimiser state) to keep."""
        rows = torch.cat([self._rows(s) for s in keep.tolist()])
        return [rows, rows, rows, keep.to(self.W_dec.device)]

    def select(self, keep: Tensor) -> "_Stack":
        """Keep SAEs `keep`; detached copies of their parameters."""
        rows = self.keep_rows(keep)
        return _Stack(*[getattr(self, p)[r].detach().clone() for p, r in zip(self.PARAMS, rows)],
                      n=self.n[keep.cpu()], k=self.k[keep.cpu()], lr=self.lr[keep.cpu()])

    def unstack(self, s: int) -> dict[str, Tensor]:
        rows = self._rows(s)
        out = {"W_enc": self.W_enc_t[rows].T, "b_enc": self.b_enc[rows], "W_dec": self.W_dec[rows],
               "b_dec": self.b_dec[s]}
        return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in out.items()}

    def _offsets(self, b_dec_rows: Tensor) -> Tensor:
        """b_enc - b_dec W_enc per latent `[N]`: (x_n - b_dec) W_enc + b_enc = x_n W_enc + this. `b_dec_rows`
        `[N, d]`: each latent's SAE's b_dec (`b_dec[seg]`)."""
        return self.b_enc - (self.W_enc_t * b_dec_rows).sum(-1)

    def _padded(self, rows: Tensor, fill: float) -> Tensor:
        """Rows `[N, ...]` -> a new `[S, L, ...]` with `fill` on padding."""
        out = rows.new_full((self.pad_map.numel(), *rows.shape[1:]), fill)
        out[self.slots] = rows
        return out.view(*self.pad_map.shape, *rows.shape[1:])

    def forward(self, x_n: Tensor) -> tuple[Tensor, Tensor]:
        """The plain dense computation (a reference for `sq_errors`): normalised `[B, d]` -> (reconstructions
        `[S, B, d]`, pre-activations `[S, B, L]`, -inf on padding)."""
        offsets = self._offsets(self.b_dec[self.seg])
        pre = self._padded((self.W_enc_t @ x_n.T) + offsets.unsqueeze(1), -math.inf).transpose(1, 2)
        k_max = int(self.k.max())
        vals, idx = pre.topk(k_max, dim=-1)  # [S, B, k_max], sorted: the first k_s are SAE s's top k_s
        keep = torch.arange(k_max, device=pre.device) < self.k.to(pre.device).view(-1, 1, 1)  # [S, 1, k_max]
        z = torch.zeros_like(pre).scatter(-1, idx, torch.where(keep, vals, 0.0))  # where, not *, as vals has -inf
        return torch.bmm(z, self._padded(self.W_dec, 0.0)) + self.b_dec.unsqueeze(1), pre

    def sq_errors(self, x_n: Tensor) -> Tensor:
        """Normalised `[B, d]` -> squared reconstruction errors ||x_n - x_hat||^2 `[S, B]`, differentiable; equal
        to `forward`'s (to float32 rounding), without any `[S, B, d]` tensor.

        Why: the dense computation builds `x_n - b_dec`, `z @ W_dec` and `x_hat - x_n` as `[S, B, d]` tensors and
        runs three dense products per direction; on a CPU those temporaries, not the arithmetic, were most of a
        grid step. With z holding k values v at latents i, u = W_dec (x_n - b_dec) and G = W_dec W_dec^T:
            ||x_n - b_dec - z W_dec||^2 = ||x_n - b_dec||^2 - 2 v.u[i] + v^T G[i, i] v
        so a step needs two `[N, d] x [d, B]` products and scalars gathered at the k indices. Pre-activations are
        laid out latents-first so that the top-k reduces over a non-contiguous axis, which vectorises over B
        (`_topk_indices`; torch.topk over 50-wide rows was a third of the step)."""
        return self._errors(x_n)[0]

    def _errors(self, x_n: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """`sq_errors` and what `loss_and_grads` needs of its forward: idx `[S * k_max, B]` (rows of the kept
        latents), keep `[S, k_max, 1]`, v, u[i] `[S, k_max, B]`, G[i, i] `[S, k_max, k_max, B]`, pairs (the flat
        indices of those G entries in the `[S, L, L]` blocks), the padded decoder `[S, L, d]`, b_dec per latent
        `[N, d]`."""
        S, B = len(self.n), x_n.shape[0]
        x_t = x_n.T  # [d, B]
        b_dec_rows = self.b_dec[self.seg]  # [N, d]
        pre_t = self.W_enc_t @ x_t + self._offsets(b_dec_rows).unsqueeze(1)  # [N, B]
        k_max = int(self.k.max())
        L = self.pad_map.shape[1]
        with torch.no_grad():
            idx_l = _topk_indices(self._padded(pre_t, -math.inf), k_max)  # [S, k_max, B], into L
            idx = self.pad_map.gather(1, idx_l.view(S, -1)).view(S * k_max, B)  # into N
            # G[i_a, i_b] of each SAE, as flat indices into its [S, L, L] Gram blocks
            pairs = ((torch.arange(S, device=idx.device).view(S, 1, 1, 1) * L + idx_l.unsqueeze(2)) * L
                     + idx_l.unsqueeze(1)).reshape(-1)
        keep = self.keep_k
        v = torch.where(keep, pre_t.gather(0, idx).view(S, k_max, B), 0.0)  # [S, k_max, B]
        u_t = self.W_dec @ x_t - (self.W_dec * b_dec_rows).sum(-1, keepdim=True)  # [N, B]
        u_k = u_t.gather(0, idx).view(S, k_max, B)
        w_dec = self._padded(self.W_dec, 0.0)  # [S, L, d]
        gram = torch.bmm(w_dec, w_dec.transpose(1, 2))  # [S, L, L]: each SAE's own block, not all N x N
        gram_k = gram.reshape(-1).gather(0, pairs).view(S, k_max, k_max, B)
        centred_sq = x_n.pow(2).sum(-1) - 2 * (self.b_dec @ x_t) + self.b_dec.pow(2).sum(-1, keepdim=True)  # [S, B]
        err = centred_sq - 2 * (v * u_k).sum(1) + (v.unsqueeze(2) * gram_k * v.unsqueeze(1)).sum((1, 2))
        return err, (idx, keep, v, u_k, gram_k, pairs, w_dec, b_dec_rows)

    @torch.no_grad()
    def loss_and_grads(self, x_n: Tensor, scale: float) -> tuple[Tensor, list[Tensor]]:
        """Errors `[S, B]` and the gradients of `scale * errors.sum()` for `params()`, by the chain rule through
        `_errors` written out (tests check them against autograd). Why by hand: autograd's backward of the gathers
        and products was a third of a grid step on a CPU; written out, both decoder-side and encoder-side gradients
        come from one `[2N, B] x [B, d]` product. With e = ||x - b_dec||^2 - 2 v.u[i] + v^T G[i, i] v:
            de/dv = 2 (G[i, i] v - u[i]) on kept latents,   de/du[i] = -2 v,   de/dG[i, i] = v v^T."""
        err, (idx, keep, v, u_k, gram_k, pairs, w_dec, b_dec_rows) = self._errors(x_n)
        S, k_max, B = v.shape
        N, L = self.W_dec.shape[0], w_dec.shape[1]
        d_v = torch.where(keep, (gram_k * v.unsqueeze(1)).sum(2) - u_k, 0.0).mul_(2 * scale)  # [S, k_max, B]
        # the kept rows of one column are distinct (disjoint SAEs, distinct top-k), so scatter_ needs no add
        d_pu = x_n.new_zeros(2 * N, B)
        d_pu.scatter_(0, idx, d_v.view(S * k_max, B)).scatter_(0, idx + N, v.view(S * k_max, B) * (-2 * scale))
        sums = d_pu.sum(1, keepdim=True)  # [2N, 1]
        d_w = d_pu @ x_n  # [2N, d]: d pre / d u against x
        d_gram = x_n.new_zeros(S * L * L).index_add_(0, pairs, (v.unsqueeze(2) * v.unsqueeze(1)).reshape(-1))
        d_gram = d_gram.view(S, L, L)
        g_gram = torch.bmm(d_gram + d_gram.transpose(1, 2), w_dec).view(S * L, -1)[self.slots]  # [N, d]
        g_enc = d_w[:N] - sums[:N] * b_dec_rows
        g_dec = d_w[N:] - sums[N:] * b_dec_rows + scale * g_gram
        g_b_dec = (2 * scale) * (B * self.b_dec - x_n.sum(0))  # the ||x - b_dec||^2 term
        g_b_dec.index_add_(0, self.seg, -(sums[:N] * self.W_enc_t + sums[N:] * self.W_dec))  # through the offsets
        return err, [g_enc, sums[:N, 0], g_dec, g_b_dec]


@torch.no_grad()
def _topk_indices(pre_t: Tensor, k: int) -> Tensor:
    """Indices `[S, k, B]` of the k largest of `pre_t` `[S, L, B]` along L, in decreasing order, the lowest index
    first among equal values (argmax's rule). OVERWRITES `pre_t` (callers pass a copy). k rounds of a max over L:
    `amax` over a non-innermost axis is vectorised over B, and the index of the first maximum is found with float
    arithmetic only (comparisons into bool tensors cost 4x a subtraction here)."""
    S, L, B = pre_t.shape
    # score = sign(p - top) + rank / (2L): at a maximum sign = 0 and the score is rank / 2L in (0, 1/2], the rank
    # L..1 being higher for a lower index; elsewhere sign = -1 and the score is < 0. Rounding recovers the rank.
    rank = torch.arange(L, 0, -1, device=pre_t.device, dtype=pre_t.dtype).view(1, L, 1) / (2 * L)
    score = torch.empty_like(pre_t)
    out = []
    for j in range(k):
        top = pre_t.amax(1, keepdim=True)  # [S, 1, B]
        torch.sub(pre_t, top, out=score).sign_().add_(rank)
        first = (L - (score.amax(1, keepdim=True) * (2 * L)).round_()).long()
        out.append(first)
        if j + 1 < k:
            pre_t.scatter_(1, first, -math.inf)
    return torch.cat(out, 1)


class _Adam:
    """torch.optim.Adam's update (same formula and op order), vectorised over a stack with per-row learning rates
    (`_Stack.lrs`: each latent row takes its SAE's)."""

    def __init__(self, params: Sequence[Tensor], betas=(0.9, 0.999), eps: float = 1e-8):
        self.betas, self.eps, self.t = betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def select(self, rows: Sequence[Tensor]) -> None:
        """Keep the state rows `rows` of each parameter (`_Stack.keep_rows`)."""
        self.m = [m[r].clone() for m, r in zip(self.m, rows)]
        self.v = [v[r].clone() for v, r in zip(self.v, rows)]

    @torch.no_grad()
    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor], lrs: Sequence[Tensor]) -> None:
        b1, b2 = self.betas
        self.t += 1
        bc1, bc2_sqrt = 1 - b1**self.t, math.sqrt(1 - b2**self.t)
        for p, g, m, v, lr in zip(params, grads, self.m, self.v, lrs):
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            p.sub_((lr / bc1) * (m / denom))


# ----------------------------------------------------------------------------------------------------------------
# Data access: tensors (any float dtype, CPU or device) or numpy arrays / memmaps, read one batch at a time


Data = Tensor | np.ndarray


def read_rows(x: Data, idx: Tensor, device) -> Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.asarray(x[idx.cpu().numpy()])).to(device=device, dtype=torch.float32)
    return x.index_select(0, idx.to(x.device)).to(device=device, dtype=torch.float32)


def _chunks(idx: Tensor, size: int):
    for i in range(0, len(idx), size):
        yield idx[i : i + size]


def mean_rows(x: Data, idx: Tensor, device, chunk: int = 8192) -> Tensor:
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    for batch in _chunks(idx, chunk):
        total += read_rows(x, batch, device).double().sum(0)
    return (total / len(idx)).float()


def split_indices(n: int, val_frac: float, data_seed: int) -> tuple[Tensor, Tensor]:
    """Seeded (train, val) row indices, each sorted. The same for every layer of a grid (same rows)."""
    n_val = int(round(n * val_frac))
    if not 0 < n_val < n:
        raise ValueError(f"val_frac={val_frac} leaves {n_val} of {n} vectors for validation; need 0 < n_val < n")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(data_seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


# ----------------------------------------------------------------------------------------------------------------
# Grid training


@dataclass(frozen=True)
class SAESpec:
    layer: int
    n_latents: int
    k: int = 3
    seed: int = 0

    @property
    def name(self) -> str:
        return f"layer{self.layer}_n{self.n_latents}_k{self.k}_seed{self.seed}"


@dataclass
class GridConfig:
    n_latents: tuple[int, ...] = tuple(range(5, 55, 5))
    ks: tuple[int, ...] = (3,)
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 512
    max_epochs: int = 300
    patience: int = 10  # epochs without a val-FVU improvement > min_delta before an SAE stops
    min_delta: float = 0.0
    val_frac: float = 0.1
    data_seed: int = 0  # split + batch order, shared by all SAEs
    base_lr: float = 2e-4
    lr_ref_latents: int = 2**14
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    device: str = "cpu"
    eval_elements: int = 2**25  # rows per eval chunk = eval_elements // (S * d_in): bounds eval memory
    init: str = "data"  # "data" (Euclidean k-means) | "spherical" (spherical k-means) | "random": see init_params
    progress: bool = True

    def specs(self, layers: Sequence[int]) -> list[SAESpec]:
        return [SAESpec(l, n, k, s) for l in layers for n in self.n_latents for k in self.ks for s in self.seeds]


@dataclass
class TrainedSAE:
    spec: SAESpec
    sae: TopKSAE  # best-val-FVU parameters, on CPU
    metrics: dict[str, Any]
    history: dict[str, list[float]] = field(default_factory=dict)  # per epoch: train_fvu (batch mean), val_fvu


@torch.no_grad()
def _total_variance(x: Data, idx: Tensor, norm_mean: Tensor, device, chunk: int = 8192) -> float:
    """sum_i ||x_n,i - mean(x_n)||^2 over rows `idx` (float64): the FVU denominator of a split."""
    sum_x = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    sum_sq = torch.zeros((), dtype=torch.float64, device=device)
    for batch in _chunks(idx, chunk):
        x_n = normalise(read_rows(x, batch, device), norm_mean).double()
        sum_x += x_n.sum(0)
        sum_sq += x_n.pow(2).sum()
    return float(sum_sq - sum_x.pow(2).sum() / len(idx))


@torch.no_grad()
def _stack_fvu(stack: _Stack, x: Data, idx: Tensor, norm_mean: Tensor, cfg: GridConfig,
               total_var: float | None = None) -> Tensor:
    """Exact FVU `[S]` of every SAE of the stack over rows `idx` (denominator: the rows' own mean; pass
    `total_var`, `_total_variance` of the rows, when it is already known)."""
    device, S = stack.W_dec.device, len(stack.n)
    # per row: [N] pre-activations and decoder products, their [S, L] padded copy, the input
    chunk = max(64, cfg.eval_elements // (2 * (stack.W_dec.shape[0] + stack.pad_map.numel()) + stack.W_dec.shape[1]))
    err = torch.zeros(S, dtype=torch.float64, device=device)
    for batch in _chunks(idx, chunk):
        err += stack.sq_errors(normalise(read_rows(x, batch, device), norm_mean)).double().sum(1)
    if total_var is None:
        total_var = _total_variance(x, idx, norm_mean, device, chunk)
    return (err / total_var).float()


def _train_layer(
    x: Data, specs: list[SAESpec], cfg: GridConfig, train_idx: Tensor, val_idx: Tensor, desc: str
) -> tuple[list[dict[str, Tensor]], Tensor, list[dict[str, Any]], list[dict[str, list[float]]]]:
    """Train the SAEs `specs` (one layer) as one stack. Returns best params, norm_mean, stats, histories."""
    device = torch.device(cfg.device)
    if isinstance(x, Tensor):
        x = x.to(device)  # keep the storage dtype; batches are cast to float32
    d_in = x.shape[1]
    for rows in _chunks(torch.arange(len(x)), 65536):  # NaN/inf would silently turn every FVU into NaN
        bad = ~torch.isfinite(read_rows(x, rows, "cpu")).all(1)
        if bad.any():
            raise ValueError(f"{desc}: vector {int(rows[bad.nonzero()[0]])} is not finite (NaN or inf); "
                             "recompute the activations in float32")
    norm_mean = mean_rows(x, train_idx, device)
    # Per-vector variance of the train split: batch loss = sum err / (B * var) is the batch's share of the
    # train-split FVU, so the loss is defined for any batch (a last batch of 1 has no variance of its own).
    var_per_vector = _total_variance(x, train_idx, norm_mean, device) / len(train_idx)
    val_var = _total_variance(x, val_idx, norm_mean, device)  # the validation FVU's denominator, every epoch
    S = len(specs)
    for sp in specs:
        if not 1 <= sp.k <= sp.n_latents:
            raise ValueError(f"{sp.name}: need 1 <= k <= n_latents")

    if cfg.init not in INITS:
        raise ValueError(f"GridConfig.init={cfg.init!r}: choose one of {', '.join(INITS)}")
    x_init = None
    if cfg.init != "random":  # one seeded subsample per layer, shared by every SAE (grid == one at a time)
        sub = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.data_seed))]
        x_init = normalise(read_rows(x, sub[:20_000].sort().values, "cpu"), norm_mean.cpu())
    # an SAE's init depends on (n_latents, seed) only, not on k: SAEs that differ in k alone share one k-means run
    # (the data init is 10 k-means restarts per SAE: minutes for a grid at d 1536 on a CPU, hence the bar)
    inits = init_params_many(d_in, [(sp.n_latents, sp.seed) for sp in specs], x_init, cfg.init, device,
                             progress=cfg.progress and cfg.init != "random", desc=f"{desc}: init ({cfg.init})")
    stack = _Stack.build(
        [inits[sp.n_latents, sp.seed] for sp in specs],
        [sp.k for sp in specs],
        [lr_for(sp.n_latents, cfg.base_lr, cfg.lr_ref_latents) for sp in specs],
        device,
    )  # plain tensors: loss_and_grads writes the gradients out, no autograd graph
    adam = _Adam(stack.params(), cfg.betas, cfg.adam_eps)
    lrs = stack.lrs()
    active = torch.arange(S)  # position in the stack -> index into specs

    best_val = [math.inf] * S
    best_params: list[dict[str, Tensor]] = [stack.unstack(s) for s in range(S)]
    stats = [{"epochs": 0, "best_epoch": 0, "stopped_early": False} for _ in range(S)]
    histories: list[dict[str, list[float]]] = [{"train_fvu": [], "val_fvu": []} for _ in range(S)]
    bad_epochs = [0] * S
    shuffle_gen = torch.Generator().manual_seed(cfg.data_seed + 1)

    bar = tqdm(range(cfg.max_epochs), desc=desc, disable=not cfg.progress, leave=False)
    for epoch in bar:
        perm = train_idx[torch.randperm(len(train_idx), generator=shuffle_gen)]
        if isinstance(x, Tensor):  # the epoch's batch indices go to the data's device once, not once a step (a
            perm = perm.to(x.device)  # blocking copy to a GPU waits for its queue)
        train_sum, n_batches = torch.zeros(len(active), device=device), 0
        for batch in _chunks(perm, cfg.batch_size):
            x_n = normalise(read_rows(x, batch, device), norm_mean)  # [B, d]
            scale = 1.0 / (len(batch) * var_per_vector)
            # the sum over SAEs: parameters are disjoint, so each SAE gets the gradient of its own FVU
            err, grads = stack.loss_and_grads(x_n, scale)
            fvu = err.sum(1) * scale  # [S]
            adam.step(stack.params(), grads, lrs)
            with torch.no_grad():
                stack.W_dec /= stack.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            train_sum += fvu.detach()
            n_batches += 1

        val = _stack_fvu(stack, x, val_idx, norm_mean, cfg, val_var).tolist()
        train_mean = (train_sum / n_batches).tolist()
        stop = []
        for pos, s in enumerate(active.tolist()):
            histories[s]["train_fvu"].append(train_mean[pos])
            histories[s]["val_fvu"].append(val[pos])
            stats[s]["epochs"] = epoch + 1
            if val[pos] < best_val[s] - cfg.min_delta:
                best_val[s], bad_epochs[s] = val[pos], 0
                best_params[s] = stack.unstack(pos)
                stats[s]["best_epoch"] = epoch + 1
            else:
                bad_epochs[s] += 1
                if bad_epochs[s] >= cfg.patience:
                    stats[s]["stopped_early"] = True
                    stop.append(pos)
        bar.set_postfix(active=len(active) - len(stop), best_val_fvu=f"{min(best_val):.4f}")
        if stop:  # drop stopped SAEs from the stack: they keep their best params and cost nothing more
            keep = torch.tensor([p for p in range(len(active)) if p not in stop], dtype=torch.long)
            if len(keep) == 0:
                break
            active = active[keep]
            adam.select(stack.keep_rows(keep))
            stack = stack.select(keep)
            lrs = stack.lrs()
    bar.close()
    return best_params, norm_mean.cpu(), stats, histories


@torch.no_grad()
def sae_metrics(sae: TopKSAE, x: Tensor, labels: Sequence[Any] | None = None) -> dict[str, Any]:
    """Metrics of one SAE on RAW vectors `x` (in practice the validation split).

    - `fvu`; `l0`: measured mean number of non-zero codes (k, unless a kept value is exactly 0).
    - `dead_latents`: latents never among the top k; `cluster_sizes` / `cluster_freq` / `n_empty`: of the argmax
      assignment (a latent that is active but never the argmax is an empty cluster, not a dead latent).
    - with labels: `nmi`, `best_f1` per label, `min_f1`, `mean_f1` (see cluster_metrics.label_metrics).
    """
    x_n = sae.normalise(x)
    z = sae.encode_normalised(x_n)
    x_hat = sae.decode(z)
    active = (z != 0).any(0)
    out = {
        "fvu": float((x_hat - x_n).pow(2).sum() / (x_n - x_n.mean(0)).pow(2).sum()),
        "l0": float((z != 0).float().sum(-1).mean()),
        "dead_latents": int((~active).sum()),
        "active_freq": (z != 0).float().mean(0).tolist(),  # share of vectors with the latent in their top k
    }
    assign = sae.pre_acts(x_n).argmax(-1).cpu().numpy()
    out.update(assignment_metrics(assign, sae.n_latents, labels))
    return out


def train_grid(
    data: Mapping[int, Data],
    cfg: GridConfig | None = None,
    specs: Sequence[SAESpec] | None = None,
    labels: Sequence[Any] | None = None,
) -> list[TrainedSAE]:
    """Train a grid of SAEs: one stack per layer, every (n_latents, k, seed) of `cfg` (or the given `specs`).

    data: layer -> sentence vectors `[n, d_in]` (same rows, in the same order, for every layer); tensors of any
      float dtype or numpy arrays / memmaps (read one batch at a time). labels: optional `[n]` ground truth
      (e.g. planted behaviors); label metrics are computed on the validation split.
    Returns one TrainedSAE per spec, in spec order. metrics: train_fvu / val_fvu (exact, best params), epochs,
    best_epoch, stopped_early, lr, and `sae_metrics` on the validation split.
    """
    cfg = cfg or GridConfig()
    specs = list(specs) if specs is not None else cfg.specs(sorted(data))
    ns = {len(x) for x in data.values()}
    if len(ns) != 1:
        raise ValueError(f"all layers must hold the same rows; got row counts {sorted(ns)}")
    n = ns.pop()
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries for {n} vectors")
    train_idx, val_idx = split_indices(n, cfg.val_frac, cfg.data_seed)

    results: dict[SAESpec, TrainedSAE] = {}
    for layer in sorted({sp.layer for sp in specs}):
        if layer not in data:
            raise KeyError(f"no vectors for layer {layer}; have layers {sorted(data)}")
        layer_specs = [sp for sp in specs if sp.layer == layer]
        x = data[layer]
        params, norm_mean, stats, hists = _train_layer(x, layer_specs, cfg, train_idx, val_idx, f"layer {layer}")
        saes = [
            TopKSAE(x.shape[1], sp.n_latents, sp.k).load_params(p, norm_mean) for sp, p in zip(layer_specs, params)
        ]
        # exact FVUs of the best parameters, through the stack (one pass per split for the whole layer)
        best = _Stack.build(params, [sp.k for sp in layer_specs], [0.0] * len(params), cfg.device)
        train_fvu = _stack_fvu(best, x, train_idx, norm_mean.to(cfg.device), cfg).tolist()
        val_fvu = _stack_fvu(best, x, val_idx, norm_mean.to(cfg.device), cfg).tolist()
        x_val = read_rows(x, val_idx, cfg.device)
        y_val = None if labels is None else np.asarray(labels)[val_idx.numpy()]
        for i, (sp, sae) in enumerate(zip(layer_specs, saes)):
            m = {
                "train_fvu": train_fvu[i],
                "val_fvu": val_fvu[i],
                "lr": lr_for(sp.n_latents, cfg.base_lr, cfg.lr_ref_latents),
                **stats[i],
                "val": sae_metrics(sae.to(cfg.device), x_val, y_val),
            }
            sae.cpu()
            results[sp] = TrainedSAE(sp, sae, m, hists[i])
    return [results[sp] for sp in specs]


def train_sae(
    x: Data,
    n_latents: int,
    k: int = 3,
    seed: int = 0,
    cfg: GridConfig | None = None,
    layer: int = 0,
    labels: Sequence[Any] | None = None,
) -> TrainedSAE:
    """One SAE alone: the grid with a single spec (identical arithmetic, same init and batches)."""
    return train_grid({layer: x}, cfg, [SAESpec(layer, n_latents, k, seed)], labels)[0]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: sae-lens format + our metadata


def _sae_lens_version() -> str:
    try:
        return importlib_metadata.version("sae-lens")
    except importlib_metadata.PackageNotFoundError:
        return "6.54.12"  # any version >= 6.0 makes sae-lens read cfg.json as the v6 format


def save_sae(
    directory: str | os.PathLike,
    sae: TopKSAE,
    *,
    layer: int | None = None,
    model_name: str | None = None,
    hook: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `directory` with:

    - `cfg.json` + `sae_weights.safetensors` (W_enc, b_enc, W_dec, b_dec; float32): a sae-lens v6 "topk" SAE
      (`normalize_activations="none"`, `apply_b_dec_to_input=True`, `rescale_acts_by_decoder_norm=False`) that
      `sae_lens.SAE.load_from_disk(directory)` loads. Its metadata holds model_name, hook_name and a note
      on our normalisation.
    - `sae_reasoning.safetensors` (norm_mean) + `sae_reasoning.json` (k, sizes, layer, hook, model, metrics, extra).

    Written to a temporary sibling and renamed, so a crash never leaves a complete-looking half checkpoint.
    """
    directory = Path(directory)
    hook = hook or (hook_name(layer) if layer is not None else None)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cfg = {
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": _sae_lens_version(),
            "sae_lens_training_version": _sae_lens_version(),
            "model_name": model_name,
            "hook_name": hook,
            "sae_reasoning_normalisation": NORMALISATION_DOC,
        },
        "k": sae.k,
        "rescale_acts_by_decoder_norm": False,
        "architecture": "topk",
    }
    (tmp / SAE_LENS_CFG).write_text(json.dumps(cfg, indent=2))
    weights = {n: getattr(sae, n).detach().float().cpu().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    save_file(weights, tmp / SAE_LENS_WEIGHTS)
    save_file({"norm_mean": sae.norm_mean.detach().float().cpu().contiguous()}, tmp / OUR_TENSORS)
    meta = {
        "d_in": sae.d_in,
        "n_latents": sae.n_latents,
        "k": sae.k,
        "layer": layer,
        "hook_name": hook,
        "model_name": model_name,
        "normalisation": NORMALISATION_DOC,
        "metrics": dict(metrics or {}),
        **dict(extra or {}),
    }
    (tmp / OUR_META).write_text(json.dumps(meta, indent=2, default=_json_default))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (np.ndarray, Tensor)):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / OUR_META
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: {directory} is not a checkpoint written by sae_reasoning.save_sae")
    return json.loads(path.read_text())


def load_sae(directory: str | os.PathLike) -> TopKSAE:
    """Our SAE (with its normalisation) from a `save_sae` directory."""
    directory = Path(directory)
    meta = read_metadata(directory)
    sae = TopKSAE(meta["d_in"], meta["n_latents"], meta["k"])
    weights = load_file(directory / SAE_LENS_WEIGHTS)
    return sae.load_params(weights, load_file(directory / OUR_TENSORS)["norm_mean"])


def load_sae_lens(directory: str | os.PathLike, signed: bool = True):
    """The checkpoint as a `sae_lens` SAE (loaded by `SAE.load_from_disk`).

    sae-lens' "topk" applies ReLU to the kept values and has no per-vector normalisation. What matches:
    - always: `sae_lens_sae.encode(normalise(x, norm_mean))` selects the same top-k latents as our
      `encode(x)` and equals it wherever our value is > 0 (ours <= 0 become 0 in sae-lens); argmax agrees
      wherever our largest kept value is > 0.
    - with `signed=True` (default) the ReLU-free `SignedTopK` is swapped in as `activation_fn`, and encode and
      decode equal ours exactly on normalised inputs.
    Either way the caller must normalise first: no sae-lens option can express (x - mean) / ||x - mean||
    (`constant_norm_rescale` scales by sqrt(d_in)/||x|| without centring, `layer_norm` centres over features).
    """
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(directory))
    if signed:
        sae.activation_fn = SignedTopK(sae.cfg.k)
    return sae


def norm_mean_of(directory: str | os.PathLike) -> Tensor:
    """norm_mean `[d_in]` of a checkpoint, for sae-lens users: x_n = normalise(x, norm_mean_of(dir))."""
    return load_file(Path(directory) / OUR_TENSORS)["norm_mean"]
