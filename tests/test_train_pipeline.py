"""train.py end to end on a real tiny model: traces -> activations -> SAE grid -> checkpoints, cache reuse, multirun."""

import json
import subprocess
import sys

import pytest
import torch

from sae_reasoning.activations import ActivationStore
from sae_reasoning.sae import load_sae

from conftest import REPO, SHARED_DATA
from helpers import stories_with_chat_template


@pytest.fixture(scope="module")
def setup(tmp_path_factory, stories_path):
    root = tmp_path_factory.mktemp("train")
    model = stories_with_chat_template(stories_path, root / "stories")
    args = [f"model.thinking.path={model}", f"model.base.path={model}", "model.n_layers=5", "model.sae_layers=[1,3]",
            "model.steering_layer=2", "data=gsm8k", f"data.source={SHARED_DATA / 'gsm8k' / 'test.jsonl'}",
            "data.limit=16", "data.max_new_tokens=64", "data.batch_size=8", "data.min_words=2", "sae.max_epochs=5",
            f"cache_dir={root / 'cache'}", "progress=false"]
    return root, args


def train(args, *extra, flags=()):
    proc = subprocess.run([sys.executable, "train.py", *flags, *args, *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_train_writes_a_grid_of_loadable_saes(setup):
    root, args = setup
    run = root / "run"
    train(args, "sae.n_latents=[3,4]", f"hydra.run.dir={run}")
    grid = json.loads((run / "grid.json").read_text())
    assert [(s["layer"], s["n_latents"], s["seed"]) for s in grid["saes"]] == [
        (layer, n, seed) for layer in (1, 3) for n in (3, 4) for seed in (0, 1)]  # default: two seeds per size
    store = ActivationStore(grid["activations"])
    for rec in grid["saes"]:
        ckpt = run / rec["checkpoint"]
        ours = load_sae(ckpt)
        x = store.load(rec["layer"])
        z = ours.encode(x)
        assert ((z != 0).sum(1) == 3).all()  # top-k: exactly k active latents per sentence
        from sae_lens import SAE

        lens = SAE.load_from_disk(str(ckpt))  # sae-lens reads our checkpoint
        assert lens.cfg.metadata.hook_name == f"blocks.{rec['layer']}.hook_resid_post"
        assert torch.allclose(lens.W_dec, ours.W_dec, atol=0)
    methods = {r["method"] for r in json.loads((run / "comparison.json").read_text())}
    assert {"sae_topk", "kmeans", "spherical_kmeans", "gmm", "pca_kmeans", "agglomerative"} <= methods
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "W&B offline run files missing"
    taxonomy = json.loads((run / "taxonomy.json").read_text())
    names = [s["name"] for s in grid["saes"]]
    assert taxonomy["chosen"] in names and len(taxonomy["results"]) == len(names)
    best = max(taxonomy["results"], key=lambda r: r["metrics"]["score"])
    assert best["name"] == taxonomy["chosen"]  # the documented score picks the taxonomy
    chosen = taxonomy["taxonomy"]
    assert sum(lat["count"] for lat in chosen["latents"]) > 0 and all(lat["title"] for lat in chosen["latents"]
                                                                        if lat["count"])


def test_multirun_reuses_the_activation_cache(setup):
    root, args = setup
    train(args, "sae.n_latents=3", f"hydra.run.dir={root / 'first'}")
    acts = list((root / "cache" / "activations").iterdir())
    stamp = {p: p.stat().st_mtime_ns for p in acts[0].rglob("*") if p.is_file()}
    proc = train(args, "sae.n_latents=3,4", f"hydra.sweep.dir={root / 'sweep'}", flags=["-m"])
    assert list((root / "cache" / "activations").iterdir()) == acts  # same fingerprint, one folder
    assert {p: p.stat().st_mtime_ns for p in acts[0].rglob("*") if p.is_file()} == stamp  # nothing recomputed
    sizes = sorted(json.loads(p.read_text())["grid"]["n_latents"][0] for p in (root / "sweep").glob("*/grid.json"))
    assert sizes == [3, 4], proc.stdout


def test_too_few_sentences_is_one_clear_line(setup):
    root, args = setup
    proc = subprocess.run([sys.executable, "train.py", *args, "sae.n_latents=[80]", f"hydra.run.dir={root / 'few'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "too few for SAEs of up to 80 latents" in proc.stderr
    assert not (root / "few" / "grid.json").exists()
