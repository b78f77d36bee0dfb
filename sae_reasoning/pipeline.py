"""The stages behind train.py, steer.py and eval.py. Each reads its inputs from files and writes a run folder.

Expensive intermediate results (traces, sentence activations) live in `cfg.cache_dir`, keyed by a fingerprint of
everything they depend on, so another run or a multirun job with the same model, data and layers reuses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_reasoning import tracking
from sae_reasoning.activations import FORMAT, ActivationStore, extract_activations
from sae_reasoning.artifacts import fingerprint, folder_fingerprint
from sae_reasoning.config import resolve_path
from sae_reasoning.data import load_questions
from sae_reasoning.errors import UserError
from sae_reasoning.models import LoadedModel, load_model, role_device
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
            "min_words": d.min_words, "dtype": d.activation_dtype, "format": FORMAT}


def label_function(cfg: Any):
    """The ground-truth labeller of sentences, for data with planted behaviors (the organism)."""
    if cfg.data.name == "organism":
        from sae_reasoning.organism.corpus import label_sentence

        return label_sentence
    return None


def load_thinking(cfg: Any, weights: bool = True) -> LoadedModel:
    """The thinking model of `cfg.model`, its depth checked against `model.n_layers` (`weights=False`: tokenizer and
    config only, `models.load_model`)."""
    spec = cfg.model.thinking
    lm = load_model(spec.path, revision=spec.revision, dtype=cfg.model.dtype,
                    device=role_device(cfg.model, "thinking"), field="model.thinking.path",
                    trust_remote_code=cfg.model.trust_remote_code, weights=weights)
    if lm.n_layers != cfg.model.n_layers:
        raise UserError(f"model.thinking: {spec.path} has {lm.n_layers} layers but "
                        f"model.n_layers={cfg.model.n_layers}; fix model.n_layers")
    return lm


def sentence_activations(cfg: Any, tracker: tracking.Tracker | None = None) -> ActivationStore:
    """Traces -> sentences -> activations, each step cached by fingerprint (METHOD.md steps 1-3)."""
    cache = Path(cfg.cache_dir)
    t_fp, a_fp = fingerprint(traces_key(cfg)), fingerprint(activations_key(cfg))
    traces_dir, acts_dir = cache / "traces" / t_fp, cache / "activations" / a_fp
    lm = None
    if not (acts_dir / "meta.json").exists():
        if cfg.data.backend == "vllm" and not (traces_dir / "meta.json").exists():
            from sae_reasoning.traces_vllm import generate_traces_vllm

            load_thinking(cfg, weights=False)  # a wrong path or depth fails now, not after the traces
            # first, in a child process that gives the GPU back when it ends; then the HF model for the activations
            generate_traces_vllm(cfg, load_questions(cfg.data), traces_dir, fingerprint=t_fp)
        lm = load_thinking(cfg)
        if not (traces_dir / "meta.json").exists():
            questions = load_questions(cfg.data)
            generate_traces(lm, questions, traces_dir, batch_size=cfg.data.batch_size,
                            max_new_tokens=cfg.data.max_new_tokens, temperature=cfg.data.temperature,
                            top_p=cfg.data.top_p, seed=cfg.data.seed, progress=cfg.progress, fingerprint=t_fp)
        traces = list(iter_traces(traces_dir))
        extract_activations(lm, traces, cfg.model.sae_layers, acts_dir, batch_size=cfg.data.activation_batch_size,
                            sort_window=cfg.data.activation_sort_window,
                            min_words=cfg.data.min_words, dtype=cfg.data.activation_dtype,
                            label_fn=label_function(cfg), progress=cfg.progress, fingerprint=a_fp)
    store = ActivationStore(acts_dir)
    store.traces_dir = traces_dir  # steer.py reads the traces behind the activations
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


def note_organism_data(cfg: Any, paper_data: str) -> None:
    """One line when a real model meets the default data (the organism's arithmetic problems): it runs, but it is
    not the paper's setting, and the config does not say so by itself."""
    if cfg.data.name == "organism" and cfg.model.name != "organism":
        print(f"note: data=organism (the default) with model={cfg.model.name}: the organism's arithmetic problems; "
              f"the paper uses {paper_data}", flush=True)


def train(cfg: Any, run_dir: Path) -> None:
    note_organism_data(cfg, "MMLU-Pro traces (data=mmlu_pro data.limit=12000)")
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
    """One steering vector per behavior of the chosen taxonomy (+ a bias vector), on the base model."""
    from sae_reasoning.hybrid_stage import chosen_taxonomy, load_chosen_sae, read_grid
    from sae_reasoning.models import load_pair
    from sae_reasoning.steering import train_steering

    if cfg.train_dir is None:
        raise UserError("steer.py needs train_dir=<a finished train.py run folder> (it reads taxonomy.json there)")
    train_dir = resolve_path(cfg.train_dir)
    taxonomy = chosen_taxonomy(train_dir)
    grid = read_grid(train_dir)
    sae = load_chosen_sae(train_dir, taxonomy)
    store = ActivationStore(grid["activations"])
    traces = list(iter_traces(grid["traces"]))
    thinking, base = load_pair(cfg.model)
    layer = cfg.steering.layer if cfg.steering.layer is not None else cfg.model.steering_layer
    # what the vectors depend on beyond train_steering's arguments: a rerun into this run folder reuses the vectors
    # an interrupted run finished only if all of it is unchanged
    resume_key = fingerprint({"base": model_fingerprint(cfg.model.base),
                              "thinking": model_fingerprint(cfg.model.thinking),
                              "dtype": cfg.model.dtype, "device": cfg.model.device,
                              **({"devices": [role_device(cfg.model, r) for r in ("thinking", "base")]}
                                 if cfg.model.thinking.device or cfg.model.base.device else {}),
                              "taxonomy": (train_dir / "taxonomy.json").read_text(),
                              "checkpoint": folder_fingerprint(train_dir / taxonomy["checkpoint"]),
                              "activations": grid.get("activations_fingerprint"), "data": cfg.data.name})
    tracker = tracking.start(cfg, run_dir, "steer")
    try:
        meta = train_steering(base, traces, store.index(), store.load(taxonomy["layer"]), sae, layer=layer,
                              out_dir=run_dir, model_id=cfg.model.base.path, cfg=cfg.steering,
                              titles=taxonomy["titles"], thinking=thinking,
                              sae_layer=taxonomy["layer"], min_examples=cfg.steering.min_examples,
                              n_hit_examples=cfg.steering.n_hit_examples,
                              seed=cfg.seed, tracker=tracker, progress=cfg.progress, label_fn=label_function(cfg),
                              extra_meta={"taxonomy": taxonomy["name"], "train_dir": str(train_dir)},
                              resume_key=resume_key)
    finally:
        tracker.finish()
    print_vectors(meta)


def print_vectors(meta: dict) -> None:
    """The steer.py table: one line per vector with its validation loss and causal hit rates."""
    print(f"\nsteering vectors at blocks.{meta['layer']}.hook_resid_post of {meta['model_id']}:")
    print(f"  {'vector':<10} {'title':<28} {'norm':>7} {'val loss before -> after':>25}   hit rate steered / "
          "unsteered / random: where due | elsewhere")

    def rates(h: dict) -> str:
        if not h:
            return "-"
        out = f"{h['steered']:.2f} / {h['unsteered']:.2f} / {h['random']:.2f} (n={h['n']})"
        t = h.get("true_rates")  # with ground-truth labels (the organism): the same rates without the SAE's errors
        return out + (f" [true {h['target_label']}: {t['steered']:.2f} / {t['unsteered']:.2f} / {t['random']:.2f}]"
                      if t else "")

    for key, v in meta["vectors"].items():
        h, he = v.get("hit_rates") or {}, v.get("hit_rates_elsewhere") or {}
        hit = "" if not h else f"   {rates(h)} | {rates(he)}"
        print(f"  {key:<10} {v['title'][:28]:<28} {v['norm']:7.2f} {v['val_loss_before']:12.4f} -> "
              f"{v['val_loss_after']:.4f}{hit}")
    for key, why in meta.get("skipped", {}).items():
        print(f"  {key:<10} skipped: {why}")


# Hybrid settings that change only how fast the same tokens come (hybrid.py tests each against one thinking forward
# per token): left out of the generations' key, so a run resumed with another of them keeps its finished batches.
HYBRID_SPEED_KNOBS = ("lazy_thinking", "speculative", "shared_drafts")
PLAIN_METHODS = ("base", "thinking")  # eval.py's methods without steering (eval.backend may run them on vLLM)


def generations_key(cfg: Any, method: str, budget: Any, question_ids: list) -> str:
    """The fingerprint of everything one method's generations depend on (`evaluate.run_sharded`'s `key`)."""
    hybrid = {k: cfg.hybrid[k] for k in cfg.hybrid if k not in HYBRID_SPEED_KNOBS}
    # vLLM's greedy answers are not the HF backend's token for token: their shards never mix (key unchanged for hf)
    backend = {"backend": "vllm"} if method in PLAIN_METHODS and cfg.eval.backend == "vllm" else {}
    return fingerprint({"method": method, "budget": budget, "questions": question_ids, "model": cfg.model,
                        "hybrid": hybrid, "steering_layer": cfg.steering.layer, "seed": cfg.seed,
                        "inputs": eval_inputs_fingerprint(cfg, method), **backend})


def eval_inputs_fingerprint(cfg: Any, method: str) -> str:
    """What a hybrid method's generations depend on beyond the config: the taxonomy and the vectors files."""
    if method in PLAIN_METHODS:
        return ""
    files = [Path(resolve_path(cfg.train_dir)) / "taxonomy.json", Path(resolve_path(cfg.steer_dir)) / "vectors.json"]
    return fingerprint([f.read_text() for f in files if f.exists()])


def evaluate(cfg: Any, run_dir: Path) -> None:
    """Base, thinking and hybrid (+ controls) on the evaluation split; graded, summarised, plotted, logged."""
    from omegaconf import OmegaConf

    note_organism_data(cfg, "GSM8K and MATH500 (data=gsm8k, data=math500)")

    from sae_reasoning.evaluate import (HYBRID_METHODS, format_summary, grade_records, plot_summary, run_sharded,
                                        summarise, write_results)
    from sae_reasoning.models import ROLE_PROMPTS, load_pair
    from sae_reasoning.traces import generate_batch

    e = cfg.eval
    data_cfg = OmegaConf.merge(cfg.data, {"split": e.split, "limit": e.limit})
    questions = load_questions(data_cfg, e.num_shards, e.shard_index)
    budget = e.max_new_tokens or cfg.data.max_new_tokens
    hybrid_methods = [m for m in e.methods if m in HYBRID_METHODS]
    if hybrid_methods and (cfg.train_dir is None or cfg.steer_dir is None):
        raise UserError(f"eval.methods has {', '.join(hybrid_methods)}: set train_dir=<train.py run folder> and "
                        "steer_dir=<steer.py run folder>, or drop them from eval.methods")
    judge = None
    if e.second_opinion:  # built before any generation, so that a missing API key fails at once
        from sae_reasoning.answer_judge import make_answer_judge

        judge = make_answer_judge(cfg.judge, cache_dir=Path(cfg.cache_dir) / "judge", seed=cfg.seed)
    keys = {m: generations_key(cfg, m, budget, [q.id for q in questions]) for m in e.methods}
    seed_base = cfg.seed * 1_000_003  # batch b of a plain method samples with seed_base + b, on either backend
    by_vllm = [m for m in e.methods if m in PLAIN_METHODS] if e.backend == "vllm" else []
    if by_vllm:  # each in a child process that gives the GPU back before the HF pair loads
        from sae_reasoning.traces_vllm import generate_answers_vllm

        for method in by_vllm:
            generate_answers_vllm(cfg, method, questions, run_dir / "generations" / method,
                                  batch_size=e.batch_size, max_new_tokens=budget, seed=seed_base,
                                  key=keys[method], desc=method)
    thinking = base = None
    if len(by_vllm) < len(e.methods):  # the HF pair: for the hybrid methods, and the plain ones without vLLM
        thinking, base = load_pair(cfg.model)
    if hybrid_methods:  # a pair or control the hybrid refuses fails now, not after the other methods' generations
        from sae_reasoning.hybrid import check_methods
        from sae_reasoning.hybrid_stage import method_overrides

        check_methods(thinking, base, cfg.hybrid, {m: method_overrides(m) for m in hybrid_methods})
    tracker = tracking.start(cfg, run_dir, "eval")
    try:
        def plain(lm: LoadedModel, prompt_fn):
            def fn(batch, b):
                prompts = [prompt_fn(lm.tokenizer, q.question) for q in batch]
                return generate_batch(lm, prompts, max_new_tokens=budget, seed=seed_base + b)
            return fn

        def done_by_vllm(batch, b):
            raise RuntimeError(f"batch {b} should have been written by vLLM")

        results = {}
        for method in e.methods:
            if method in by_vllm:
                fn = done_by_vllm
            elif method in PLAIN_METHODS:
                fn = plain(thinking if method == "thinking" else base, ROLE_PROMPTS[method])
            else:
                from sae_reasoning.hybrid_stage import hybrid_batch_fn

                fn = hybrid_batch_fn(cfg, thinking, base, method, budget)
            records = run_sharded(run_dir / "generations" / method, questions, e.batch_size, fn, method, cfg.progress,
                                  key=keys[method])
            results[method] = grade_records(records, questions)
        if judge is not None:  # after every method's generations are saved: a judge problem cannot cost them
            second_opinion(judge, results, questions, run_dir)
        summary = summarise(results, e.n_bootstrap, cfg.seed)
        if judge is not None:
            from sae_reasoning.answer_judge import judge_name

            for s in summary.values():
                s["second_opinion"] = {"judge": judge_name(judge), **s["second_opinion"]}
        write_results(run_dir, results, summary)
        plot_summary(summary, run_dir)
        columns = ["method", "accuracy", "ci_low", "ci_high", "gap_recovered", "steered_fraction", "changed_fraction",
                   "mean_length", "truncation_rate"]
        tracker.table("eval/summary", columns, [[m, s["accuracy"], *s["accuracy_ci"], s.get("gap_recovered"),
                                                 s.get("steered_fraction"), s.get("changed_fraction"),
                                                 s["mean_length"], s["truncation_rate"]] for m, s in summary.items()])
        tracker.summary({f"eval/{m}/accuracy": s["accuracy"] for m, s in summary.items()})
        tracker.summary({f"eval/{m}/judge_{k}": s["second_opinion"][k] for m, s in summary.items()
                         if "second_opinion" in s for k in ("accuracy", "agreement", "failures")})
        print(f"\n{len(questions)} {cfg.data.name} {e.split} questions; results in {run_dir}")
        print(format_summary(summary))
    finally:
        tracker.finish()


def second_opinion(judge: Any, results: dict[str, list[dict]], questions: list, run_dir: Path) -> None:
    """eval.second_opinion: the LLM judge's verdict on every graded record, saved beside the generations."""
    from sae_reasoning.answer_judge import SIDECAR, judge_records

    for method, records in results.items():
        counts = judge_records(records, questions, judge, run_dir / "generations" / method / SIDECAR, desc=method)
        print(f"second opinion for {method}: {counts['reused']} verdicts reused, {counts['asked']} asked, "
              f"{counts['failed']} failed, {counts['skipped']} skipped")
