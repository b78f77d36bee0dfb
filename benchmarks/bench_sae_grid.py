"""SAE grid: the paper's grid (10 sizes 5..50 x layers, k = 3) as ONE `train_grid` job against looping sae-lens'
`SAETrainer` over the same SAEs, same data, same batches, same epochs; final validation FVUs side by side.

    python benchmarks/bench_sae_grid.py [--device cuda] [--quick] [--data auto|organism|synthetic] [--epochs N]

Fairness:
- Fixed epoch count for both (our early stopping is switched off: patience > epochs), same batch size (512), same
  train/val split, same batch order (our `split_indices` + the grid's shuffle generator, replayed for sae-lens),
  same per-size learning rate (`lr_for`, constant: sae-lens `lr_end = lr`), same initial parameters (our
  `init_params`, copied into each sae-lens SAE; with the data init, from the same seeded subsample of the same
  normalised training vectors, computed inside both timed regions and also reported apart), Adam with the same
  betas. The loop inits one SAE at a time, as a loop of trainers would; our job, off the CPU, runs the k-means of
  a layer's SAEs as one batch (`init_params_many`, the same centres), part of what one job saves.
- Same model: sae-lens `TopKTrainingSAE` (k = 3, `apply_b_dec_to_input`, `rescale_acts_by_decoder_norm=True`,
  i.e. a unit-norm decoder, as ours) with our signed top-k as activation (`--sae-lens-activation relu` keeps
  sae-lens' ReLU top-k). What stays sae-lens': its MSE loss (= our FVU loss x a constant), grad-norm clipping at 1,
  the TopK auxiliary loss on dead latents, its dead-latent bookkeeping.
- sae-lens is fed the vectors already normalised (centred by the train mean, unit norm) and pays nothing for it;
  our grid normalises every batch itself and also computes the validation FVU of every SAE after every epoch
  (it needs it for early stopping), inside the timed region.
- FVU of both on the same validation vectors: sum ||x_n - x_hat||^2 / sum ||x_n - mean(x_n)||^2. Ours is reported
  at the final epoch (`history`) and at its best epoch (what `train_grid` returns).
Target: grid >= 5x looped sae-lens, with |FVU ours - FVU sae-lens| <= 0.01 for every SAE.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

TARGET = 5.0
FVU_TOL = 0.01
BATCH = 512


# ---------------------------------------------------------------------------------------------------- data


def synthetic(n: int, d: int, n_layers: int, device: torch.device, seed: int = 0) -> dict[int, torch.Tensor]:
    """Sentence-vector-like data per layer: a large shared offset (residual streams have one), 12 clusters
    ("behaviors") of different weights and spreads, a low-rank shared component and isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    data = {}
    for layer in range(n_layers):
        offset = torch.randn(d, generator=g) * 4
        centers = torch.randn(12, d, generator=g) * 2
        weights = torch.rand(12, generator=g) + 0.2
        labels = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=g)
        spread = (torch.rand(12, generator=g) + 0.5)[labels, None]
        low_rank = torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=g) * 0.5
        x = offset + centers[labels] + low_rank + torch.randn(n, d, generator=g) * spread
        data[layer] = x.to(device)
    return data


