"""Hybrid decoding: tokens/s of `HybridGenerator` (sentence and token modes) against base-only cached greedy
generation (same backend) and against a faithful re-implementation of the reference algorithm.

    python benchmarks/bench_hybrid.py [--device cuda] [--quick] [--tokens 256,512] [--batches 1,16]

Methods (every one generates exactly N new tokens per problem: the EOS logit of both models is masked to -inf by
a hook on the LM head, for every method alike, so no row stops early):

- ``base_hf_generate``: `model.generate` (greedy, KV cache, left padding), the backend of `traces.generate_batch`.
- ``base_cached_loop``: a plain loop of cached forwards (DynamicCache, one token per step), the backend the hybrid
  uses itself. The target uses the FASTER of the two base-only figures.
- ``hybrid_sentence`` / ``hybrid_token``: `HybridGenerator(...).generate_ids` with the default settings
  (plain mode, coefficient 1, bias always on, `track_unsteered=True`: the base runs 2 rows per problem to report
  changed/disagreement rates) and ``granularity`` sentence / token. A random SAE (15 latents, k 3) at the SAE layer,
  random unit steering vectors for every latent and a bias vector (the one-token path's cost does not depend on
  their values).
  With ``--artifacts TRAIN_DIR,STEER_DIR`` (e.g. the demo's) the trained SAE, its layer, the steering vectors and
  their layer replace the random ones (coefficient 0.5 and the compute vector x 0.25, the demo's since session 7;
  session 6's figures used coefficient 0.25 and session 2's base): lazy thinking and speculative steps make the
  cost depend on where sentences end and on how much of each draft the steered base accepts.
  Diagnostics (not used for the targets): ``diag_hybrid_sentence_no_speculative`` (`speculative="off"`, the default
  before session 6),
  ``diag_hybrid_sentence_per_token_thinking`` (`lazy_thinking=False`: the thinking model reads every token as it is
  emitted, the code of sessions 1-4), ``diag_hybrid_sentence_untracked`` (`track_unsteered=False`) and
  ``diag_hybrid_sentence_draft_token`` (`draft="token"`: at a sentence start the thinking model drafts one token
  instead of its whole next sentence), ``diag_hybrid_sentence_speculative_always`` (`speculative="always"`: every
  row verifies its draft, at any batch), ``diag_hybrid_token_no_speculative`` (token mode with `speculative="off"`,
  the token mode of sessions 6-7) and, at batch > 1, ``diag_hybrid_sentence_shared_drafts`` /
  ``diag_hybrid_sentence_unshared_drafts`` (`shared_drafts=True` / `False`: the default, None, is on for a CUDA base
  and off on a CPU), ``diag_hybrid_sentence_shared_drafts_verified`` (shared drafts with `speculative="always"`: a
  row verifies the draft it has just ended in the step's base forward), ``diag_hybrid_token_shared_drafts`` /
  ``diag_hybrid_token_unshared_drafts`` (the same in token mode; the largest-N rows also count each one's sequential
  model calls, ``forward_calls``).
- ``reference``: the public reference code's token-level hybrid (`hybrid/hybrid_token.py` of the paper's
  repository) re-implemented here with plain HF forwards: no KV cache; per generated token, one full thinking
  forward to read the SAE layer, one full unsteered base forward, a second full thinking forward for its logits;
  where the greedy base and thinking tokens disagree, 10 coefficients x 5 windows = 50 steered base forwards over
  the whole prefix, one after another, each adding ``coef * (bias + vector)`` to the last |window| positions
  (window 0 = all), and the candidate with the lowest thinking-model perplexity is emitted. Batch 1: the reference
  processes one problem at a time, so its batch-16 throughput equals its batch-1 throughput. (It used nnsight traces
  and called gc.collect / empty_cache every 8 tokens; both are left out, which only favours it.)
  It is far too slow to run to 512 tokens, so its per-token cost is MEASURED on the real step function at
  5 prefix lengths (teacher-forced on the base's own greedy continuation), inside the interleaved rounds of the
  largest-N settings (same machine load as the hybrid), separately for a step without
  disagreement (3 full forwards) and with (53), interpolated linearly in the prefix length, and summed over the
  N steps with the disagreement rate p measured by the hybrid on the same problems (bounds for p = 0 and 1 are
  reported too). A few live reference steps from the prompt check the model of its cost (measured vs predicted).

With ``--natural`` the same generators also run 32 test problems to their own end (eos not masked), as eval.py
runs them, against base-only doing the same work: each problem as many decode steps as the hybrid took on it (its
eos masked), each row leaving the batch when done (``base_cached_loop_same_lengths``). Informational: the
organism's text past the answer is out of distribution, so the fixed-length runs undersell what lazy thinking,
draft reuse and speculative steps save where the thinking model's drafts are written as drafted.
Targets (at 512 tokens, every batch size and mode): hybrid >= 0.45 x base-only; hybrid >= 100 x reference.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

TARGET_BASE = 0.45
TARGET_REF = 100.0
REF_COEFFICIENTS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
REF_WINDOWS = [0, -1, -4, -16, -64]
# diagnostic hybrid runs (not used for the targets): name -> (settings, the HybridSettings field they need)
DIAGS = {"untracked": (dict(track_unsteered=False), "track_unsteered"),
         "draft_token": (dict(draft="token"), "draft"),
         "no_speculative": (dict(speculative="off"), "speculative"),
         "per_token_thinking": (dict(lazy_thinking=False), "lazy_thinking"),
         "shared_drafts": (dict(shared_drafts=True), "shared_drafts"),
         # (a row verifies the draft it has just ended in the step's base forward)
         "shared_drafts_verified": (dict(shared_drafts=True, speculative="always"), "shared_drafts"),
         "unshared_drafts": (dict(shared_drafts=False), "shared_drafts"),
         "token_shared_drafts": (dict(granularity="token", shared_drafts=True), "shared_drafts"),
         "token_unshared_drafts": (dict(granularity="token", shared_drafts=False), "shared_drafts"),
         "speculative_always": (dict(speculative="always"), "speculative"),
         "token_no_speculative": (dict(granularity="token", speculative="off"), "speculative")}


# ---------------------------------------------------------------------------------------------------- helpers


@contextmanager
def no_eos(*lms):
    """Mask the EOS logit(s) of every model to -inf (LM-head forward hook), so every method runs N tokens."""
    handles = []
    for lm in lms:
        eos = lm.tokenizer.eos_token_id
        gen_eos = getattr(lm.model.generation_config, "eos_token_id", None)
        ids = {eos} | (set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos})
        ids = sorted(i for i in ids if i is not None)

        def hook(_m, _i, out, ids=ids):
            out[..., ids] = float("-inf")
            return out

        handles.append(lm.model.get_output_embeddings().register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def left_pad(seqs, pad: int, device):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def pad_id(lm) -> int:
    tok = lm.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


@torch.inference_mode()
def base_hf_generate(base, prompts, n: int) -> list[list[int]]:
    ids, mask = left_pad(prompts, pad_id(base), base.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = base.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                  pad_token_id=pad_id(base))
    return out[:, ids.shape[1]:].tolist()


@torch.inference_mode()
def base_cached_loop(base, prompts, n: int) -> list[list[int]]:
    from transformers import DynamicCache

    model = base.model
    ids, mask = left_pad(prompts, pad_id(base), base.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits
    tok = logits[:, -1].argmax(-1)
    out = [tok]
    pos = pos[:, -1:]
    for _ in range(n - 1):
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], 1)
        pos = pos + 1
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits
        tok = logits[:, -1].argmax(-1)
        out.append(tok)
    return torch.stack(out, 1).tolist()


@torch.inference_mode()
def base_cached_loop_lengths(base, prompts, lengths: list[int], batch: int) -> list[list[int]]:
    """The cached loop with a length per problem: row i generates lengths[i] tokens (the caller masks eos) and then
    leaves the batch (cache included), as the hybrid's rows leave at their eos; `batch` problems at a time."""
    from transformers import DynamicCache

    out: list[list[int]] = []
    for start in range(0, len(prompts), batch):
        chunk, want = prompts[start:start + batch], lengths[start:start + batch]
        ids, mask = left_pad(chunk, pad_id(base), base.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=base.model.config)
        logits = base.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits
        rows, gen, pos = list(range(len(chunk))), [[] for _ in chunk], pos[:, -1:]
        tok = logits[:, -1].argmax(-1)
        while True:
            for a, t in enumerate(tok.tolist()):
                gen[rows[a]].append(t)
            keep = [a for a, i in enumerate(rows) if len(gen[i]) < want[i]]
            if not keep:
                break
            if len(keep) < len(rows):
                sel = torch.tensor(keep, device=base.device)
                cache.batch_select_indices(sel)
                mask, pos, tok, rows = mask[sel], pos[sel], tok[sel], [rows[a] for a in keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
            pos = pos + 1
            logits = base.model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                                use_cache=True).logits
            tok = logits[:, -1].argmax(-1)
        out += gen
    return out


