"""Steering vectors in the base model: one per behavior (SAE latent) plus a bias vector (METHOD.md step 6).

Data flow
---------
    traces (iter_traces)             ┐
    sentence index (ActivationStore) ├─ build_examples ─▶ per latent: Examples (train / val) ─┐
    SAE codes + argmax of the        ┘  (top 2n by latent activation, then the n the base      │
      sentence activations              model finds hardest, seeded train/val split)          ├─ train_vector ─▶ v
    traces ─ bias_examples ─▶ whole thinking traces as targets (train / val) ─────────────────┘
    vector + held-out contexts ─ hit_rates ─▶ steered / unsteered / random-vector hit rates (base generates a
                                  sentence, thinking model + SAE classify it)
    vectors + metadata ─ save_vectors ─▶ vectors.safetensors + vectors.json   (load_vectors reads them back)

`train_steering` runs all of it for one taxonomy.

One example (`Example`)
-----------------------
For a thinking sentence s of trace T (char span [c0, c1) in ``T.prompt + T.completion``, thinking span starting at
t0):

    context = base_prompt(question) + " " + text[t0:c0].lstrip()     # the thinking text so far, verbatim
    target  = text[c0:c1]                                             # the sentence itself

``context + target`` is tokenised ONCE (no special tokens), with the tokenizer's BOS prepended when the tokenizer
adds one (Llama, the organism; not Qwen). Target tokens are those whose character span reaches into the target
(a token like "▁Plan" that starts on the separating space belongs to the target; a lone "▁" token stays in the
context), so no special token can appear at the seam. The context always ends with the separator (" " or a
newline), as in the base model's documents.

Where the vector is added (the one convention, shared with the hybrid generator)
--------------------------------------------------------------------------------
Through `hooks.add_to_resid_post` at block `layer` (``blocks.{layer}.hook_resid_post``), at every position p whose
*next-token prediction is a target token*: p = t_start - 1 … t_end - 2 (the last context token up to the
second-to-last target token). This is exactly what a KV-cached generator does when it steers "the current last
position" while producing each token of the sentence: when token t+1 is generated the vector is added at position
t, and the cache keeps it at every earlier generated position. (Adding it also at the last target token would not
change the loss: that position only predicts the token after the sentence.) `generate_sentences` implements the
generator side and a test checks that both give the same logits.

Objective
---------
``ce``: mean cross-entropy of the target tokens (token-weighted over a batch / split) under the base model with the
vector added. ``kl``: mean KL(thinking ‖ steered base) of the next-token distributions at the same positions; the
thinking model reads its own chat prompt + the same thinking text (``text[:c1]`` of the trace, verbatim). The two
models must share a tokenizer; where the two tokenisations disagree on a target token (only at the seam: "▁Plan"
after the base prompt vs "Plan" after "<think>\\n") that position falls back to the CE of the base token.
Adam (lr 1e-2), cosine decay to 0 over max_epochs x steps_per_epoch, early stopping on the validation loss
(patience epochs without improvement; the best vector is kept), optional max_norm (projection after each step).
Batches are bucketed by length (`bucketed_batches`: a seeded shuffle, runs of 8 batches sorted by length, batch
order shuffled), and evaluation batches run shortest first, so padding stays small. The vector starts at ZERO: the
loss before training is the unsteered loss, and training is deterministic. The base model's weights are frozen
(requires_grad off while training); the vector is float32 and cast to the model's dtype inside the hook. Each
behavior vector is trained without the bias vector (the hybrid adds both).

Bias vector: one example per trace, context = base_prompt(question) + " ", target = the whole thinking text
(stripped); examples are a seeded sample of the traces, trained the same way.

Causal validation (no LLM)
--------------------------
For held-out contexts of latent b (its validation examples, then other sentences assigned to b that were neither
trained nor validated on, up to n_hit_examples), the base model greedily generates one sentence (stops at a sentence end
as `sentences.split_sentences` defines it, at EOS or after `max_new_tokens`) with vector b added at every generated
position (same hook and convention as above), with no vector, and with a random vector of the same norm. Each
generated sentence is classified by the thinking model + SAE: the thinking model reads ``text[:c0]`` of the trace
(its own chat prompt and thinking so far) + the stripped sentence; the mean of its ``blocks.{sae_layer}
.hook_resid_post`` over the sentence's tokens (same token assignment and pooling as `activations.py`) goes through
`sae.behavior` (the SAE normalises raw vectors itself), unless the SAE reconstructs that vector worse than 99% of
the latent's own members (`latent_error_limits`, from the activations the SAE was trained on): then it is *outside*
the taxonomy, since the argmax names some latent for any input. Why: on the organism the SAE's sentence means carry
the sentence's position strongly, and a direct answer written where the plan belongs lands in the plan latent by
its argmax, with a reconstruction error twice the plan members' worst. Hit rate = fraction classified as b; an
empty or outside generation is a miss. With a ground-truth labeller (`label_fn`) the generations' true labels are
reported beside the SAE's.

The same three conditions are also run at held-out contexts where the thinking model went on with ANOTHER behavior
(`elsewhere_contexts`: the other latents' hit contexts in turn; `hit_rates_elsewhere` in the record): where b is
due, a base model that already knows *when* puts b there unsteered too, so a rate at ceiling says nothing about the
vector; elsewhere, the unsteered rate is low and the vector must cause b itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load, load_file, save as safetensors_save
from torch import Tensor
from tqdm.auto import tqdm

from sae_reasoning.activations import resid_post, trace_text
from sae_reasoning.artifacts import atomic_write_bytes, atomic_write_json, fingerprint
from sae_reasoning.errors import UserError
from sae_reasoning.hooks import add_to_resid_post, positions_delta
from sae_reasoning.models import LoadedModel, resid_post_hook_name
from sae_reasoning.prompts import base_prompt
from sae_reasoning.sentences import Sentence, attach_token_spans, split_sentences, thinking_span

VECTORS_FILE = "vectors.safetensors"
META_FILE = "vectors.json"
PARTIAL_DIR = "vectors.partial"  # <key>.safetensors + <key>.json per finished vector while training (resume)
MIN_EXAMPLES = 8  # behaviors with fewer usable examples get no vector (reported in meta["skipped"])
BIAS = "bias"


def vector_key(latent: int) -> str:
    return f"latent_{latent}"


# ================================================================================================ examples


@dataclass
class Example:
    """One training example: tokens of ``context + target`` and where the target is.

    `input_ids` include the BOS (if any); target tokens are ``input_ids[t_start:t_end]``; the vector is added (and
    the loss read) at positions ``t_start - 1 … t_end - 2``. `thinking_prefix` is the thinking model's own text
    before the target (trace ``text[:c0]``), used by the KL objective and for classifying generations.
    """

    trace_id: str
    sentence_index: int | None  # None for bias examples
    question: str
    context: str
    target: str
    thinking_prefix: str
    input_ids: list[int]
    t_start: int
    t_end: int
    activation: float = float("nan")  # the latent's activation (selection score); nan for bias examples
    base_loss: float = float("nan")  # unsteered mean CE of the target tokens (hardness)

    @property
    def n_context_tokens(self) -> int:
        return self.t_start

    @property
    def context_ids(self) -> list[int]:
        return self.input_ids[: self.t_start]


@dataclass
class BehaviorExamples:
    latent: int
    train: list[Example]
    val: list[Example]
    n_candidates: int  # sentences assigned to the latent
    n_too_long: int = 0
    # more held-out contexts for the hit rates: assigned sentences outside train and val (a seeded sample)
    holdout: list[Example] = field(default_factory=list)

    def hit_contexts(self, n: int) -> list[Example]:
        """Up to n held-out contexts: the validation examples first, then the extra held-out ones."""
        return (self.val + self.holdout)[:n]


def bos_prefix(tokenizer: Any) -> list[int]:
    """[bos_id] if the tokenizer puts a BOS in front of a text when adding special tokens, else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if len(with_special) > len(without) and with_special[0] == bos else []


