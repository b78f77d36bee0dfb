"""Structured configs (Hydra ConfigStore) and their validation.

Every entry point composes one `Config`: the groups `model`, `data`, `sae`, `judge`, `steering`, `hybrid`,
`wandb`, plus a few top-level fields. The YAML files in `conf/` fill these dataclasses, so a typo in a key or a
wrong type is caught by OmegaConf at composition time; `validate` then checks the values against each other
(layers against the model's depth, k against n_latents, files that must exist) before any heavy work starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, ListConfig

from sae_reasoning.errors import ConfigError

DTYPES = ("float32", "float16", "bfloat16", "auto")
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ModelSpec:
    """One causal LM: a Hugging Face hub id (``org/name``) or a local folder."""

    path: str = MISSING
    revision: Optional[str] = None
    # this model's device; None = model.device. Two GPUs for a pair that one cannot hold (the 32B pairs take
    # ~66 GB each in bfloat16): model.thinking.device=cuda:0 model.base.device=cuda:1
    device: Optional[str] = None


@dataclass
class ModelConfig:
    """A thinking/base pair and the layers the method uses (TransformerLens numbering: ``blocks.L``)."""

    name: str = MISSING
    thinking: ModelSpec = field(default_factory=ModelSpec)
    base: ModelSpec = field(default_factory=ModelSpec)
    n_layers: int = MISSING  # decoder blocks of the thinking model; checked against the loaded config
    base_n_layers: Optional[int] = None  # when the base differs in depth (never for the paper's pairs)
    sae_layers: list[int] = MISSING  # layers whose sentence activations feed the SAE grid
    steering_layer: int = MISSING  # block of the base model whose output the vectors are added to
    paper_sae_layer: Optional[int] = None  # the authors' chosen SAE layer / size, for reference
    paper_n_latents: Optional[int] = None
    dtype: str = "auto"  # float32 | float16 | bfloat16 | auto (bfloat16 on GPU, float32 on CPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """A question set with gold answers, and how traces are generated from it."""

    name: str = MISSING  # organism | gsm8k | math500 | mmlu_pro
    source: str = MISSING  # local JSONL path, hub id, or "generated" (organism)
    split: str = "test"
    limit: Optional[int] = None  # use the first N questions (after sharding)
    seed: int = 0
    # trace generation
    max_new_tokens: int = 1000
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 16
    backend: str = "hf"  # hf | vllm (GPU, optional extra; runs in a child process, before the HF model loads)
    tensor_parallel_size: int = 1  # vllm only
    vllm_gpu_memory_utilization: float = 0.9  # vllm only: the share of each GPU's memory vLLM may take
    # vllm only: the longest sequence vLLM plans its KV cache for; None = the longest prompt + max_new_tokens
    # (capped at the model's context), instead of the model's whole context (131,072 tokens for the R1 distills)
    vllm_max_model_len: Optional[int] = None
    # sentences and activations
    min_words: int = 3
    activation_dtype: str = "float32"  # float32 | float16 | bfloat16 on disk
    activation_batch_size: int = 8
    # forwards run on this many activation batches at a time, their traces sorted by length (less padding)
    activation_sort_window: int = 8


@dataclass
class SAEConfig:
    """The top-k SAE grid. List-valued fields are swept inside one vectorised job; a scalar is a grid of one,
    which is what a Hydra multirun (``-m sae.n_latents=5,10,15``) gives each job."""

    n_latents: Any = field(default_factory=lambda: [5, 10, 15, 20, 25, 30, 35, 40, 45, 50])
    k: Any = 3
    seeds: Any = 0
    batch_size: int = 512
    max_epochs: int = 300
    patience: int = 10
    val_fraction: float = 0.1
    lr_scale: float = 2e-4  # lr = lr_scale / sqrt(n_latents / 2**14)  (METHOD.md)
    init: str = "data"  # data: Euclidean k-means centres (initial argmax = k-means) | spherical | random (uniform)
    baselines: bool = True
    # which SAE of the grid becomes the taxonomy that steer.py and eval.py use: "score" (the label-free taxonomy
    # score), "truth" (highest NMI with ground-truth labels, e.g. the organism's planted behaviors), or a name
    select: str = "score"


@dataclass
class JudgeConfig:
    """Who labels latents and scores the taxonomy."""

    backend: str = "offline"  # offline | openai | hf
    model: Optional[str] = None
    base_url: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    n_repeats: int = 1
    n_member_sentences: int = 200
    timeout_s: float = 60.0
    max_retries: int = 4
    max_concurrency: int = 8


@dataclass
class SteeringConfig:
    layer: Optional[int] = None  # default: model.steering_layer
    lr: float = 1e-2
    max_epochs: int = 50
    patience: int = 5
    batch_size: int = 16
    n_examples: int = 256  # per behavior, before the validation split
    val_fraction: float = 0.2
    max_norm: Optional[float] = None
    objective: str = "ce"  # ce | kl
    min_examples: int = 8  # behaviors with fewer usable examples get no vector (reported)
    n_hit_examples: int = 64  # held-out contexts per behavior for the causal hit-rate check (0: skip it)


SPECULATIVE_MODES = ("off", "single_row", "always")


@dataclass
class HybridConfig:
    """The hybrid generator (sae_reasoning/hybrid.py); `hybrid.HybridSettings` adds the per-method knobs."""

    granularity: str = "sentence"  # sentence | token
    threshold: float = 0.0  # SAE activation (max pre-activation) below which no behavior vector is applied
    coefficient: float = 1.0  # plain mode: delta = coefficient * vector (+ bias)
    candidate_mode: bool = False
    coefficients: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0])
    # per-behavior strength: {behavior: scale} multiplies that behavior's vector before any coefficient (plain or
    # candidate mode, and in the random_* controls, whose vectors follow the scaled norms). In eval.py a behavior is
    # named by its latent index, its title, or one " / "-separated part of its title (case-insensitive), e.g.
    # +hybrid.behavior_scales.plan=2.0 (HybridGenerator itself takes latent indices). Vectors trained to the same
    # loss need different pushes to flip a greedy choice: one coefficient for all is too weak for one behavior where
    # it already breaks another (README).
    behavior_scales: dict[str, float] = field(default_factory=dict)
    unsteered_candidate: bool = True
    max_new_tokens: int = 512
    batch_size: int = 16
    # Thinking and base tokenizers differ: refuse (false) or let the thinking model, at each sentence start, re-encode
    # its chat prompt + the base's generated text with its own tokenizer (one uncached thinking forward over the
    # prefix per sentence, then the draft). Limits: the text is split as the thinking tokenizer splits it (not as the
    # model would have written it; unknown text -> <unk>); granularity=sentence only; oracle, unsteered_rerank and
    # candidate_mode are refused (they need one vocabulary); disagreement_rate is None. Ignored for a shared vocabulary.
    retokenize_text: bool = False
    # at a sentence start: pool the thinking model's greedy draft of its whole next sentence ("sentence", pooled
    # exactly as the SAE was trained) or of its first token ("token")
    draft: str = "sentence"
    draft_max_tokens: int = 64
    # sentence granularity (plain mode, bias_only, random_*): the thinking model reads the emitted tokens in one
    # forward when a decision needs them, not one forward per token (same results; hybrid.py, *Lazy thinking*)
    lazy_thinking: bool = True
    # with lazy thinking and sentence drafts: the steered base verifies the thinking model's draft sentence in one
    # forward and emits its greedy tokens up to the first that differs (same results; hybrid.py, *Speculative*):
    # off | single_row (while one row decodes: batch 1, a batch's last row) | always. Token granularity: a lone row
    # verifies its draft with each position's own decision, and in mid-sentence a draft the base writes itself
    # (always = single_row there). single_row by default: on a CPU,
    # problems run to their own end at batch 1 went from 0.40x to 0.53x base-only; in fixed-length runs past the
    # answer (out-of-distribution text, drafts rejected) it cost 5%; not measured on a GPU. With shared drafts,
    # always: every row verifies the draft it has just ended in the step's one base forward (no extra call, a wider
    # forward; on the organism at batch 16, 512 tokens: 17% fewer calls, 5.7x the base's positions)
    speculative: str = "single_row"
    # batch > 1 (sentence or token mode, draft=sentence): rows draft their next sentence one token a step inside ONE
    # shared thinking forward while the other rows write (hybrid.py, *Shared drafts*): about two model calls per
    # step instead of one per draft token of the longest draft. Same results. null (the default) = on where the base
    # model runs on CUDA, off elsewhere: on a GPU a call costs its launches, not its rows (an H200, session 9: 64
    # tokens at batch 16 without them took 1,633 model calls against base-only's 64); on a CPU a waiting row still
    # costs its positions, so it does not pay there (28% slower at 512 tokens, batch 16). Memory: both caches grow
    # by a column every step for every row, drafting steps included (on the organism ~1.8 steps a token at batch 16)
    shared_drafts: Optional[bool] = None


SECOND_OPINION_NEEDS_LLM = ("eval.second_opinion=true needs an LLM judge: add judge=openai (any OpenAI-compatible "
                            "server) or judge=hf; the offline judge only labels latents and cannot read answers")


@dataclass
class EvalConfig:
    """eval.py: which methods run on which split, with what budget."""

    methods: list[str] = field(default_factory=lambda: ["base", "thinking", "hybrid", "bias_only", "random_behavior",
                                                        "random_vectors", "oracle", "unsteered_rerank"])
    split: str = "test"  # overrides data.split for evaluation
    limit: Optional[int] = None  # overrides data.limit (None: every question of the split)
    max_new_tokens: Optional[int] = None  # per method; None: data.max_new_tokens (thinking: full budget)
    batch_size: int = 32
    n_bootstrap: int = 2000
    num_shards: int = 1
    shard_index: int = 0
    # Also ask the LLM judge of the `judge` group (judge=openai|hf) whether each final answer matches the gold:
    # saved per problem and compared in summary.json; math-verify stays the decision of record.
    second_opinion: bool = False
    # hf | vllm: who writes the base and thinking methods' answers (vllm: GPU, in a child process before the pair
    # loads, with data.vllm_* and data.tensor_parallel_size; the hybrid methods always run on hf)
    backend: str = "hf"


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "sae-reasoning"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    sae: SAEConfig = MISSING
    judge: JudgeConfig = MISSING
    steering: SteeringConfig = MISSING
    hybrid: HybridConfig = MISSING
    wandb: WandbConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    cache_dir: str = ".cache/sae_reasoning"  # activation cache, shared by fingerprint across runs
    train_dir: Optional[str] = None  # steer.py / eval.py: the train.py run folder to read
    steer_dir: Optional[str] = None  # eval.py: the steer.py run folder to read
    progress: bool = True


def register_configs() -> None:
    """Register the schemas so that `conf/*.yaml` are validated against them."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group, node in [
        ("model", ModelConfig),
        ("data", DataConfig),
        ("sae", SAEConfig),
        ("judge", JudgeConfig),
        ("steering", SteeringConfig),
        ("hybrid", HybridConfig),
        ("wandb", WandbConfig),
    ]:
        cs.store(group=group, name=f"schema_{group}", node=node)