def random_artifacts(thinking, base, cuda: bool):
    """The benchmark's default steering artifacts: a random SAE (15 latents, k 3), 15 random unit vectors and a
    random bias of norm 0.5, with the layers: the paper's (SAE 4, steering 10) for the GPU's 28-layer Qwen2-1.5B
    shape, else SAE at the middle block and steering at 37% depth. Returns (sae, sae_layer, steering_layer,
    vectors [15, d], bias [d])."""
    from sae_reasoning.sae import TopKSAE

    n_layers = base.n_layers
    if cuda and n_layers == 28:
        steering_layer, sae_layer = 10, 4  # the paper's Qwen2.5-Math-1.5B <- R1-Distill-Qwen-1.5B pair
    else:
        steering_layer, sae_layer = round(0.37 * n_layers), max(0, min(n_layers - 1, n_layers // 2))
    sae = TopKSAE.from_init(thinking.d_model, 15, k=3, seed=0)
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(15, base.d_model, generator=g)
    vectors = vectors / vectors.norm(dim=-1, keepdim=True)
    bias = torch.randn(base.d_model, generator=g)
    return sae, sae_layer, steering_layer, vectors, 0.5 * bias / bias.norm()


def warm_until_steady(base, prompts, device, n: int = 32, budget_s: float = 60.0) -> dict:
    """GPU only: time 32-token base-only loops until two in a row agree within 10% (or `budget_s` runs out), so the
    timed rounds start in the steady state. On the H200 in session 9 one process's model calls went from ~120 ms
    to ~25 ms over its first minutes; the per-call times are returned for the JSON."""
    times, steady, t_end = [], False, time.perf_counter() + budget_s
    while not steady and time.perf_counter() < t_end:
        C.sync(device)
        t0 = time.perf_counter()
        base_cached_loop(base, prompts, n)
        C.sync(device)
        times.append((time.perf_counter() - t0) / n)
        steady = len(times) >= 2 and abs(times[-1] - times[-2]) <= 0.1 * times[-2]
    C.log("  warm-up, ms per base call: " + ", ".join(f"{t * 1e3:.1f}" for t in times))
    return {"ms_per_call": [t * 1e3 for t in times], "steady": steady}


def hybrid_run(gen, base_ids, think_ids) -> list[dict]:
    return gen.generate_ids(base_ids, think_ids, progress=False)


def count_forwards(fn, **lms) -> dict:
    """Forward calls of each model's decoder stack during fn(), and the rows x positions they processed."""
    counts = {name: {"calls": 0, "row_positions": 0} for name in lms}
    handles = []
    for name, lm in lms.items():
        def pre(_m, args, kwargs, name=name):
            ids = kwargs.get("input_ids", args[0] if args else None)
            counts[name]["calls"] += 1
            counts[name]["row_positions"] += int(ids.numel()) if ids is not None else 0
        handles.append(lm.model.model.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return counts


# ---------------------------------------------------------------------------------------------------- reference


class Reference:
    """The reference algorithm's per-token step (see module doc), batch 1, no cache."""

    def __init__(self, thinking, base, sae, sae_layer, vectors, bias, steering_layer):
        self.thinking, self.base, self.sae = thinking, base, sae.float().to(thinking.device)
        self.sae_layer, self.steering_layer = sae_layer, steering_layer
        self.vectors = vectors.to(base.device)
        self.bias = bias.to(base.device)

    @torch.inference_mode()
    def step(self, base_seq: list[int], think_seq: list[int], force: bool | None = None) -> tuple[int, bool]:
        from sae_reasoning.hooks import add_to_resid_post
        from sae_reasoning.models import decoder_layers

        tm, bm = self.thinking.model, self.base.model
        tb = torch.tensor([think_seq], device=self.thinking.device)
        bb = torch.tensor([base_seq], device=self.base.device)
        # 1) thinking model, full forward, read block sae_layer at the last position -> SAE -> latent
        captured = {}
        handle = decoder_layers(tm)[self.sae_layer].register_forward_hook(
            lambda _m, _i, out: captured.__setitem__("h", (out[0] if isinstance(out, tuple) else out)[0, -1]))
        try:
            tm(input_ids=tb)
        finally:
            handle.remove()
        latent = int(self.sae.pre_acts(self.sae.normalise(captured["h"].float()[None])).argmax(-1))
        vec = self.vectors[latent]
        # 2) base model, full forward, unsteered greedy token
        base_tok = int(bm(input_ids=bb).logits[0, -1].float().cpu().argmax())
        # 3) thinking model again, full forward, for its logits (gating and guardrail)
        t_logits = tm(input_ids=tb).logits[0, -1].float().cpu()
        disagree = int(t_logits.argmax()) != base_tok if force is None else force
        if not disagree:
            return base_tok, False
        # 4) 10 coefficients x 5 windows: sequential steered full forwards of the base
        T = bb.shape[1]
        cands = []
        for coef in REF_COEFFICIENTS:
            for win in REF_WINDOWS:
                delta = torch.zeros(1, T, self.base.d_model, device=self.base.device)
                span = slice(None) if win == 0 else slice(T - min(abs(win), T), T)
                delta[:, span] = coef * (self.bias + vec)
                with add_to_resid_post(bm, self.steering_layer, delta):
                    logits = bm(input_ids=bb).logits[0, -1].float().cpu()
                cands.append(int(logits.argmax()))
        # 5) thinking-model perplexity of each candidate: the lowest wins (first on ties)
        logp = torch.log_softmax(t_logits, -1)
        best = max(range(len(cands)), key=lambda i: (float(logp[cands[i]]), -i))
        return cands[best], True


class ReferenceProbe:
    """Times one agree-step and one disagree-step of the reference at each checkpoint (number of generated tokens,
    teacher-forced on `continuation`) per call; called inside the interleaved rounds of the hybrid settings so that
    the reference and the hybrid are timed under the same machine load."""

    def __init__(self, ref: Reference, base_prompt, think_prompt, continuation, checkpoints, device):
        self.ref, self.device = ref, device
        self.points = [(L, base_prompt + continuation[:L], think_prompt + continuation[:L]) for L in checkpoints]
        self.agree: dict[int, list[float]] = {L: [] for L in checkpoints}
        self.disagree: dict[int, list[float]] = {L: [] for L in checkpoints}

    def __call__(self) -> None:
        for L, b, t in self.points:
            with C.timer(self.agree[L], self.device):
                self.ref.step(b, t, force=False)
            with C.timer(self.disagree[L], self.device):
                self.ref.step(b, t, force=True)

    def rows(self) -> list[dict]:
        return [{"generated": L, "base_prefix_tokens": len(b), "agree_s": C.median(self.agree[L]),
                 "disagree_s": C.median(self.disagree[L]), "n_timings": len(self.agree[L])}
                for L, b, _t in self.points if self.agree[L]]


def interp(rows, key: str, x: float) -> float:
    xs = [r["generated"] for r in rows]
    if x <= xs[0]:
        return rows[0][key]
    for (x0, r0), (x1, r1) in zip(zip(xs, rows), zip(xs[1:], rows[1:])):
        if x <= x1:
            return r0[key] + (r1[key] - r0[key]) * (x - x0) / (x1 - x0)
    # beyond the last checkpoint: extend the last segment linearly
    (x0, r0), (x1, r1) = (xs[-2], rows[-2]), (xs[-1], rows[-1])
    return r1[key] + (r1[key] - r0[key]) * (x - x1) / (x1 - x0)


def reference_seconds(rows, n: int, p: float) -> float:
    return sum(p * interp(rows, "disagree_s", t) + (1 - p) * interp(rows, "agree_s", t) for t in range(n))


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    p = C.base_parser(__doc__.split("\n")[0])
    p.add_argument("--tokens", default=None, help="new tokens per problem, comma-separated (default 256,512)")
    p.add_argument("--batches", default=None, help="batch sizes, comma-separated (default 1,16)")
    p.add_argument("--ref-checkpoints", type=int, default=None, help="prefix lengths at which the reference step "
                                                                     "is timed")
    p.add_argument("--ref-live", type=int, default=None, help="live reference steps from the prompt")
    p.add_argument("--no-diag", action="store_true", help="skip the diagnostic diag_hybrid_* runs")
    p.add_argument("--diag", default=None, metavar="NAMES",
                   help="only these diagnostic runs, comma-separated names of DIAGS (e.g. "
                        "shared_drafts,no_speculative)")
    p.add_argument("--profile", action="store_true", help="profile the hybrid even when the targets are met")
    p.add_argument("--artifacts", default=None, metavar="TRAIN_DIR,STEER_DIR",
                   help="the SAE (train.py run) and steering vectors (steer.py run) of the models benchmarked, e.g. "
                        "outputs/demo/train,outputs/demo/steer after `make demo` (organism only); default: a random "
                        "SAE and random unit vectors. Lazy thinking and speculative steps make the hybrid's cost "
                        "depend on what it decides and writes, so trained artifacts give the realistic figure")
    p.add_argument("--natural", action="store_true",
                   help="also time every method run to each problem's own end (eos not masked), as eval.py runs "
                        "it: tokens/s over the same problems (informational; the targets use the fixed lengths)")
    p.add_argument("--natural-problems", type=int, default=None, help="problems for --natural (default 32)")
    p.add_argument("--coefficient", type=float, default=None,
                   help="hybrid.coefficient (default 1 with random vectors; 0.5, the demo's, with --artifacts)")
    p.add_argument("--behavior-scales", default=None, metavar="KEY=S,...",
                   help="hybrid.behavior_scales with --artifacts (default step=0.25, the demo's)")
    args = p.parse_args()
    unknown = sorted({x.strip() for x in (args.diag or "").split(",") if x.strip()} - set(DIAGS))
    if unknown:
        p.error(f"--diag {','.join(unknown)}: no such diagnostic run; choose from {','.join(DIAGS)}")
    device = C.setup(args)
    from sae_reasoning.hybrid import HybridGenerator, HybridSettings
    from sae_reasoning.organism import make_splits

    cuda = device.type == "cuda"
    thinking, base, model_info = C.load_pair(
        device, quick_gpu_layers=8 if args.quick else None, random_models=args.random_models)
    tokens = [int(x) for x in args.tokens.split(",")] if args.tokens else ([32, 64] if args.quick else [256, 512])
    batches = [int(x) for x in args.batches.split(",")] if args.batches else ([1, 4] if args.quick else [1, 16])
    repeats = args.repeats or (1 if (args.quick or cuda) else 3)
    n_check = args.ref_checkpoints or (3 if args.quick else 5)
    n_live = args.ref_live if args.ref_live is not None else (2 if args.quick else 6)

    sae, sae_layer, steering_layer, vectors, bias = random_artifacts(thinking, base, cuda)
    n_latents = sae.n_latents
    artifacts = "random SAE (15 latents, k 3) and random unit vectors, bias norm 0.5"
    if args.artifacts:
        from sae_reasoning.hybrid_stage import chosen_taxonomy, load_chosen_sae, resolve_behavior_scales
        from sae_reasoning.steering import load_vectors

        train_dir, steer_dir = args.artifacts.split(",")
        taxonomy = chosen_taxonomy(train_dir)
        sae, sae_layer = load_chosen_sae(train_dir, taxonomy), taxonomy["layer"]
        loaded = load_vectors(steer_dir, d_model=base.d_model)
        steering_layer, n_latents, bias = loaded.layer, sae.n_latents, loaded.bias
        scales = {k: float(v) for k, v in (item.split("=") for item in
                                            (args.behavior_scales or "step=0.25").split(",") if item)}
        vec_map = {int(k): v for k, v in loaded.vectors.items()}
        behavior_scales = resolve_behavior_scales(scales, taxonomy["titles"], vec_map)
        vectors = torch.zeros(n_latents, base.d_model)  # the reference's table: scaled as the hybrid scales it
        for latent, vec in vec_map.items():
            vectors[latent] = vec * behavior_scales.get(str(latent), 1.0)
        artifacts = (f"trained: {taxonomy['name']} from {train_dir}, vectors from {steer_dir}, behavior scales "
                     f"{scales}")
    else:
        vec_map, behavior_scales = {i: vectors[i] for i in range(n_latents)}, {}
    coefficient = args.coefficient if args.coefficient is not None else (0.5 if args.artifacts else 1.0)

    problems = make_splits(0, n_train=1000)["test"][: max(batches)]
    questions = [pr.question for pr in problems]

    def mk(**kw):
        return HybridGenerator(thinking, base, sae, sae_layer, vec_map, bias, steering_layer, progress=False,
                               coefficient=coefficient, **({"behavior_scales": behavior_scales} if behavior_scales
                                                           else {}), **kw)

    def generators(n: int, b: int, diags) -> dict:
        """The hybrid runs of one setting: both modes at the defaults, then the diagnostics `diags` (names in
        DIAGS) that --no-diag / --diag leave in and the code under test has (older code: the field is missing)."""
        gens = {"hybrid_sentence": mk(granularity="sentence", max_new_tokens=n, batch_size=b),
                "hybrid_token": mk(granularity="token", max_new_tokens=n, batch_size=b)}
        wanted = set() if args.no_diag else (set(x.strip() for x in args.diag.split(",")) if args.diag else None)
        for name in diags:
            kw, field_ = DIAGS[name]
            if (wanted is None or name in wanted) and field_ in HybridSettings.__dataclass_fields__ and (
                    b > 1 or ("shared_drafts" not in name and name != "speculative_always")):  # batch > 1 only
                kw = {"granularity": "sentence", **kw}
                key = f"diag_hybrid_{name}" if name.startswith("token_") else f"diag_hybrid_sentence_{name}"
                gens[key] = mk(max_new_tokens=n, batch_size=b, **kw)
        return gens

    pairs = [mk().prompts(q) for q in questions]
    base_prompts, think_prompts = [pr[0] for pr in pairs], [pr[1] for pr in pairs]
    C.log(f"hybrid: {model_info['models']}, steering layer {steering_layer}, SAE layer {sae_layer}, tokens {tokens}, "
          f"batches {batches}, {repeats} repeats")

    settings_rows = []
    profile = {}
    with ExitStack() as stack:
        stack.enter_context(no_eos(thinking, base))
        for b in batches:  # warm-up (allocator, kernels, lazy init), short: the timed runs need no warm-up round
            bp, tp = base_prompts[:b], think_prompts[:b]
            base_hf_generate(base, bp, 8), base_cached_loop(base, bp, 8)
            for gran in ("sentence", "token"):
                hybrid_run(mk(granularity=gran, max_new_tokens=8, batch_size=b), bp, tp)
        steady = warm_until_steady(base, base_prompts[:1], device) if cuda else None
        # The reference probe: teacher-forced on the base's own greedy continuation of problem 0, timed inside the
        # rounds of the largest-N settings (same load as the hybrid); one untimed warm-up call.
        n_max = max(tokens)
        continuation = base_cached_loop(base, base_prompts[:1], n_max)[0]
        checkpoints = sorted({round(i * (n_max - 1) / (n_check - 1)) for i in range(n_check)})
        ref = Reference(thinking, base, sae, sae_layer, vectors, bias, steering_layer)
        probe = ReferenceProbe(ref, base_prompts[0], think_prompts[0], continuation, checkpoints, device)
        ReferenceProbe(ref, base_prompts[0], think_prompts[0], continuation, checkpoints, device)()
        for n in tokens:
            for b in batches:
                bp, tp = base_prompts[:b], think_prompts[:b]
                gens = generators(n, b, DIAGS)
                fns = {"base_hf_generate": lambda: base_hf_generate(base, bp, n),
                       "base_cached_loop": lambda: base_cached_loop(base, bp, n)}
                for key, gen in gens.items():
                    fns[key] = (lambda gen=gen: hybrid_run(gen, bp, tp))
                if n == n_max:
                    fns["reference_probe"] = probe
                C.log(f" N={n} batch={b}")
                times, results = C.interleaved(fns, repeats, device, warmup=False)
                times.pop("reference_probe", None)
                med = {k: C.median(v) for k, v in times.items()}
                counts = {"base_hf_generate": sum(len(x) for x in results["base_hf_generate"]),
                          "base_cached_loop": sum(len(x) for x in results["base_cached_loop"])}
                for key in gens:
                    counts[key] = sum(r["n_tokens"] for r in results[key])
                tps = {k: counts[k] / med[k] for k in med}
                base_best = max(tps["base_hf_generate"], tps["base_cached_loop"])
                hs = results["hybrid_sentence"]
                row = {
                    "new_tokens": n, "batch": b, "tokens_generated": counts,
                    "seconds": {k: {"median": med[k], "all": v} for k, v in times.items()},
                    "tokens_per_s": tps,
                    "hybrid_over_base": {k: tps[k] / base_best for k in gens},
                    "greedy_agree_hf_vs_loop": results["base_hf_generate"] == results["base_cached_loop"],
                    "hybrid_stats": {k: {"disagreement_rate": _mean(r["disagreement_rate"] for r in results[k]),
                                         "steered_fraction": _mean(r["steered_fraction"] for r in results[k]),
                                         "decisions_per_token": sum(r["n_decisions"] for r in results[k]) / counts[k],
                                         "drafts_per_token": sum(r["n_drafts"] for r in results[k]) / counts[k]}
                                     for k in gens},
                    "_disagreement": _mean(r["disagreement_rate"] for r in hs),
                }
                drafts = [k for k in gens if "shared_drafts" in k]
                if n == n_max and drafts:
                    # sequential model calls: what a launch-bound GPU pays for, measurable on any machine
                    row["forward_calls"] = {k: count_forwards(lambda gen=gens[k]: hybrid_run(gen, bp, tp),
                                                              thinking=thinking, base=base)
                                            for k in ["hybrid_sentence", "hybrid_token"] + drafts}
                settings_rows.append(row)
                C.log("   tokens/s " + ", ".join(f"{k} {v:.0f}" for k, v in tps.items()))
                save_partial(args, model_info, settings_rows, probe)
                missed = min(row["hybrid_over_base"][k] for k in ("hybrid_sentence", "hybrid_token")) < TARGET_BASE
                last = (n, b) == (tokens[-1], batches[-1])
                if not args.no_profile and (args.profile or missed) and last and "hybrid" not in profile:
                    gen = gens["hybrid_sentence"]
                    fwd = {"hybrid_sentence": count_forwards(lambda: hybrid_run(gen, bp, tp), thinking=thinking,
                                                             base=base),
                           "base_cached_loop": count_forwards(lambda: base_cached_loop(base, bp, n), base=base)}
                    # torch.profiler keeps every op event in memory: profile a shorter run of the same batch
                    n_prof = min(n, 64)
                    short = mk(granularity="sentence", max_new_tokens=n_prof, batch_size=b)
                    profile["hybrid"] = {"setting": {"new_tokens": n, "batch": b, "mode": "sentence"},
                                         "forward_calls": fwd,
                                         "python": C.profile_top(lambda: hybrid_run(gen, bp, tp), 25),
                                         f"torch_ops_first_{n_prof}_tokens": C.torch_profile_top(
                                             lambda: hybrid_run(short, bp, tp), device)}

        # ---- the reference: its cost model (probe timings), checked against a few live steps from the prompt
        cost_rows = probe.rows()
        for row in cost_rows:
            C.log(f"  reference at +{row['generated']} tokens: agree {row['agree_s'] * 1e3:.1f} ms, "
                  f"disagree {row['disagree_s'] * 1e3:.1f} ms")
        live = {"steps": 0, "seconds": [], "disagree": []}
        bseq, tseq = list(base_prompts[0]), list(think_prompts[0])
        for _ in range(n_live):
            t0 = time.perf_counter()
            tok, dis = ref.step(bseq, tseq)
            C.sync(device)
            live["seconds"].append(time.perf_counter() - t0)
            live["disagree"].append(dis)
            bseq.append(tok)
            tseq.append(tok)
        live["steps"] = n_live
        if n_live:
            live["measured_s"] = sum(live["seconds"])
            live["predicted_s"] = sum(interp(cost_rows, "disagree_s" if d else "agree_s", t)
                                      for t, d in enumerate(live["disagree"]))

    # ---- natural lengths: every method runs each problem to its own eos (no masking), as eval.py does
    natural_rows = []
    if args.natural:
        n_nat = args.natural_problems or (4 if args.quick else 32)
        nat = make_splits(0, n_train=1000)["test"][:n_nat]
        nat_pairs = [mk().prompts(pr.question) for pr in nat]
        nbp, ntp = [pr[0] for pr in nat_pairs], [pr[1] for pr in nat_pairs]
        for b in batches:
            gens = generators(n_max, b, ("untracked", "no_speculative", "shared_drafts", "unshared_drafts"))
            # base-only does the same work: each problem as many decode steps as the hybrid took on it (its eos
            # masked), its row leaving the batch when done. Every count is of decode steps (eos step included).
            lengths = [r["n_steps"] for r in hybrid_run(gens["hybrid_sentence"], nbp, ntp)]

            def base_same_lengths(b=b, lengths=lengths):
                with no_eos(base):
                    return base_cached_loop_lengths(base, nbp, lengths, b)

            fns = {"base_cached_loop_same_lengths": base_same_lengths}
            for key, gen in gens.items():
                fns[key] = (lambda gen=gen: hybrid_run(gen, nbp, ntp))
            C.log(f" natural lengths: {n_nat} problems, batch={b}")
            times, results = C.interleaved(fns, repeats, device, warmup=True)
            med = {k: C.median(v) for k, v in times.items()}
            counts = {"base_cached_loop_same_lengths": sum(len(x) for x in results["base_cached_loop_same_lengths"])}
            counts.update({k: sum(r["n_steps"] for r in results[k]) for k in gens})
            tps = {k: counts[k] / med[k] for k in med}
            natural_rows.append({
                "batch": b, "problems": n_nat, "max_new_tokens": n_max, "tokens_generated": counts,
                "seconds": {k: {"median": med[k], "all": v} for k, v in times.items()}, "tokens_per_s": tps,
                "hybrid_over_base": {k: tps[k] / tps["base_cached_loop_same_lengths"] for k in gens},
                "mean_tokens_per_problem": {k: counts[k] / n_nat for k in counts}})
            C.log("   tokens/s " + ", ".join(f"{k} {v:.0f}" for k, v in tps.items()))

    # ---- figures
    result = C.header("hybrid", args, device)
    for row in settings_rows:
        n, p_dis = row["new_tokens"], row.pop("_disagreement")
        ref_s = {"p_measured": reference_seconds(cost_rows, n, p_dis), "p0": reference_seconds(cost_rows, n, 0.0),
                 "p1": reference_seconds(cost_rows, n, 1.0)}
        ref_tps = {k: n / v for k, v in ref_s.items()}  # batch 1; no batching in the reference: same at batch 16
        row["reference"] = {"disagreement_rate_used": p_dis, "seconds_per_problem_extrapolated": ref_s,
                            "tokens_per_s": ref_tps}
        row["hybrid_over_reference"] = {k: {pk: row["tokens_per_s"][k] / v for pk, v in ref_tps.items()}
                                        for k in ("hybrid_sentence", "hybrid_token")}
    n_max = max(tokens)
    final = [r for r in settings_rows if r["new_tokens"] == n_max]
    min_base = min(r["hybrid_over_base"][k] for r in final for k in ("hybrid_sentence", "hybrid_token"))
    modes = ("hybrid_sentence", "hybrid_token")
    min_ref = min(r["hybrid_over_reference"][k]["p_measured"] for r in final for k in modes)
    min_ref_p0 = min(r["hybrid_over_reference"][k]["p0"] for r in final for k in modes)
    result.update({
        "models": model_info,
        "setup": {"steering_layer": steering_layer, "sae_layer": sae_layer, "n_latents": n_latents, "k": 3,
                  "tokens": tokens, "batches": batches, "repeats": repeats,
                  "eos": "masked to -inf in both models for every method (fixed-length generations)",
                  "hybrid_settings": f"defaults (plain mode, coefficient {coefficient}, bias always, "
                                     "track_unsteered=True, draft='sentence', lazy thinking, draft reuse and "
                                     "speculative='single_row' where the module has them)",
                  "artifacts": artifacts,
                  "reference": {"coefficients": REF_COEFFICIENTS, "windows": REF_WINDOWS,
                                "forwards_per_token": {"agree": 3,
                                                       "disagree": 3 + len(REF_COEFFICIENTS) * len(REF_WINDOWS)},
                                "cost_model": "step costs measured at these prefix lengths inside the interleaved "
                                              "rounds of the largest-N settings (medians), linear interpolation, "
                                              "summed over the N steps; batch 16 = 16 problems one after another"},
                  "timing": "interleaved rounds (after a short 8-token warm-up of every method and, on a GPU, "
                            "base-only loops until two in a row agree within 10%); medians",
                  "gpu_warm_up": steady},
        "settings": settings_rows,
        "natural_lengths": natural_rows,
        "reference_step_costs": cost_rows,
        "reference_live_check": live,
        "targets": {
            "hybrid_over_base": {"what": f"hybrid >= {TARGET_BASE} x base-only (the faster of HF generate and the "
                                         f"cached loop) at {n_max} tokens, both modes, every batch",
                                 "min_ratio": min_base, "met": min_base >= TARGET_BASE},
            "hybrid_over_reference": {"what": f"hybrid >= {TARGET_REF} x reference at {n_max} tokens, both modes, "
                                              "every batch (reference with the measured disagreement rate)",
                                      "min_ratio": min_ref, "min_ratio_if_never_disagreeing": min_ref_p0,
                                      "met": min_ref >= TARGET_REF},
        },
    })
    if profile:
        result["profile"] = profile
    C.emit(result, args)
    if args.out:
        Path(args.out + ".partial").unlink(missing_ok=True)


def save_partial(args, model_info: dict, settings_rows: list, probe: "ReferenceProbe") -> None:
    """With --out, the settings measured so far (and the reference timings so far) in OUT.partial, rewritten after
    each setting and removed once OUT is written: a run killed by a timeout (a short GPU lease) keeps its figures."""
    if not args.out:
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".partial").write_text(json.dumps(
        {"partial": True, "argv": sys.argv[1:], "models": model_info, "settings": settings_rows,
         "reference_step_costs": probe.rows()}, indent=1, default=C._json_default))


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


if __name__ == "__main__":
    main()
