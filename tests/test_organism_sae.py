"""Issue #5's planted-behavior target on the real organism: SAEs trained on the thinking model's sentence
activations recover the five planted behaviors (NMI >= 0.8, every behavior has a latent with F1 >= 0.85)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sae_reasoning.activations import ActivationStore, extract_activations
from sae_reasoning.models import load_model
from sae_reasoning.organism.corpus import BEHAVIORS, chat_prompt, label_sentence, thinking_response
from sae_reasoning.organism.task import make_splits
from sae_reasoning.sae import GridConfig, train_grid

REPO = Path(__file__).resolve().parents[1]
ORGANISM = REPO / "sae_reasoning" / "organism" / "weights" / "thinking"


@pytest.fixture(scope="module")
def organism_layer1(tmp_path_factory):
    """Layer-1 sentence means of 400 organism training traces (the traces the thinking model was trained to write;
    its greedy traces equal them on ~89% of problems) with their planted labels."""
    lm = load_model(str(ORGANISM), dtype="float32", device="cpu")
    problems = make_splits(seed=0, n_train=400, n_val=0, n_test=0)["train"]
    traces = [{"id": p.id, "prompt": chat_prompt(p.question), "completion": thinking_response(p)} for p in problems]
    folder = extract_activations(lm, traces, [1], tmp_path_factory.mktemp("acts"), batch_size=32,
                                 label_fn=label_sentence, progress=False)
    store = ActivationStore(folder)
    return store.load(1), store.labels()


def test_grid_recovers_every_planted_behavior(organism_layer1):
    x, labels = organism_layer1
    assert set(labels) == set(BEHAVIORS)
    cfg = GridConfig(n_latents=(5,), ks=(1, 3), seeds=(0, 1, 2), max_epochs=100, patience=5, progress=False)
    results = train_grid({1: x}, cfg, labels=labels)
    for r in results:
        v = r.metrics["val"]
        print(f"{r.spec.name}: val_fvu={r.metrics['val_fvu']:.4f} nmi={v['nmi']:.3f} "
              f"f1={ {b: round(f, 2) for b, f in v['best_f1'].items()} }")
    best = max(results, key=lambda r: r.metrics["val"]["nmi"])
    assert best.metrics["val"]["nmi"] >= 0.8
    assert min(best.metrics["val"]["best_f1"].values()) >= 0.85, best.metrics["val"]["best_f1"]
    # Found without labels too: among the seeds of the k = 1 SAE, the lowest validation FVU is such an SAE.
    k1 = [r for r in results if r.spec.k == 1]
    label_free = min(k1, key=lambda r: r.metrics["val_fvu"])
    assert min(label_free.metrics["val"]["best_f1"].values()) >= 0.85
    assert len(set(label_free.metrics["val"]["best_cluster"].values())) == 5  # five latents, no merges