def tokenize_example(tokenizer: Any, context: str, target: str, bos: Sequence[int] | None = None
                     ) -> tuple[list[int], int, int]:
    """Tokenise ``context + target`` once; returns (ids with the BOS prefix, t_start, t_end) of the target tokens.

    A token belongs to the target when its character span reaches into ``[len(context), len(text))``; special
    tokens (empty spans) never do. Raises ValueError if the target has no token or the context none.
    """
    bos = bos_prefix(tokenizer) if bos is None else list(bos)
    text = context + target
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    c0, c1 = len(context), len(text)
    in_target = [b > a and b > c0 and a < c1 for a, b in enc["offset_mapping"]]
    idx = [i for i, t in enumerate(in_target) if t]
    if not idx:
        raise ValueError(f"target {target!r} has no token")
    first, last = idx[0], idx[-1]
    if idx != list(range(first, last + 1)):
        raise ValueError(f"target {target!r} tokens are not contiguous")
    if len(bos) + first == 0:
        raise ValueError("the context has no token: nothing predicts the first target token")
    return bos + list(enc["input_ids"]), len(bos) + first, len(bos) + last + 1


def sentence_example(trace: Mapping, char_start: int, char_end: int, tokenizer: Any, *, sentence_index=None,
                     bos: Sequence[int] | None = None) -> Example:
    """The example of the thinking sentence at ``[char_start, char_end)`` of ``trace``'s text (see module doc)."""
    text = trace_text(trace)
    t0, _ = thinking_span(text)
    if not t0 <= char_start < char_end <= len(text):
        raise ValueError(f"sentence span [{char_start}, {char_end}) is outside the thinking part of trace "
                         f"{trace['id']!r}")
    so_far = text[t0:char_start].lstrip()
    context = base_prompt(trace["question"]) + " " + so_far
    target = text[char_start:char_end]
    ids, a, b = tokenize_example(tokenizer, context, target, bos)
    return Example(trace_id=str(trace["id"]), sentence_index=sentence_index, question=trace["question"],
                   context=context, target=target, thinking_prefix=text[:char_start], input_ids=ids, t_start=a,
                   t_end=b)


def bias_example(trace: Mapping, tokenizer: Any, bos: Sequence[int] | None = None) -> Example | None:
    """Context = base prompt + " ", target = the whole thinking text of the trace (stripped); None if empty."""
    text = trace_text(trace)
    t0, t1 = thinking_span(text)
    raw = text[t0:t1]
    if not raw.strip():
        return None
    c0 = t0 + len(raw) - len(raw.lstrip())
    c1 = t0 + len(raw.rstrip())
    context = base_prompt(trace["question"]) + " "
    ids, a, b = tokenize_example(tokenizer, context, text[c0:c1], bos)
    return Example(trace_id=str(trace["id"]), sentence_index=None, question=trace["question"], context=context,
                   target=text[c0:c1], thinking_prefix=text[:c0], input_ids=ids, t_start=a, t_end=b)


def sae_codes(sae: Any, activations: Tensor, batch: int = 65536) -> tuple[Tensor, Tensor]:
    """Dense SAE codes ``[n, n_latents]`` and argmax behaviors ``[n]`` of RAW sentence activations ``[n, d]``."""
    codes, assign = [], []
    with torch.no_grad():
        for i in range(0, len(activations), batch):
            x = activations[i: i + batch].float()
            codes.append(sae.encode(x))
            assign.append(sae.behavior(x))
    return torch.cat(codes), torch.cat(assign)


OUTSIDE = -1  # classify_sentences: a sentence the SAE reconstructs worse than any of its latents' members


@torch.no_grad()
def reconstruction_errors(sae: Any, activations: Tensor, batch: int = 65536) -> Tensor:
    """Per vector, the SAE's squared reconstruction error in its normalised space (unit-norm inputs: 0 = exact)."""
    out = []
    for i in range(0, len(activations), batch):
        x_n = sae.normalise(activations[i: i + batch].float())
        out.append((sae.decode(sae.encode_normalised(x_n)) - x_n).pow(2).sum(-1))
    return torch.cat(out)


def latent_error_limits(errors: Tensor, assign: Tensor, quantile: float = 0.99) -> dict[int, float]:
    """Per latent, the `quantile` of its members' reconstruction errors: beyond it a sentence is not one of them."""
    limits = {}
    for latent in assign.unique().tolist():
        e = errors[assign == latent].float()
        limits[int(latent)] = float(e.quantile(quantile)) if len(e) >= 20 else float(e.max())
    return limits


