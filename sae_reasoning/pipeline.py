"""The stages behind train.py, steer.py and eval.py. Each reads its inputs from files and writes a run folder.

Expensive intermediate results (traces, sentence activations) live in `cfg.cache_dir`, keyed by a fingerprint of
everything they depend on, so another run or a multirun job with the same model, data and layers reuses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_reasoning import tracking
from sae_reasoning.activations import ActivationStore, extract_activations
from sae_reasoning.artifacts import fingerprint, folder_fingerprint
from sae_reasoning.config import resolve_path
from sae_reasoning.data import load_questions
from sae_reasoning.errors import UserError
from sae_reasoning.models import LoadedModel, load_model
from sae_reasoning.traces import generate_traces, iter_traces


def model_fingerprint(spec: Any) -> dict:
    local = resolve_path(spec.path)
    if local is not None:
        return {"path": str(local), "files": folder_fingerprint(local)}
    return {"hub_id": spec.path, "revision": spec.revision}


def traces_key(cfg: Any) -> dict:
    d = cfg.data
    return {"model": model_fingerprint(cfg.model.thinking), "dtype": cfg.model.dtype,
            "data": {k: d[k] for k in ("name", "source", "split", "limit", "seed")},
            "generation": {k: d[k] for k in ("max_new_tokens", "temperature", "top_p", "batch_size", "backend")}}


def activations_key(cfg: Any) -> dict:
    d = cfg.data
    return {"traces": fingerprint(traces_key(cfg)), "layers": sorted(cfg.model.sae_layers),
            "min_words": d.min_words, "dtype": d.activation_dtype}


def label_function(cfg: Any):
    """The ground-truth labeller of sentences, for data with planted behaviors (the organism)."""
    if cfg.data.name == "organism":
        from sae_reasoning.organism.corpus import label_sentence

        return label_sentence
    return None


def load_thinking(cfg: Any) -> LoadedModel:
    spec = cfg.model.thinking
    lm = load_model(spec.path, revision=spec.revision, dtype=cfg.model.dtype, device=cfg.model.device,
                    field="model.thinking.path", trust_remote_code=cfg.model.trust_remote_code)
    if lm.n_layers != cfg.model.n_layers:
        raise UserError(f"model.thinking: {spec.path} has {lm.n_layers} layers but model.n_layers={cfg.model.n_layers}; "
                        "fix model.n_layers")
    return lm


def sentence_activations(cfg: Any, tracker: tracking.Tracker | None = None) -> ActivationStore:
    """Traces -> sentences -> activations, each step cached by fingerprint (METHOD.md steps 1-3)."""
    cache = Path(cfg.cache_dir)
    t_fp, a_fp = fingerprint(traces_key(cfg)), fingerprint(activations_key(cfg))
    traces_dir, acts_dir = cache / "traces" / t_fp, cache / "activations" / a_fp
    lm = None
    if not (acts_dir / "meta.json").exists():
        lm = load_thinking(cfg)
        if not (traces_dir / "meta.json").exists():
            questions = load_questions(cfg.data)
            if cfg.data.backend == "vllm":
                from sae_reasoning.traces_vllm import generate_traces_vllm

                generate_traces_vllm(cfg, lm, questions, traces_dir, fingerprint=t_fp)
            else:
                generate_traces(lm, questions, traces_dir, batch_size=cfg.data.batch_size,
                                max_new_tokens=cfg.data.max_new_tokens, temperature=cfg.data.temperature,
                                top_p=cfg.data.top_p, seed=cfg.data.seed, progress=cfg.progress, fingerprint=t_fp)
        traces = list(iter_traces(traces_dir))
        extract_activations(lm, traces, cfg.model.sae_layers, acts_dir, batch_size=cfg.data.activation_batch_size,
                            min_words=cfg.data.min_words, dtype=cfg.data.activation_dtype,
                            label_fn=label_function(cfg), progress=cfg.progress, fingerprint=a_fp)
    store = ActivationStore(acts_dir)
    meta = store.meta
    counts = {"data/n_traces": meta["n_traces"], "data/n_sentences": meta["n_sentences"],
              "data/sentences_per_trace": meta["n_sentences"] / max(meta["n_traces"], 1)}
    if meta.get("n_labelled") is not None:
        counts["data/labelled_fraction"] = meta["n_labelled"] / meta["n_sentences"]
    print(f"activations: {meta['n_sentences']} sentences from {meta['n_traces']} traces at layers {meta['layers']} "
          f"({acts_dir})")
    if tracker is not None:
        tracker.summary(counts)
    return store


def train(cfg: Any, run_dir: Path) -> None:
    tracker = tracking.start(cfg, run_dir, "train")
    try:
        store = sentence_activations(cfg, tracker)
        from sae_reasoning.interpret_stage import interpret_grid
        from sae_reasoning.train_sae import train_grid_stage

        records = train_grid_stage(cfg, store, run_dir, tracker)
        interpret_grid(cfg, store, records, run_dir, tracker)
    finally:
        tracker.finish()


def steer(cfg: Any, run_dir: Path) -> None:
    raise UserError("steer.py: steering-vector training is not implemented yet (issue 7)")


def evaluate(cfg: Any, run_dir: Path) -> None:
    raise UserError("eval.py: evaluation is not implemented yet (issue 9)")