def organism_data(n_min: int, device: torch.device) -> tuple[dict[int, torch.Tensor], dict]:
    """Real sentence activations of the organism's thinking model at all of its layers (~n_min sentences)."""
    import tempfile

    from sae_reasoning.activations import ActivationStore, extract_activations
    from sae_reasoning.models import load_model

    lm = load_model(str(C.organism_dirs()[0]), dtype="float32", device="cpu")
    traces = C.organism_traces(n_min // 6, seed=1)  # ~8 sentences per organism trace
    layers = list(range(lm.n_layers))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = ActivationStore(extract_activations(lm, traces, layers, tmp, batch_size=16, progress=False))
        data = {layer: store.load(layer).to(device) for layer in layers}
        took = time.perf_counter() - t0
    return data, {"source": "organism thinking model, sentence means of corpus traces (extract_activations)",
                  "n_traces": len(traces), "extraction_s": took}


# ---------------------------------------------------------------------------------------------------- sae-lens


def batch_order(train_idx: torch.Tensor, epochs: int, data_seed: int) -> list[torch.Tensor]:
    """The batches `train_grid` sees (its shuffle generator is seeded with data_seed + 1), epoch after epoch."""
    gen = torch.Generator().manual_seed(data_seed + 1)
    out = []
    for _ in range(epochs):
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        out.extend(perm[i: i + BATCH] for i in range(0, len(perm), BATCH))
    return out


def sae_lens_one(x_n: torch.Tensor, batches: list[torch.Tensor], d_in: int, n_latents: int, k: int,
                 params: dict[str, torch.Tensor], device: torch.device, activation: str):
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    from sae_reasoning.sae import SignedTopK, lr_for

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=n_latents, k=k, device=str(device),
                                                dtype="float32", apply_b_dec_to_input=True,
                                                normalize_activations="none", rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        for name, tensor in params.items():
            getattr(sae, name).copy_(tensor.to(device))
    if activation == "signed":
        sae.activation_fn = SignedTopK(k)
    lr = lr_for(n_latents)
    n_samples = sum(len(b) for b in batches)
    cfg = SAETrainerConfig(total_training_samples=n_samples, train_batch_size_samples=BATCH, lr=lr, lr_end=lr,
                           lr_scheduler_name="constant", adam_beta1=0.9, adam_beta2=0.999, device=str(device))
    provider = (x_n[b] for b in batches)
    return SAETrainer(cfg=cfg, sae=sae, data_provider=provider).fit()


@torch.no_grad()
def sae_lens_fvu(sae, v: torch.Tensor) -> float:
    sae.eval()
    x_hat = sae.decode(sae.encode(v))
    return float((x_hat - v).pow(2).sum() / (v - v.mean(0)).pow(2).sum())


def run_sae_lens(data, sizes, k, epochs, device, activation, split, init: str,
                 data_seed=0) -> tuple[dict, dict, float]:
    """Loop sae-lens over the grid. Each SAE starts from our `init_params` (the data init uses the same seeded
    subsample of the same normalised training vectors as `train_grid`), computed inside the timed loop, as ours is."""
    from sae_reasoning.sae import init_params, mean_rows, normalise, read_rows

    train_idx, val_idx = split
    fvus, per_layer_s, init_s = {}, {}, 0.0
    for layer, x in data.items():
        t0 = time.perf_counter()
        norm_mean = mean_rows(x, train_idx, x.device)
        x_n = normalise(x, norm_mean)
        x_init = None
        if init == "data":
            sub = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(data_seed))]
            x_init = normalise(read_rows(x, sub[:20_000].sort().values, "cpu"), norm_mean.cpu())
        batches = [b.to(x.device) for b in batch_order(train_idx, epochs, data_seed)]
        v = x_n[val_idx.to(x.device)]
        for n in sizes:
            t1 = time.perf_counter()
            params = init_params(x.shape[1], n, 0, x_init, device=device)  # the same init, on the same device
            init_s += time.perf_counter() - t1
            sae = sae_lens_one(x_n, batches, x.shape[1], n, k, params, device, activation)
            fvus[(layer, n)] = sae_lens_fvu(sae, v)
        C.sync(device)
        per_layer_s[layer] = time.perf_counter() - t0
    return fvus, per_layer_s, init_s


def grid_config(sizes, k, epochs, device, init: str):
    from sae_reasoning.sae import GridConfig

    kw = {"init": init} if "init" in GridConfig.__dataclass_fields__ else {}
    return GridConfig(n_latents=tuple(sizes), ks=(k,), seeds=(0,), batch_size=BATCH, max_epochs=epochs,
                      patience=epochs + 1, device=str(device), progress=False, **kw)