def split_train_val(items: Sequence, val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split; at least one item on each side when there are two or more."""
    n = len(items)
    n_val = min(max(1, round(n * val_fraction)), n - 1) if n >= 2 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in perm[n_val:]], [items[i] for i in perm[:n_val]]


def build_examples(traces: Sequence[Mapping], index: Sequence[Mapping], codes: Tensor, assign: Tensor,
                   latents: Sequence[int], n_examples: int, *, base: LoadedModel, val_fraction: float = 0.2,
                   seed: int = 0, min_examples: int = MIN_EXAMPLES, batch_size: int = 16,
                   max_tokens: int | None = None, n_holdout: int = 0, progress: bool = False
                   ) -> tuple[dict[int, BehaviorExamples], dict[int, str]]:
    """Training examples of each behavior latent, selected as in the paper.

    traces: trace records (id, question, prompt, completion); index: the sentence index of the activation store
    (trace_id, sentence_index, char_start, char_end, text), one record per row of `codes` / `assign`;
    codes ``[n, n_latents]`` dense SAE codes, assign ``[n]`` argmax latent of each sentence.
    For latent b: the sentences assigned to b, the ``2 * n_examples`` with the highest activation of b (ties: index
    order), minus those longer than `max_tokens` (default: the base model's context), then the ``n_examples`` with
    the highest unsteered target CE under the base model; a seeded train/val split (val_fraction).
    `n_holdout`: also tokenise up to that many other sentences of the latent (neither train nor val; a seeded
    sample) as extra held-out contexts for the hit rates.
    Returns ({latent: BehaviorExamples}, {latent: reason}) — latents with fewer than `min_examples` usable examples
    are left out and reported with the reason.
    """
    if len(index) != len(codes) or len(codes) != len(assign):
        raise UserError(f"the sentence index has {len(index)} records but there are {len(codes)} codes and "
                        f"{len(assign)} assignments: the activations and the SAE codes must cover the same sentences")
    by_id = {str(t["id"]): t for t in traces}
    tok = base.tokenizer
    bos = bos_prefix(tok)
    max_tokens = max_tokens or getattr(base.model.config, "max_position_embeddings", None)
    codes, assign = codes.detach().float().cpu(), assign.detach().cpu()
    out: dict[int, BehaviorExamples] = {}
    skipped: dict[int, str] = {}
    for latent in latents:
        members = (assign == latent).nonzero().flatten()
        if len(members) == 0:
            skipped[latent] = "no sentence is assigned to this latent"
            continue
        order = torch.sort(codes[members, latent], descending=True, stable=True).indices
        top = members[order[: 2 * n_examples]].tolist()
        cands, too_long = [], 0
        for i in top:
            ex = _index_example(i, index, by_id, tok, bos)
            if max_tokens is not None and len(ex.input_ids) > max_tokens:
                too_long += 1
                continue
            ex.activation = float(codes[i, latent])
            cands.append(ex)
        if len(cands) < min_examples:
            skipped[latent] = (f"only {len(cands)} usable examples ({len(members)} assigned sentences, {too_long} too "
                               f"long) < min_examples={min_examples}")
            continue
        losses = example_losses(base, None, cands, layer=0, batch_size=batch_size, progress=progress,
                                desc=f"hardness latent {latent}")
        for ex, loss in zip(cands, losses.tolist()):
            ex.base_loss = loss
        hard = sorted(range(len(cands)), key=lambda j: -cands[j].base_loss)[:n_examples]
        kept = [cands[j] for j in sorted(hard)]
        train, val = split_train_val(kept, val_fraction, seed + latent)
        used = {(e.trace_id, e.sentence_index) for e in kept}
        holdout = []
        if n_holdout > 0:
            perm = torch.randperm(len(members), generator=torch.Generator().manual_seed(seed + latent + 1))
            for i in members[perm].tolist():
                if len(holdout) >= n_holdout:
                    break
                rec = index[i]
                if (str(rec["trace_id"]), rec.get("sentence_index")) in used:
                    continue
                ex = _index_example(i, index, by_id, tok, bos)
                if max_tokens is None or len(ex.input_ids) <= max_tokens:
                    ex.activation = float(codes[i, latent])
                    holdout.append(ex)
        out[latent] = BehaviorExamples(latent, train, val, n_candidates=len(members), n_too_long=too_long,
                                       holdout=holdout)
    return out, skipped


def _index_example(i: int, index: Sequence[Mapping], by_id: Mapping[str, Mapping], tokenizer: Any,
                   bos: Sequence[int]) -> Example:
    rec = index[i]
    trace = by_id.get(str(rec["trace_id"]))
    if trace is None:
        raise UserError(f"sentence {i} of the index belongs to trace {rec['trace_id']!r}, which is not in the "
                        "traces: pass the traces the activations were extracted from")
    ex = sentence_example(trace, rec["char_start"], rec["char_end"], tokenizer,
                          sentence_index=rec.get("sentence_index"), bos=bos)
    if ex.target != rec["text"]:
        raise UserError(f"index record {i} (trace {rec['trace_id']!r}) has text {rec['text']!r} but its span "
                        f"holds {ex.target!r}: the index does not belong to these traces")
    return ex


def bias_examples(traces: Sequence[Mapping], n_examples: int, tokenizer: Any, *, val_fraction: float = 0.2,
                  seed: int = 0, max_tokens: int | None = None) -> tuple[list[Example], list[Example]]:
    """A seeded sample of `n_examples` traces as bias examples (whole thinking text as target), split train/val."""
    bos = bos_prefix(tokenizer)
    exs = [e for e in (bias_example(t, tokenizer, bos) for t in traces)
           if e is not None and (max_tokens is None or len(e.input_ids) <= max_tokens)]
    perm = torch.randperm(len(exs), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [exs[i] for i in sorted(perm[:n_examples])]
    return split_train_val(chosen, val_fraction, seed)


# ================================================================================================ objective


@dataclass
class Batch:
    """Right-padded tokens and masks of a list of examples. Shapes ``[batch, pos]``.

    steer_mask: positions whose next token is a target token (vector added and loss read there);
    labels: the next token at those positions (-100 elsewhere).
    """

    input_ids: Tensor
    attention_mask: Tensor
    steer_mask: Tensor
    labels: Tensor


def collate(examples: Sequence[Example], pad_id: int, device: Any = "cpu") -> Batch:
    width = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.bool)
    labels = torch.full((B, width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        mask[i, e.t_start - 1: e.t_end - 1] = True
        labels[i, e.t_start - 1: e.t_end - 1] = ids[i, e.t_start: e.t_end]
    return Batch(ids.to(device), attn.to(device), mask.to(device), labels.to(device))


def steered_logits(lm: LoadedModel, vector: Tensor | None, batch: Batch, layer: int) -> Tensor:
    """Base-model logits ``[n_target_tokens, vocab]`` (float32) at the steered positions of `batch`, with `vector`
    ``[d_model]`` (or None: unsteered) added at those positions of block `layer`'s output."""
    model = lm.model

    def run():
        return model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           use_cache=False).last_hidden_state

    if vector is None:
        hidden = run()
    else:
        with add_to_resid_post(model, layer, positions_delta(vector, batch.steer_mask)):
            hidden = run()
    return _upcast(model.get_output_embeddings()(hidden[batch.steer_mask]))


def _upcast(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 logits are upcast; a float64 model stays float64, for gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _thinking_batch(examples: Sequence[Example], tokenizer: Any, device: Any) -> tuple[Batch, list[list[int]]]:
    """The thinking model's view of the examples: its own text (prefix + target), and its target token ids."""
    rows, targets = [], []
    for e in examples:
        ids, a, b = tokenize_example(tokenizer, e.thinking_prefix, e.target, bos=[])
        rows.append(Example(e.trace_id, e.sentence_index, e.question, e.thinking_prefix, e.target,
                            e.thinking_prefix, ids, a, b))
        targets.append(ids[a:b])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return collate(rows, pad, device), targets


def batch_loss(lm: LoadedModel, vector: Tensor | None, examples: Sequence[Example], layer: int, *,
               objective: str = "ce", thinking: LoadedModel | None = None, reduce: bool = True) -> Tensor:
    """Loss of `examples` with `vector` added (see module doc). reduce: token-mean scalar; else the per-example
    mean over its target tokens ``[len(examples)]``."""
    device = lm.device
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    batch = collate(examples, pad, device)
    logits = steered_logits(lm, vector, batch, layer)  # [N, V]
    labels = batch.labels[batch.steer_mask]  # [N]
    per_token = F.cross_entropy(logits, labels, reduction="none")
    if objective == "kl":
        if thinking is None:
            raise UserError("steering.objective=kl needs the thinking model")
        tb, t_targets = _thinking_batch(examples, thinking.tokenizer, thinking.device)
        with torch.no_grad():
            t_hidden = thinking.model.model(input_ids=tb.input_ids, attention_mask=tb.attention_mask,
                                            use_cache=False).last_hidden_state
            t_logp = _upcast(thinking.model.get_output_embeddings()(t_hidden[tb.steer_mask])).log_softmax(-1)
        b_logp = logits.log_softmax(-1)
        if t_logp.shape[-1] != b_logp.shape[-1]:
            raise UserError(f"steering.objective=kl: the thinking model has {t_logp.shape[-1]} output tokens, the base "
                            f"{b_logp.shape[-1]}; use steering.objective=ce")
        # align example by example: KL where both tokenisations have the same target token, CE elsewhere
        use_kl = torch.zeros(len(labels), dtype=torch.bool, device=device)
        t_rows = torch.full((len(labels),), -1, dtype=torch.long, device=device)
        pos, t_pos = 0, 0
        for e, tt in zip(examples, t_targets):
            bt = e.input_ids[e.t_start: e.t_end]
            if len(bt) == len(tt):
                same = torch.tensor([x == y for x, y in zip(bt, tt)], device=device)
                use_kl[pos: pos + len(bt)] = same
                t_rows[pos: pos + len(bt)] = torch.arange(t_pos, t_pos + len(tt), device=device)
            pos += len(bt)
            t_pos += len(tt)
        kl = torch.zeros_like(per_token)
        if use_kl.any():
            tl = t_logp.to(device=device, dtype=b_logp.dtype)[t_rows[use_kl]]
            kl_vals = (tl.exp() * (tl - b_logp[use_kl])).sum(-1)
            kl = kl.masked_scatter(use_kl, kl_vals)
        per_token = torch.where(use_kl, kl, per_token)
    elif objective != "ce":
        raise UserError(f"steering.objective={objective!r}: use ce or kl")
    if reduce:
        return per_token.mean()
    counts = torch.tensor([e.t_end - e.t_start for e in examples], device=device)
    ex_id = torch.repeat_interleave(torch.arange(len(examples), device=device), counts)
    return torch.zeros(len(examples), device=device, dtype=per_token.dtype).index_add_(0, ex_id, per_token) / counts


def by_length(examples: Sequence[Example]) -> list[int]:
    """Indices of `examples` from shortest to longest (stable): batches of neighbours pad little."""
    return sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))