# --------------------------------------------------------------------------------------------- validation


def as_int_list(value: Any, name: str) -> list[int]:
    """A scalar or a list of ints (Hydra gives a scalar per multirun job, a list for an in-job sweep)."""
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{name}={value!r}: expected an integer or a list of integers, e.g. {name}=[5,10]")
        out.append(v)
    if not out:
        raise ConfigError(f"{name} is empty: give at least one value")
    return out


def _positive(value: Any, name: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value != value:  # NaN compares false with everything, so it would pass both tests below
        raise ConfigError(f"{name}=nan: give a number")
    if (value < 0) if allow_zero else (value <= 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value}: must be {bound}")


def behavior_scales_problem(scales: Any) -> str | None:
    """The line refusing a `hybrid.behavior_scales` value that is not a finite number >= 0, or None. Keys are not
    checked here: eval.py resolves titles later (hybrid_stage), HybridGenerator takes latent indices. Used by this
    module's `validate` and by `hybrid.HybridSettings.validate` (direct users of the generator)."""
    for key, scale in dict(scales or {}).items():
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < float("inf"):
            return (f"hybrid.behavior_scales[{key}]={scale!r}: must be a number >= 0 (the multiplier of that "
                    "behavior's vector)")
    return None


def _choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: choose one of {', '.join(choices)}")


def _layer(value: int, name: str, n_layers: int) -> None:
    if not 0 <= value < n_layers:
        raise ConfigError(f"{name}={value}: the model has {n_layers} layers, so a layer must be in 0..{n_layers - 1}")


def resolve_path(path: str) -> Optional[Path]:
    """A local path, tried relative to the working directory, then to the repository root; None if absent."""
    p = Path(path).expanduser()
    if p.exists():
        return p.resolve()
    if not p.is_absolute() and (REPO_ROOT / p).exists():
        return (REPO_ROOT / p).resolve()
    return None


def is_local_path(path: str) -> bool:
    """A model or data source that names a folder or file rather than a hub id."""
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()


def validate(cfg: Any) -> None:
    """Check values that OmegaConf's types cannot; raise ConfigError with one actionable line."""
    m = cfg.model
    _positive(m.n_layers, "model.n_layers")
    for layer in m.sae_layers:
        _layer(layer, "model.sae_layers", m.n_layers)
    if not list(m.sae_layers):
        raise ConfigError("model.sae_layers is empty: give at least one layer, e.g. model.sae_layers=[4]")
    _layer(m.steering_layer, "model.steering_layer", m.base_n_layers or m.n_layers)
    _choice(m.dtype, "model.dtype", DTYPES)
    for name, device in (("model.device", m.device), ("model.thinking.device", m.thinking.device),
                         ("model.base.device", m.base.device)):
        if device is not None and not (device in ("auto", "cpu", "cuda", "mps") or device.startswith("cuda:")):
            raise ConfigError(f"{name}={device!r}: choose auto, cpu, cuda, cuda:N or mps")

    d = cfg.data
    _choice(d.name, "data.name", ("organism", "gsm8k", "math500", "mmlu_pro"))
    _positive(d.limit, "data.limit")
    _positive(d.max_new_tokens, "data.max_new_tokens")
    _positive(d.temperature, "data.temperature", allow_zero=True)
    if not 0 < d.top_p <= 1:
        raise ConfigError(f"data.top_p={d.top_p}: must be in (0, 1]")
    _positive(d.batch_size, "data.batch_size")
    _positive(d.tensor_parallel_size, "data.tensor_parallel_size")
    if not 0 < d.vllm_gpu_memory_utilization <= 1:
        raise ConfigError(f"data.vllm_gpu_memory_utilization={d.vllm_gpu_memory_utilization}: must be in (0, 1]")
    _positive(d.vllm_max_model_len, "data.vllm_max_model_len")
    _positive(d.activation_batch_size, "data.activation_batch_size")
    _positive(d.activation_sort_window, "data.activation_sort_window")
    _positive(d.min_words, "data.min_words", allow_zero=True)
    _choice(d.backend, "data.backend", ("hf", "vllm"))
    _choice(d.activation_dtype, "data.activation_dtype", ("float32", "float16", "bfloat16"))

    s = cfg.sae
    sizes = as_int_list(s.n_latents, "sae.n_latents")
    ks = as_int_list(s.k, "sae.k")
    as_int_list(s.seeds, "sae.seeds")
    for n in sizes:
        _positive(n, "sae.n_latents")
    for k in ks:
        _positive(k, "sae.k")
        if k > min(sizes):
            raise ConfigError(f"sae.k={k} is larger than sae.n_latents={min(sizes)}: k must be <= every n_latents")
    _positive(s.batch_size, "sae.batch_size")
    _positive(s.max_epochs, "sae.max_epochs")
    _positive(s.patience, "sae.patience")
    _positive(s.lr_scale, "sae.lr_scale")
    _choice(s.init, "sae.init", ("data", "spherical", "random"))
    if s.select not in ("score", "truth") and not re.fullmatch(r"layer\d+_n\d+_k\d+_seed\d+", str(s.select)):
        raise ConfigError(f"sae.select={s.select!r}: choose score, truth or an SAE name such as layer1_n5_k3_seed0")
    if not 0 < s.val_fraction < 1:
        raise ConfigError(f"sae.val_fraction={s.val_fraction}: must be in (0, 1)")

    j = cfg.judge
    _choice(j.backend, "judge.backend", ("offline", "openai", "hf"))
    if j.backend in ("openai", "hf") and not j.model:
        raise ConfigError(f"judge.backend={j.backend} needs judge.model (e.g. judge.model=gpt-4o-mini)")
    for name in ("n_repeats", "n_member_sentences", "timeout_s", "max_concurrency"):
        _positive(getattr(j, name), f"judge.{name}")
    _positive(j.max_retries, "judge.max_retries", allow_zero=True)

    st = cfg.steering
    if st.layer is not None:
        _layer(st.layer, "steering.layer", m.base_n_layers or m.n_layers)
    for name in ("lr", "max_epochs", "patience", "batch_size", "n_examples", "max_norm", "min_examples"):
        _positive(getattr(st, name), f"steering.{name}")
    _positive(st.n_hit_examples, "steering.n_hit_examples", allow_zero=True)
    if not 0 < st.val_fraction < 1:
        raise ConfigError(f"steering.val_fraction={st.val_fraction}: must be in (0, 1)")
    _choice(st.objective, "steering.objective", ("ce", "kl"))

    h = cfg.hybrid
    _choice(h.granularity, "hybrid.granularity", ("sentence", "token"))
    _positive(h.threshold, "hybrid.threshold", allow_zero=True)
    _positive(h.max_new_tokens, "hybrid.max_new_tokens")
    _positive(h.batch_size, "hybrid.batch_size")
    _choice(h.draft, "hybrid.draft", ("sentence", "token"))
    _positive(h.draft_max_tokens, "hybrid.draft_max_tokens")
    _choice(h.speculative, "hybrid.speculative", SPECULATIVE_MODES)
    problem = behavior_scales_problem(h.behavior_scales)
    if problem:
        raise ConfigError(problem)
    if h.candidate_mode and not list(h.coefficients):
        raise ConfigError("hybrid.coefficients is empty: candidate mode needs at least one coefficient")

    e = cfg.eval
    known = ("base", "thinking", "hybrid", "bias_only", "random_behavior", "random_vectors", "oracle",
             "unsteered_rerank")
    for method in e.methods:
        _choice(method, "eval.methods", known)
    _choice(e.backend, "eval.backend", ("hf", "vllm"))
    if not list(e.methods):
        raise ConfigError("eval.methods is empty: name at least one method, e.g. eval.methods=[base,thinking]")
    for name in ("limit", "max_new_tokens", "batch_size", "n_bootstrap", "num_shards"):
        _positive(getattr(e, name), f"eval.{name}")
    if not 0 <= e.shard_index < e.num_shards:
        raise ConfigError(f"eval.shard_index={e.shard_index}: must be in 0..{e.num_shards - 1}")
    if e.second_opinion and cfg.judge.backend == "offline":
        raise ConfigError(SECOND_OPINION_NEEDS_LLM)

    _choice(cfg.wandb.mode, "wandb.mode", ("offline", "online", "disabled"))
    # Files last: a missing file is the likeliest message to hide the others.
    for role in ("thinking", "base"):
        path = getattr(m, role).path
        if is_local_path(path) and resolve_path(path) is None:
            raise ConfigError(f"model.{role}.path={path!r}: no such folder; point it at a local model or use a hub id")
    if d.source != "generated" and is_local_path(d.source) and resolve_path(d.source) is None:
        raise ConfigError(f"data.source={d.source!r}: no such file; give a local JSONL path or a hub id")
    for name in ("train_dir", "steer_dir"):
        path = getattr(cfg, name)
        if path is not None and resolve_path(path) is None:
            raise ConfigError(f"{name}={path!r}: no such folder; point it at a finished run folder")