def run_ours(data, sizes, k, epochs, device, init: str) -> tuple[dict, float]:
    """One train_grid job. Also returns the seconds spent in its init inside it (`init_params_many`, or
    `init_params` in older code; timed by a wrapper)."""
    import sae_reasoning.sae as sae_mod

    spent = [0.0]
    name = "init_params_many" if hasattr(sae_mod, "init_params_many") else "init_params"
    original = getattr(sae_mod, name)

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - t0

    setattr(sae_mod, name, timed)
    try:
        trained = sae_mod.train_grid(data, grid_config(sizes, k, epochs, device, init))
    finally:
        setattr(sae_mod, name, original)
    return {(t.spec.layer, t.spec.n_latents): {"final": t.history["val_fvu"][-1], "best": t.metrics["val_fvu"],
                                                "epochs": t.metrics["epochs"]} for t in trained}, spent[0]


def main() -> None:
    p = C.base_parser(__doc__.split("\n")[0])
    p.add_argument("--data", choices=["auto", "organism", "synthetic"], default="auto",
                   help="auto: the organism's activations (its 4 layers) on CPU when its weights exist, else "
                        "synthetic with the paper's 6 layers")
    p.add_argument("--n-vectors", type=int, default=None)
    p.add_argument("--d-in", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="synthetic: number of layers (paper: 6)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--sizes", default=None, help="comma-separated n_latents (paper: 5,10,...,50)")
    p.add_argument("--sae-lens-activation", choices=["signed", "relu"], default="signed")
    p.add_argument("--init", choices=["data", "random"], default=None,
                   help="SAE initialisation for both (default: GridConfig's default, the pipeline's)")
    args = p.parse_args()
    device = C.setup(args)
    from sae_reasoning.sae import split_indices

    cuda = device.type == "cuda"
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [5, 25, 50] if args.quick else list(range(5, 55, 5)))
    epochs = args.epochs or (2 if args.quick else (5 if cuda else 50))
    repeats = args.repeats or 1
    k = 3
    use_organism = args.data == "organism" or (args.data == "auto" and not cuda and C.organism_available()
                                               and not args.quick)
    if use_organism:
        data, data_info = organism_data(args.n_vectors or 12_000, device)
    else:
        n = args.n_vectors or (2_000 if args.quick else (100_000 if cuda else 12_000))
        d = args.d_in or (1536 if cuda else 128)
        n_layers = args.layers or (2 if args.quick else 6)
        data = synthetic(n, d, n_layers, device)
        data_info = {"source": "synthetic clustered vectors (12 clusters + shared offset + low-rank + noise)",
                     "note": "organism weights missing or not requested" if not cuda else
                             "paper-like width (Qwen-1.5B d_model 1536)"}
    n, d = next(iter(data.values())).shape
    data_info.update(n_vectors=n, d_in=d, layers=sorted(data), dtype="float32")
    split = split_indices(n, 0.1, 0)
    from sae_reasoning.sae import GridConfig

    init = args.init or getattr(GridConfig(), "init", "random")
    n_sae = len(data) * len(sizes)
    steps_per_epoch = math.ceil(len(split[0]) / BATCH)
    C.log(f"sae grid: {n_sae} SAEs ({len(data)} layers x sizes {sizes}), {n} x {d} vectors, {epochs} epochs "
          f"({steps_per_epoch} steps each), {repeats} repeat(s)")

    # untimed warm-up of both (imports, allocator, first-call costs): one layer, the sizes, one epoch
    first = {layer: data[layer] for layer in list(data)[:1]}
    run_ours(first, sizes, k, 1, device, "random")
    run_sae_lens(first, sizes, k, 1, device, args.sae_lens_activation, split, "random")
    times = {"ours_grid_one_job": [], "sae_lens_loop": []}
    init_times = {"ours_grid_one_job": [], "sae_lens_loop": []}
    ours = lens = None
    lens_layers: dict = {}
    for r in range(repeats):  # interleaved: ours, sae-lens, ours, sae-lens...
        with C.timer(times["ours_grid_one_job"], device):
            ours, ours_init = run_ours(data, sizes, k, epochs, device, init)
        with C.timer(times["sae_lens_loop"], device):
            lens, lens_layers, lens_init = run_sae_lens(data, sizes, k, epochs, device, args.sae_lens_activation,
                                                        split, init)
        init_times["ours_grid_one_job"].append(ours_init)
        init_times["sae_lens_loop"].append(lens_init)
        C.log(f"  round {r + 1}/{repeats}: ours {times['ours_grid_one_job'][-1]:.1f}s, "
              f"sae-lens {times['sae_lens_loop'][-1]:.1f}s")
    med = {key: C.median(v) for key, v in times.items()}
    ratio = med["sae_lens_loop"] / med["ours_grid_one_job"]
    train_only = {key: C.median(t - i for t, i in zip(times[key], init_times[key])) for key in times}
    rows = []
    for (layer, size), o in sorted(ours.items()):
        rows.append({"layer": layer, "n_latents": size, "ours_final": round(o["final"], 5),
                     "ours_best": round(o["best"], 5), "sae_lens": round(lens[(layer, size)], 5),
                     "diff_final": round(o["final"] - lens[(layer, size)], 5)})
    max_diff = max(abs(r["diff_final"]) for r in rows)
    mean_diff = sum(r["diff_final"] for r in rows) / len(rows)
    fvu_equal = max_diff <= FVU_TOL
    steps = n_sae * epochs * steps_per_epoch
    result = C.header("sae_grid", args, device)
    result.update({
        "data": data_info,
        "setup": {"sizes": sizes, "k": k, "n_saes": n_sae, "epochs": epochs, "early_stopping": False,
                  "batch_size": BATCH, "steps_per_epoch": steps_per_epoch, "val_frac": 0.1,
                  "lr": "lr_for(n) = 2e-4 / sqrt(n / 2**14), constant", "sae_lens_activation":
                  args.sae_lens_activation, "repeats": repeats,
                  "init": f"{init} (our init_params for both; its time is inside both timings, also reported "
                          "apart: init_seconds, ratio_excluding_init)",
                  "timing": "one train_grid call over all layers vs a Python loop of SAETrainer.fit(), "
                            "interleaved per repeat; medians"},
        "seconds": {key: {"median": med[key], "all": v} for key, v in times.items()},
        "sae_lens_seconds_per_layer": lens_layers,
        "per_sae_step_ms": {"ours": 1e3 * med["ours_grid_one_job"] / steps,
                            "sae_lens": 1e3 * med["sae_lens_loop"] / steps},
        "ratio_sae_lens_over_ours": ratio,
        "init_seconds": {key: C.median(v) for key, v in init_times.items()},
        "ratio_excluding_init": train_only["sae_lens_loop"] / train_only["ours_grid_one_job"],
        "fvu": {"rows": rows, "max_abs_diff_final": max_diff, "mean_diff_final (ours - sae-lens)": mean_diff,
                "tolerance": FVU_TOL, "equal": fvu_equal},
        "target": {"what": f"grid >= {TARGET}x looped sae-lens at equal FVU (+-{FVU_TOL})", "ratio": ratio,
                   "met": ratio >= TARGET and fvu_equal},
    })
    if ratio < TARGET and not args.no_profile:
        from sae_reasoning.sae import train_grid

        small = {layer: data[layer] for layer in list(data)[:1]}
        prof_epochs = min(epochs, 5)
        cfg = grid_config(sizes, k, prof_epochs, device, init)
        result["profile"] = {"what": f"ours, one layer, {prof_epochs} epochs (the end-of-training metrics pass "
                                     "weighs more here than in the full run)",
                             "torch_ops": C.torch_profile_top(lambda: train_grid(small, cfg), device),
                             "python": C.profile_top(lambda: train_grid(small, cfg), 20)}
    C.emit(result, args)


if __name__ == "__main__":
    main()