def bucketed_batches(examples: Sequence[Example], batch_size: int, gen: torch.Generator,
                     window: int = 8) -> list[list[int]]:
    """One epoch of training batches: a seeded shuffle, each run of ``window * batch_size`` examples sorted by
    length and cut into batches, the batches shuffled. Every example once; padding only between similar lengths
    (contexts of real thinking traces range from a few hundred to thousands of tokens)."""
    perm = torch.randperm(len(examples), generator=gen).tolist()
    batches = []
    for w in range(0, len(perm), window * batch_size):
        run = sorted(perm[w: w + window * batch_size], key=lambda i: len(examples[i].input_ids))
        batches += [run[i: i + batch_size] for i in range(0, len(run), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


@torch.no_grad()
def example_losses(lm: LoadedModel, vector: Tensor | None, examples: Sequence[Example], layer: int, *,
                   batch_size: int = 16, objective: str = "ce", thinking: LoadedModel | None = None,
                   progress: bool = False, desc: str = "loss") -> Tensor:
    """Per-example mean target loss ``[len(examples)]`` (CPU float32), in the order of `examples` (the batches
    run in length order)."""
    order = by_length(examples)
    out = torch.zeros(len(examples))
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[i: i + batch_size]
        out[idx] = batch_loss(lm, vector, [examples[j] for j in idx], layer, objective=objective,
                              thinking=thinking, reduce=False).float().cpu()
    return out


@torch.no_grad()
def split_loss(lm: LoadedModel, vector: Tensor | None, examples: Sequence[Example], layer: int, *,
               batch_size: int = 16, objective: str = "ce", thinking: LoadedModel | None = None) -> float:
    """Token-weighted mean target loss of a whole split (batches in length order)."""
    total, n = 0.0, 0
    order = by_length(examples)
    for i in range(0, len(examples), batch_size):
        chunk = [examples[j] for j in order[i: i + batch_size]]
        k = sum(e.t_end - e.t_start for e in chunk)
        total += float(batch_loss(lm, vector, chunk, layer, objective=objective, thinking=thinking)) * k
        n += k
    return total / max(n, 1)


@dataclass
class TrainSettings:
    """The optimisation settings (the fields of config.SteeringConfig that matter here)."""

    lr: float = 1e-2
    max_epochs: int = 50
    patience: int = 5
    batch_size: int = 16
    max_norm: float | None = None
    objective: str = "ce"
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any, seed: int = 0) -> "TrainSettings":
        d = cls()
        return cls(lr=float(getattr(cfg, "lr", d.lr)), max_epochs=int(getattr(cfg, "max_epochs", d.max_epochs)),
                   patience=int(getattr(cfg, "patience", d.patience)),
                   batch_size=int(getattr(cfg, "batch_size", d.batch_size)),
                   max_norm=getattr(cfg, "max_norm", None), objective=str(getattr(cfg, "objective", d.objective)),
                   seed=seed)


@dataclass
class TrainedVector:
    vector: Tensor  # [d_model] float32, CPU
    train_loss_before: float
    train_loss_after: float
    val_loss_before: float
    val_loss_after: float
    best_epoch: int
    epochs: int
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, train_loss (running), val_loss, lr, norm


def train_vector(lm: LoadedModel, train: Sequence[Example], val: Sequence[Example], layer: int,
                 settings: TrainSettings | None = None, *, thinking: LoadedModel | None = None,
                 progress: bool = True, desc: str = "vector", log: Any = None) -> TrainedVector:
    """Optimise one vector added at block `layer` (see module doc). `log(epoch_record)` is called every epoch."""
    s = settings or TrainSettings()
    if not train or not val:
        raise ValueError(f"{desc}: need training and validation examples (have {len(train)} / {len(val)})")
    device = lm.device
    flags = [p.requires_grad for p in lm.model.parameters()]
    for p in lm.model.parameters():
        p.requires_grad_(False)
    try:
        # evaluation runs without gradients: twice the training batch fits where training does
        kw = dict(batch_size=2 * s.batch_size, objective=s.objective, thinking=thinking)
        vec = torch.zeros(lm.d_model, device=device, dtype=torch.float32, requires_grad=True)
        train_before = split_loss(lm, None, train, layer, **kw)
        val_before = split_loss(lm, None, val, layer, **kw)
        best_val, best_vec, best_epoch = val_before, vec.detach().clone(), 0
        steps_per_epoch = math.ceil(len(train) / s.batch_size)
        opt = torch.optim.Adam([vec], lr=s.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, s.max_epochs * steps_per_epoch))
        gen = torch.Generator().manual_seed(s.seed)
        history, bad, epoch = [], 0, 0
        bar = tqdm(range(1, s.max_epochs + 1), desc=desc, disable=not progress, leave=False)
        for epoch in bar:
            running, n_tok = 0.0, 0
            for batch_idx in bucketed_batches(train, s.batch_size, gen):
                chunk = [train[j] for j in batch_idx]
                loss = batch_loss(lm, vec, chunk, layer, objective=s.objective, thinking=thinking)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if s.max_norm is not None:
                    with torch.no_grad():
                        norm = vec.norm()
                        if norm > s.max_norm:
                            vec.mul_(s.max_norm / norm)
                k = sum(e.t_end - e.t_start for e in chunk)
                running += float(loss.detach()) * k
                n_tok += k
            val_loss = split_loss(lm, vec.detach(), val, layer, **kw)
            rec = {"epoch": epoch, "train_loss": running / n_tok, "val_loss": val_loss,
                   "lr": opt.param_groups[0]["lr"], "norm": float(vec.detach().norm())}
            history.append(rec)
            if log is not None:
                log(rec)
            bar.set_postfix(val=f"{val_loss:.4f}", norm=f"{rec['norm']:.1f}")
            if val_loss < best_val:
                best_val, best_vec, best_epoch, bad = val_loss, vec.detach().clone(), epoch, 0
            else:
                bad += 1
                if bad >= s.patience:
                    break
        bar.close()
        train_after = split_loss(lm, best_vec, train, layer, **kw)
    finally:
        for p, f in zip(lm.model.parameters(), flags):
            p.requires_grad_(f)
    return TrainedVector(best_vec.cpu(), train_before, train_after, val_before, best_val, best_epoch, epoch, history)


# ================================================================================================ generation


@torch.no_grad()
def generate_sentences(lm: LoadedModel, contexts: Sequence[Sequence[int]], vectors: Tensor | None, layer: int, *,
                       max_new_tokens: int = 48, return_ids: bool = False
                       ) -> list[str] | tuple[list[str], list[list[int]]]:
    """Greedy continuation of each context (token ids, BOS included) by ONE sentence, KV-cached and batched.

    vectors: ``[batch, d_model]`` (one per row; a zero row = unsteered) or None. Row i's vector is added at block
    `layer` to the current last position of every forward (the last context token, then every generated token):
    the convention the vectors are trained with. Generation of a row stops at EOS or when `split_sentences` sees a
    finished first sentence (a second piece has begun), or after `max_new_tokens`. Returns the first sentence of
    each continuation (stripped; "" if none), and with return_ids the generated token ids.
    """
    model, tok = lm.model, lm.tokenizer
    device = lm.device
    B = len(contexts)
    width = max(len(c) for c in contexts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((B, width), pad, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    for i, c in enumerate(contexts):  # left padding: every row's last token is at the last position
        ids[i, width - len(c):] = torch.tensor(list(c))
        attn[i, width - len(c):] = 1
    ids, attn = ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    if vectors is not None:
        vectors = vectors.to(device)

    def delta(hidden: Tensor) -> Tensor | None:
        if vectors is None:
            return None
        d = torch.zeros_like(hidden)
        d[:, -1] = vectors.to(hidden.dtype)
        return d

    generated: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    past = None
    cur = ids
    with add_to_resid_post(model, layer, delta):
        for _ in range(max_new_tokens):
            out = model(input_ids=cur, attention_mask=attn, position_ids=pos, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)  # [B]
            for i in range(B):
                if done[i]:
                    continue
                t = int(nxt[i])
                if t == tok.eos_token_id:
                    done[i] = True
                    continue
                generated[i].append(t)
                text = tok.decode(generated[i], skip_special_tokens=False)
                if len(split_sentences(text, min_words=1)) >= 2:
                    done[i] = True
            if all(done):
                break
            cur = nxt[:, None]
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=1)
            pos = pos[:, -1:] + 1
    sentences = []
    for g in generated:
        pieces = split_sentences(tok.decode(g, skip_special_tokens=False), min_words=1)
        sentences.append(pieces[0].text if pieces else "")
    return (sentences, generated) if return_ids else sentences


@torch.no_grad()
def classify_sentences(thinking: LoadedModel, sae: Any, sae_layer: int, prefixes: Sequence[str],
                       sentences: Sequence[str], batch_size: int = 16,
                       error_limits: Mapping[int, float] | None = None) -> list[int | None]:
    """The SAE behavior of each sentence as the thinking model reads it after `prefix` (its own chat prompt and
    thinking text so far): mean of ``blocks.{sae_layer}.hook_resid_post`` over the sentence's tokens (token
    assignment of `sentences.attach_token_spans`, as in activations.py), then `sae.behavior`. None for an empty
    sentence. With `error_limits` (`latent_error_limits`), a sentence that the SAE reconstructs worse than its
    latent's members is OUTSIDE the taxonomy (-1): the argmax names *some* latent for any input, e.g. a direct
    answer written where the plan belongs lands in the plan latent by its position alone."""
    if sae.d_in != thinking.d_model:
        raise UserError(f"the SAE reads {sae.d_in}-dimensional vectors but the thinking model has d_model="
                        f"{thinking.d_model}: use the SAE trained on this thinking model")
    tok = thinking.tokenizer
    out: list[int | None] = [None] * len(sentences)
    todo = [i for i, s in enumerate(sentences) if s.strip()]
    for b in range(0, len(todo), batch_size):
        rows = todo[b: b + batch_size]
        seqs, spans = [], []
        for i in rows:
            prefix, sent = prefixes[i], sentences[i].strip()
            text = prefix + sent
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            s = attach_token_spans([Sentence(0, sent, len(prefix), len(text))], enc["offset_mapping"])[0]
            seqs.append(enc["input_ids"])
            spans.append((s.token_start, s.token_end))
        width = max(len(x) for x in seqs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for r, x in enumerate(seqs):
            ids[r, : len(x)] = torch.tensor(x)
            attn[r, : len(x)] = 1
        hidden = resid_post(thinking, ids.to(thinking.device), attn.to(thinking.device), [sae_layer])[sae_layer]
        means = torch.stack([hidden[r, a:e].float().mean(0) for r, (a, e) in enumerate(spans)])
        behaviors = sae.behavior(means.cpu()).tolist()
        errors = reconstruction_errors(sae, means.cpu()).tolist() if error_limits is not None else None
        for j, (i, beh) in enumerate(zip(rows, behaviors)):
            outside = errors is not None and errors[j] > error_limits.get(int(beh), float("inf"))
            out[i] = OUTSIDE if outside else int(beh)
    return out


def elsewhere_contexts(sets: Mapping[int, "BehaviorExamples"], latent: int, n: int) -> list[Example]:
    """Up to `n` held-out contexts where the thinking model went on with ANOTHER behavior: the other latents' hit
    contexts, taken in turn (one of each latent, then the next of each, ...), so every other behavior is present."""
    pools = [sets[o].hit_contexts(n) for o in sorted(sets) if o != latent]
    out: list[Example] = []
    for i in range(max((len(p) for p in pools), default=0)):
        out += [p[i] for p in pools if i < len(p)]
    return out[:n]


def random_like(vector: Tensor, seed: int) -> Tensor:
    """A random direction (seeded) with the norm of `vector`."""
    r = torch.randn(vector.shape, generator=torch.Generator().manual_seed(seed))
    return r / r.norm() * vector.float().norm().cpu()


def hit_rates(base: LoadedModel, thinking: LoadedModel, sae: Any, sae_layer: int, examples: Sequence[Example],
              vector: Tensor, latent: int, layer: int, *, max_new_tokens: int = 48, batch_size: int = 48,
              seed: int = 0, n_samples: int = 3, label_fn: Any = None, target_label: str | None = None,
              error_limits: Mapping[int, float] | None = None, progress: bool = False) -> dict[str, Any]:
    """Causal validation of one behavior vector on held-out contexts (see module doc).

    Returns {"n", "steered", "unsteered", "random" (hit rates), "classified" (per condition: latent -> count, "none"
    for empty generations), "samples" (a few generated sentences per condition)}; with `label_fn` (text -> ground-truth
    label or None, e.g. the organism's `label_sentence`) also "true_labels" (per condition: label -> count), which
    shows where the SAE classifier itself errs, and with `target_label` (the behavior the vector is for) "true_rates"
    (per condition: the share of generations whose true label is `target_label`).
    """
    vector = vector.float().cpu()
    conditions = {"steered": vector, "unsteered": torch.zeros_like(vector),
                  "random": random_like(vector, seed * 1_000_003 + latent)}
    res: dict[str, Any] = {"n": len(examples), "classified": {}, "samples": {}}
    # all conditions share the generation batches (one row per (condition, context))
    rows = [(name, e) for name in conditions for e in examples]
    generated: list[str] = []
    for i in tqdm(range(0, len(rows), batch_size), desc="hit rates", disable=not progress, leave=False):
        chunk = rows[i: i + batch_size]
        vs = torch.stack([conditions[name] for name, _ in chunk])
        generated += generate_sentences(base, [e.context_ids for _, e in chunk], vs, layer,
                                        max_new_tokens=max_new_tokens)
    for c, name in enumerate(conditions):
        sents = generated[c * len(examples): (c + 1) * len(examples)]
        labels = classify_sentences(thinking, sae, sae_layer, [e.thinking_prefix for e in examples], sents,
                                    batch_size=batch_size, error_limits=error_limits)
        res[name] = sum(lab == latent for lab in labels) / max(len(labels), 1)
        counts: dict[str, int] = {}
        for lab in labels:
            key = "none" if lab is None else "outside" if lab == OUTSIDE else str(lab)
            counts[key] = counts.get(key, 0) + 1
        res["classified"][name] = counts
        res["samples"][name] = sents[:n_samples]
        if label_fn is not None:
            truth: dict[str, int] = {}
            for sent in sents:
                key = str(label_fn(sent)) if sent else "none"
                truth[key] = truth.get(key, 0) + 1
            res.setdefault("true_labels", {})[name] = truth
            if target_label is not None:  # the hit rate by the ground truth: the SAE classifier's errors left out
                res.setdefault("true_rates", {})[name] = truth.get(str(target_label), 0) / max(len(sents), 1)
    if target_label is not None:
        res["target_label"] = target_label
    return res


# ================================================================================================ files


@dataclass
class SteeringVectors:
    """Vectors loaded by `load_vectors`: behavior latent -> ``[d_model]`` float32, the bias, their layer."""

    vectors: dict[int, Tensor]
    bias: Tensor | None
    layer: int
    titles: dict[int, str]
    model_id: str
    d_model: int
    hook_name: str
    meta: dict


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_vectors(directory: str | Path, vectors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Path:
    """Write ``vectors.safetensors`` (keys ``latent_{i}`` and ``bias``, float32) and ``vectors.json`` into
    `directory`. meta must hold model_id, layer and d_model; meta["vectors"][key] holds each vector's record (its
    norm is filled in here). The JSON is written last and records the tensor file's sha256, so a crash or a stray
    file is detected on load."""
    directory = Path(directory)
    for k in ("model_id", "layer", "d_model"):
        if k not in meta:
            raise ValueError(f"save_vectors: meta needs {k!r}")
    d_model = int(meta["d_model"])
    tensors = {}
    for key, v in vectors.items():
        if not (key == BIAS or re.fullmatch(r"latent_\d+", key)):
            raise ValueError(f"save_vectors: bad key {key!r} (use latent_<i> or bias)")
        v = v.detach().float().cpu().contiguous()
        if v.shape != (d_model,):
            raise ValueError(f"save_vectors: {key} has shape {tuple(v.shape)}, expected ({d_model},)")
        tensors[key] = v
    blob = safetensors_save(tensors)
    records = {k: dict(r) for k, r in dict(meta.get("vectors", {})).items()}
    for key, v in tensors.items():
        rec = records.setdefault(key, {})
        rec["norm"] = float(v.norm())
        if key != BIAS:
            rec.setdefault("latent", int(key.split("_")[1]))
    full = {**dict(meta), "layer": int(meta["layer"]), "d_model": d_model,
            "hook_name": resid_post_hook_name(int(meta["layer"])), "vectors": records,
            "tensor_file": VECTORS_FILE, "tensor_sha256": _sha256(blob)}
    atomic_write_bytes(directory / VECTORS_FILE, blob)
    atomic_write_json(directory / META_FILE, full)
    return directory


def load_vectors(directory: str | Path, model_id: str | None = None, layer: int | None = None,
                 d_model: int | None = None) -> SteeringVectors:
    """Read `save_vectors`' output and check it against the model it will steer (each check only if given).

    Raises a one-line UserError naming the mismatch (model id, layer, d_model) or the missing / corrupt file."""
    directory = Path(directory)
    meta_path, tensor_path = directory / META_FILE, directory / VECTORS_FILE
    fix = "run steer.py to (re)create the steering vectors"
    if not meta_path.exists() or not tensor_path.exists():
        missing = meta_path if not meta_path.exists() else tensor_path
        raise UserError(f"steering vectors: {missing} is missing; {fix} or point to the right folder")
    try:
        meta = json.loads(meta_path.read_text())
        blob = tensor_path.read_bytes()
        if meta.get("tensor_sha256") and meta["tensor_sha256"] != _sha256(blob):
            raise UserError(f"steering vectors: {tensor_path} does not match {meta_path} (checksum differs: corrupt or "
                            f"from another run); {fix}")
        tensors = load_file(str(tensor_path))
        rec_layer, rec_d, rec_model = int(meta["layer"]), int(meta["d_model"]), str(meta["model_id"])
    except UserError:
        raise
    except (json.JSONDecodeError, SafetensorError, KeyError, ValueError, TypeError, OSError) as exc:
        bad = meta_path if isinstance(exc, (json.JSONDecodeError, KeyError, TypeError)) else tensor_path
        raise UserError(f"steering vectors: {bad} is unreadable ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'}); {fix}") from None
    if model_id is not None and str(model_id) != rec_model:
        raise UserError(f"steering vectors in {directory} were trained on {rec_model!r}, not {model_id!r}: use vectors "
                        f"trained on this base model ({fix}) or set the base model to {rec_model!r}")
    if layer is not None and int(layer) != rec_layer:
        raise UserError(f"steering vectors in {directory} were trained at layer {rec_layer} "
                        f"({resid_post_hook_name(rec_layer)}), not layer {layer}: set steering.layer={rec_layer} or "
                        f"retrain at layer {layer} ({fix})")
    if d_model is not None and int(d_model) != rec_d:
        raise UserError(f"steering vectors in {directory} have d_model={rec_d} but the model has d_model={d_model}: "
                        f"they belong to another model; {fix}")
    vectors, titles, bias = {}, {}, None
    for key, t in tensors.items():
        if t.shape != (rec_d,):
            raise UserError(f"steering vectors: {key} in {tensor_path} has shape {tuple(t.shape)}, expected ({rec_d},);"
                            f" {fix}")
        if key == BIAS:
            bias = t.float()
        else:
            m = re.fullmatch(r"latent_(\d+)", key)
            if m is None:
                raise UserError(f"steering vectors: unexpected key {key!r} in {tensor_path}; {fix}")
            vectors[int(m.group(1))] = t.float()
            titles[int(m.group(1))] = str(meta.get("vectors", {}).get(key, {}).get("title", ""))
    return SteeringVectors(dict(sorted(vectors.items())), bias, rec_layer, titles, rec_model, rec_d,
                           meta.get("hook_name", resid_post_hook_name(rec_layer)), meta)


# ================================================================================================ orchestration


HIT_TABLE_COLUMNS = ["vector", "latent", "title", "norm", "n_train", "n_val", "val_loss_before", "val_loss_after",
                     "hit_steered", "hit_unsteered", "hit_random", "n_hit", "elsewhere_steered",
                     "elsewhere_unsteered", "elsewhere_random", "n_elsewhere"]


def train_steering(base: LoadedModel, traces: Sequence[Mapping], index: Sequence[Mapping], activations: Tensor,
                   sae: Any, *, layer: int, out_dir: str | Path, model_id: str | None = None, cfg: Any = None,
                   latents: Sequence[int] | None = None, titles: Mapping[int, str] | None = None,
                   thinking: LoadedModel | None = None, sae_layer: int | None = None, train_bias: bool = True,
                   seed: int = 0, min_examples: int = MIN_EXAMPLES, n_hit_examples: int = 64,
                   max_new_tokens: int = 48, generation_batch_size: int = 48, label_fn: Any = None,
                   tracker: Any = None, progress: bool = True,
                   extra_meta: Mapping[str, Any] | None = None, resume_key: str | None = None) -> dict:
    """Train the steering vectors of one taxonomy and write them to `out_dir` (vectors.safetensors + .json).

    Inputs: the base model; the thinking traces (records of `traces.iter_traces`); the activation store's sentence
    index (`ActivationStore.index()`) and its RAW sentence activations at the SAE layer (`store.load(sae_layer)`),
    same rows; the chosen SAE (`sae.load_sae`); `layer` = the base model's steering layer; `cfg` = a
    config.SteeringConfig-like object (n_examples, val_fraction, lr, max_epochs, patience, batch_size, max_norm,
    objective); `latents` (default: every latent some sentence is assigned to) and their `titles` (from the chosen
    taxonomy). With `thinking` (and `sae_layer`) each vector gets hit rates on up to `n_hit_examples` held-out
    contexts (`label_fn`: optional ground-truth labeller of generated sentences, reported beside them, e.g.
    `pipeline.label_function(cfg)`). `tracker` (tracking.Tracker) receives loss curves
    (steer/<key>/{train_loss,val_loss,norm}) and the hit-rate table (steer/hit_rates). Returns the metadata written to
    vectors.json.

    `resume_key` (a fingerprint of everything outside these arguments that the vectors depend on: model files,
    SAE checkpoint, taxonomy; `pipeline.steer` passes one) turns on resuming: each finished vector (with its
    record and hit rates) is saved under ``out_dir/vectors.partial/<key>.*`` as soon as it is trained, and a rerun
    into the same `out_dir` reuses those whose stamp (resume_key, settings, the exact examples) matches, so a
    killed run loses at most the vector in progress. The folder is removed once vectors.json is written.
    """
    n_examples = int(getattr(cfg, "n_examples", 256))
    val_fraction = float(getattr(cfg, "val_fraction", 0.2))
    settings = TrainSettings.from_config(cfg, seed) if cfg is not None else TrainSettings(seed=seed)
    if not 0 <= layer < base.n_layers:
        raise UserError(f"steering layer {layer} does not exist: the base model has {base.n_layers} layers "
                        f"(0..{base.n_layers - 1}); fix steering.layer / model.steering_layer")
    if settings.objective == "kl":
        check_same_tokenizer(base, thinking)
    if thinking is not None and sae_layer is None:
        raise UserError("train_steering: pass sae_layer (the SAE's layer in the thinking model) with the thinking "
                        "model")
    titles = dict(titles or {})
    codes, assign = sae_codes(sae, activations)
    # hit rates: a generated sentence the SAE reconstructs worse than 99% of its latent's members is "outside"
    error_limits = None
    if thinking is not None:
        error_limits = latent_error_limits(reconstruction_errors(sae, activations), assign)
    if latents is None:
        latents = sorted(set(assign.tolist()))
    max_tokens = getattr(base.model.config, "max_position_embeddings", None)
    sets, skipped = build_examples(traces, index, codes, assign, latents, n_examples, base=base,
                                   val_fraction=val_fraction, seed=seed, min_examples=min_examples,
                                   batch_size=settings.batch_size, max_tokens=max_tokens,
                                   n_holdout=n_hit_examples if thinking is not None else 0, progress=progress)
    for latent, why in skipped.items():
        print(f"steering: no vector for latent {latent} ({titles.get(latent, '')!r}): {why}")

    vectors: dict[str, Tensor] = {}
    records: dict[str, dict] = {}
    table_rows = []

    def logger(key: str):
        def log(rec: dict) -> None:
            if tracker is not None:
                tracker.log({f"steer/{key}/train_loss": rec["train_loss"], f"steer/{key}/val_loss": rec["val_loss"],
                             f"steer/{key}/norm": rec["norm"], f"steer/{key}/epoch": rec["epoch"]})
        return log

    def record(tv: TrainedVector, n_train: int, n_val: int) -> dict:
        return {"norm": float(tv.vector.norm()), "n_train": n_train, "n_val": n_val,
                "train_loss_before": tv.train_loss_before, "train_loss_after": tv.train_loss_after,
                "val_loss_before": tv.val_loss_before, "val_loss_after": tv.val_loss_after,
                "best_epoch": tv.best_epoch, "epochs": tv.epochs, "history": tv.history}

    partial = Path(out_dir) / PARTIAL_DIR if resume_key is not None else None
    common_stamp = {"inputs": resume_key, "settings": asdict(settings), "layer": layer, "sae_layer": sae_layer,
                    "model_id": model_id or base.source, "n_hit_examples": n_hit_examples,
                    "max_new_tokens": max_new_tokens, "generation_batch_size": generation_batch_size,
                    "thinking": thinking is not None, "label_fn": getattr(label_fn, "__qualname__", None)}

    def stamp(key: str, title: str, *groups: Sequence[Example]) -> str:
        return fingerprint({**common_stamp, "key": key, "title": title, "examples": [
            [[e.input_ids, e.t_start, e.t_end, e.thinking_prefix, e.activation] for e in g] for g in groups]})

    def resumed(key: str, stamp_: str) -> tuple[Tensor, dict] | None:
        """The vector and record an interrupted run finished under the same stamp; None if absent, stale or damaged."""
        if partial is None:
            return None
        try:
            saved = json.loads((partial / f"{key}.json").read_text())
            blob = (partial / f"{key}.safetensors").read_bytes()
            if saved["stamp"] != stamp_ or saved["tensor_sha256"] != _sha256(blob):
                return None
            vector = safetensors_load(blob)[key].float()
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            return None
        return (vector, saved["record"]) if vector.shape == (base.d_model,) else None

    def checkpoint(key: str, stamp_: str, vector: Tensor, rec: dict) -> None:
        """Tensor first, then the JSON naming its sha256 (as save_vectors; names that no reader takes for vectors)."""
        if partial is not None:
            blob = safetensors_save({key: vector.detach().float().cpu().contiguous()})
            atomic_write_bytes(partial / f"{key}.safetensors", blob)
            atomic_write_json(partial / f"{key}.json", {"stamp": stamp_, "tensor_sha256": _sha256(blob), "record": rec})

    def resume_or_train(key: str, stamp_: str, train: Callable[[], tuple[Tensor, dict]]) -> dict:
        """vectors[key] and its record: the ones an interrupted run finished under `stamp_`, else `train()`'s
        (checkpointed at once, so that a later kill keeps them)."""
        done = resumed(key, stamp_)
        if done is not None:
            print(f"steering: {key} resumed from {partial}")
        else:
            done = train()
            checkpoint(key, stamp_, *done)
        vectors[key] = done[0]
        return done[1]

    for latent, ex in sets.items():
        key = vector_key(latent)
        hit_contexts = ex.hit_contexts(n_hit_examples) if thinking is not None and n_hit_examples > 0 else None
        elsewhere = elsewhere_contexts(sets, latent, n_hit_examples) if hit_contexts is not None else None
        planted = None  # with a ground-truth labeller: the behavior this latent's own sentences mostly have
        if label_fn is not None:
            truth = [label_fn(e.target) for e in ex.train + ex.val]
            truth = [t for t in truth if t is not None]
            planted = max(sorted(set(truth)), key=truth.count) if truth else None
        st = stamp(key, titles.get(latent, ""), ex.train, ex.val, hit_contexts or [], elsewhere or [])

        def train_behavior() -> tuple[Tensor, dict]:  # called at once, in this iteration
            tv = train_vector(base, ex.train, ex.val, layer, settings, thinking=thinking, progress=progress,
                              desc=f"{key} {titles.get(latent, '')}".strip(), log=logger(key))
            rec = {"latent": latent, "title": titles.get(latent, ""), **record(tv, len(ex.train), len(ex.val)),
                   "n_candidates": ex.n_candidates, "n_too_long": ex.n_too_long,
                   "mean_activation": sum(e.activation for e in ex.train + ex.val) / (len(ex.train) + len(ex.val))}
            if hit_contexts is not None:
                hits = hit_rates(base, thinking, sae, sae_layer, hit_contexts, tv.vector, latent, layer,
                                 max_new_tokens=max_new_tokens, batch_size=generation_batch_size, seed=seed,
                                 label_fn=label_fn, target_label=planted, error_limits=error_limits,
                                 progress=progress)
                rec["hit_rates"] = hits
                if elsewhere:
                    rec["hit_rates_elsewhere"] = hit_rates(
                        base, thinking, sae, sae_layer, elsewhere, tv.vector, latent, layer,
                        max_new_tokens=max_new_tokens, batch_size=generation_batch_size, seed=seed + 1,
                        label_fn=label_fn, target_label=planted, error_limits=error_limits, progress=progress)
            return tv.vector, rec

        records[key] = rec = resume_or_train(key, st, train_behavior)
        h, he = rec.get("hit_rates", {}), rec.get("hit_rates_elsewhere", {})
        table_rows.append([key, latent, rec["title"], rec["norm"], rec["n_train"], rec["n_val"],
                           rec["val_loss_before"], rec["val_loss_after"], h.get("steered"), h.get("unsteered"),
                           h.get("random"), h.get("n"), he.get("steered"), he.get("unsteered"), he.get("random"),
                           he.get("n")])

    if train_bias:
        btrain, bval = bias_examples(traces, n_examples, base.tokenizer, val_fraction=val_fraction, seed=seed,
                                     max_tokens=max_tokens)
        if len(btrain) + len(bval) < min_examples:
            skipped_bias = f"only {len(btrain) + len(bval)} usable traces < min_examples={min_examples}"
            print(f"steering: no bias vector: {skipped_bias}")
            records_bias_skip = skipped_bias
        else:
            def train_bias_vector() -> tuple[Tensor, dict]:
                tv = train_vector(base, btrain, bval, layer, settings, thinking=thinking, progress=progress,
                                  desc="bias", log=logger(BIAS))
                return tv.vector, {"latent": None, "title": "bias", **record(tv, len(btrain), len(bval))}

            records[BIAS] = resume_or_train(BIAS, stamp(BIAS, "bias", btrain, bval), train_bias_vector)
            records_bias_skip = None
            rb = records[BIAS]
            table_rows.append([BIAS, None, "bias", rb["norm"], len(btrain), len(bval), rb["val_loss_before"],
                               rb["val_loss_after"], *[None] * 8])
    if not vectors:
        raise UserError("steering: no vector could be trained (every behavior has too few examples: "
                        f"{skipped}); generate more traces (data.limit) or lower the minimum")

    meta = {"model_id": model_id or base.source, "layer": layer, "d_model": base.d_model,
            "objective": settings.objective, "sae_layer": sae_layer, "n_latents": int(codes.shape[1]),
            "settings": {"n_examples": n_examples, "val_fraction": val_fraction, "lr": settings.lr,
                         "max_epochs": settings.max_epochs, "patience": settings.patience,
                         "batch_size": settings.batch_size, "max_norm": settings.max_norm, "seed": seed,
                         "min_examples": min_examples, "init": "zeros", "schedule": "cosine to 0",
                         "n_hit_examples": n_hit_examples, "max_new_tokens": max_new_tokens,
                         "hit_error_limits": error_limits,
                         "generation_batch_size": generation_batch_size},
            "convention": ("vector added via hooks.add_to_resid_post at blocks.{layer}.hook_resid_post, at every "
                           "position whose next token is a target token (generation: the current last position)"),
            "skipped": {str(k): v for k, v in skipped.items()},
            "vectors": records, **dict(extra_meta or {})}
    if train_bias and records_bias_skip:
        meta["skipped"][BIAS] = records_bias_skip
    save_vectors(out_dir, vectors, meta)
    if partial is not None:
        shutil.rmtree(partial, ignore_errors=True)  # vectors.json is written: the per-vector checkpoints are done
    if tracker is not None:
        tracker.table("steer/hit_rates", HIT_TABLE_COLUMNS, table_rows)
        tracker.summary({f"steer/{r[0]}/val_loss_after": r[7] for r in table_rows})
    return json.loads((Path(out_dir) / META_FILE).read_text())


def check_same_tokenizer(base: LoadedModel, thinking: LoadedModel | None) -> None:
    """The KL objective compares next-token distributions position by position: one tokenizer for both models."""
    if thinking is None:
        raise UserError("steering.objective=kl needs the thinking model (it supplies the target distributions)")

    def plain_vocab(tok: Any) -> dict[str, int]:
        added = set(tok.get_added_vocab())
        return {k: v for k, v in tok.get_vocab().items() if k not in added}

    if plain_vocab(base.tokenizer) != plain_vocab(thinking.tokenizer):
        raise UserError("steering.objective=kl needs the base and thinking models to share a tokenizer, and theirs "
                        "differ; use steering.objective=ce")
