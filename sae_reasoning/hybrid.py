"""The hybrid decoder (METHOD.md step 7): the base model writes, the thinking model decides when and how to steer it.

One owned decode loop with a KV cache (transformers ``DynamicCache`` whose layers append in place:
``kv_cache.GrowingLayer``) for each model; every step costs one cached forward of each model on the new token (plus
the extras listed under *Cost*), never a recomputation of the prefix.

Per step, for every unfinished row (problem) of a batch:

1. **Decide.** The thinking model has read its chat prompt plus every emitted token. The *current sentence* is the
   emitted text after the last sentence cut (see *Sentences*). Its pooled activation is the running MEAN of the
   thinking model's block-``sae_layer`` output (``blocks.L.hook_resid_post``) over the sentence's tokens, exactly
   how the SAE's training vectors were pooled (``activations.py``); the SAE normalises it itself
   (``sae.normalise``) and ``argmax(sae.pre_acts(.))`` names the behavior, its value is the activation. Below
   ``threshold`` (or a latent without a vector) nothing but the bias is applied.
   At a sentence START the sentence has no token yet: the thinking model then *drafts* its own greedy next token
   (one extra cached step that stops right after block ``sae_layer`` and is rolled back with ``crop``) and the
   pooled activation is that draft token's output alone. The draft only names the behavior: the emitted token
   always comes from the base (or, in the controls, from the rule that control states).
   ``granularity="sentence"`` decides once per sentence (at its start) and steers every token of the sentence with
   that behavior; ``granularity="token"`` decides at every step from the running mean (draft at sentence starts).
2. **Steer.** The base reads ``base_prompt(question)``; it is fed the current last token (the last prompt token at
   step 0, then each emitted token) with ``coefficient * vectors[behavior] (+ bias)`` added to the output of block
   ``steering_layer`` at that position, through the one steering hook ``hooks.add_to_resid_post``: when the base
   predicts token t+1 the vector sits at position t, exactly where steering vectors are trained. The bias vector is
   added at every step (``bias_always``), with or without a behavior.
3. **Emit** the steered base's greedy token (or the candidate-mode choice), feed it to the thinking model (one cached
   step, whose block-``sae_layer`` output is stored for the running means).

Candidate mode (``candidate_mode``, the paper's): at steps where a behavior is active, every coefficient of
``coefficients`` is one candidate (its steered greedy token), plus the token of the base with no delta at all at this
step when ``unsteered_candidate``; the thinking model's log-likelihood of each candidate token (from its logits of
the previous step, no extra forward) picks one (ties to the earliest candidate). All candidates are ONE batched
forward: the fed token is repeated K times at the same position with a 4D attention mask in which each copy sees
the shared cache and itself only; the K new cache entries are then reduced to the chosen one in place
(``_keep_candidate``) so the cache never gets copied per candidate. Needs the ``sdpa`` or ``eager`` attention of
transformers (flash-attention ignores custom 4D masks) and plain ``DynamicLayer`` caches (no sliding window).
At steps without an active behavior the row emits the bias-steered greedy token, as in the plain mode.

Controls (``control``, one at a time; each acts at exactly the decision points of the real method):

- ``bias_only``: only the bias vector, never a behavior vector (equals steering with every vector zeroed).
- ``random_behavior``: wherever the real decision activates a behavior, a uniformly random behavior that has a
  vector is used instead (seeded per problem: ``seed`` and the problem's id, or its index when it has none;
  independent of batching).
- ``random_vectors``: each behavior vector is replaced by a random vector of the same norm, drawn per problem
  (seeded like ``random_behavior``; `random_vectors`), so the control averages over random directions.
- ``oracle``: no steering at all; wherever a behavior is active and greedy base and greedy thinking tokens differ,
  the thinking model's token is emitted, elsewhere the base's. With ``threshold=-inf`` and token granularity every
  step is a decision point, and the oracle is the thinking model's own greedy decoding.
- ``unsteered_rerank``: candidate mode without steering: at active points the unsteered base's top-``rerank_top_c``
  tokens (default: as many candidates as candidate mode would have) are re-ranked by the thinking model.

Stats per problem (fractions are over decode steps, the final eos step included):

- ``steered_fraction``: steps whose emitted token got a behavior vector with a non-zero coefficient.
- ``changed_fraction``: steps whose emitted token differs from the *unsteered* base's greedy token on the same
  token prefix. This needs unsteered base logits every step: a second base cache, teacher-forced on the emitted
  tokens without any delta, run in the same batched forward as the steered one (interleaved rows). Cost: the base
  forward runs on 2x the rows whenever steering is possible (``track_unsteered=False`` turns it off; the two rates
  are then None). Without steering (oracle, unsteered re-ranking, no vectors and no bias) the base itself is
  unsteered and no second cache is kept.
- ``disagreement_rate``: steps where that unsteered base greedy token differs from the thinking greedy token.
- ``bias_fraction``, ``substituted_fraction`` (oracle), ``reranked_fraction`` (candidate choice other than the
  first), ``behavior_counts`` (tokens steered per latent), ``n_decisions``, ``n_drafts``, ``n_tokens``,
  ``finished`` (eos) / ``truncated`` (hit ``max_new_tokens``), ``text`` and ``token_ids`` (eos excluded).

Sentences. The cut rules are those of ``sentences.py`` (it is called on the emitted text: after ``.!?;`` runs
followed by whitespace, after newlines, with its protections), and tokens join the sentence of their first visible
character as in ``attach_token_spans``. Streaming differences, all documented choices:

- The end of the text counts as whitespace (as the splitter does at the end of a range), so a token ending in
  ``.`` starts a new sentence at once; if the next token shows it was not a sentence end (``3.`` then ``14``, or
  ``etc.`` then `` and``) the cut is retracted: the tokens merge back into the previous sentence, whose running
  mean and (sentence mode) decision apply again. The retracted step was already steered with the new decision.
- Short pieces (fewer than ``min_words`` words), which the offline index drops, are pooled like any sentence.
- Text after ``</think>`` is not special (the base does not write think tags).
- Each step re-scans the text after the last cut that can no longer change (see ``SentenceStream.current``).

Tokenizers. By default the base's token ids are fed to the thinking model, so both tokenizers must share one
vocabulary (``_check_tokenizers``); otherwise one clear error, which names ``hybrid.retokenize_text``.

Text-level re-tokenisation (``retokenize_text=true``, used only when the vocabularies differ; the test-only
setting ``force_retokenize`` takes this path for a matching pair too). The base decodes exactly as above (batched,
cached, steered); the thinking model no longer reads base token ids and keeps no cache across steps. Whenever a
row needs a decision (sentence mode: a new sentence, detected on the base's decoded text exactly as above), the
thinking model encodes its own chat prompt (``thinking_prompt``, its own special tokens) followed by the text
generated so far (``SentenceStream.text``, i.e. the base tokenizer's decode with special tokens kept), encoded
separately with ITS OWN tokenizer (``add_special_tokens=False``; special-token strings in the text are parsed as the
thinking tokenizer's own), runs one uncached forward over that prefix (the rows deciding at this step batched with
left padding), drafts its next sentence greedily from it and pools/classifies exactly as above (a new cut whose
sentence already has text, as after ``wait... Then``, pools the re-encoded tokens of that sentence, found by the
tokenizer's character offsets into the text and the membership rule above; this needs a fast tokenizer). For a pair
with one tokenizer whose encoding of the generated text gives back the emitted ids, this equals the token path
(tested). Limits:

- The thinking model reads the base's text split by its own tokenizer: a word may be split differently than it
  would have written it, each tokenizer's rules for a text start apply to the generated part (e.g. SentencePiece's
  dummy-prefix space), and text its tokenizer cannot represent becomes ``<unk>``.
- The generated text is encoded apart from the prompt (no token merges across that boundary, as when the
  thinking model writes after its prompt); a base token that ends inside a multi-byte character adds its text only
  once a later token completes it (``SentenceStream``).
- Cost: one uncached thinking forward over prompt + whole text per decision (sentence), plus the draft; no
  thinking forward between decisions. Per problem that is O(n * n_sentences) thinking tokens instead of O(n), and
  the prompt + text must fit the thinking model's context.
- Sentence granularity only: ``granularity="token"`` is refused (re-encoding the whole text at every token is
  O(n^2), and mid-word the thinking model would read a word cut where its tokenizer never cuts; sentence starts
  end at a word boundary).
- Controls that compare or score tokens across the two vocabularies are refused, one line each: ``oracle``
  (emits the thinking model's token), ``candidate_mode`` and ``unsteered_rerank`` (score base tokens with thinking
  log-likelihoods). ``bias_only``, ``random_behavior`` and ``random_vectors`` work as above.
- ``disagreement_rate`` (unsteered base greedy token vs thinking greedy token) has no meaning across vocabularies:
  it is None; ``thinking_greedy`` in records is None. The other stats are unchanged; ``n_conflicting_tokens`` is 0.
- The thinking model's own eos (not the base's) ends its drafts.

Cost per step: one base forward on the batch (2x rows when tracking unsteered stats; K query positions in candidate
mode), one thinking forward on the batch, and at steps where some row starts a sentence (and needs a decision) one
partial thinking forward up to block ``sae_layer`` (token draft) or the draft of a sentence (up to
``draft_max_tokens`` cached thinking steps). Re-tokenisation: see above. Finished rows are dropped from the batch
(caches included).

Lazy thinking (``lazy_thinking``, on by default; sentence granularity, plain mode and the bias_only / random_*
controls, not with ``record``): the thinking model's state is needed only where a row decides (its draft, or the
running mean of a sentence that already has tokens); the per-step thinking greedy token only feeds the
disagreement stat, which can wait. So the emitted tokens are read in ONE thinking forward when some row of the
batch needs a decision (and when a finished or truncated row leaves the batch with unsettled stats), instead of
one forward per step: at batch 1 that is one thinking forward per sentence instead of one per token. Without
speculative steps every row reads the same number of tokens (each emits one per step); with them, rows that read
fewer leave masked holes (below). Tokens, decisions
and stats equal the per-token path's (tested); only the float rounding of the thinking model's forward over several
tokens at once differs.

Draft reuse (with lazy thinking and sentence drafts, plain caches): a row that decodes alone (batch 1, or the last
row of a batch) drafts in the thinking cache itself instead of a copy, and the draft stays there. At the next
catch-up the tokens the base emitted are compared with the draft's: the entries of their longest common prefix are
kept (their block-``sae_layer`` outputs and greedy tokens are the draft's, computed on the same prefix), the rest of
the draft is cropped, and only the emitted tokens after the prefix are read. Where the base wrote the whole draft
(on the organism about half the sentences at natural ends) no catch-up forward runs at all. With several rows the
drafts still run on a copy: their lengths differ, so one row's leftover draft could not be cropped alone. The
one-token path (token granularity, ``lazy_thinking=False``, the oracle control) reuses a lone row's draft the same
way: each emitted token that the draft already read is not read again (its output and greedy token are the draft's;
only their argmax is used there, so not with candidate scoring, ``unsteered_rerank`` or ``record``) until the base
leaves the draft, whose unread rest is then cropped. Token mode on the organism, 32 problems to their end, batch 1:
3,603 -> 2,483 thinking forwards, 8.0 -> 7.0 s.

Shared drafts (``shared_drafts``; by default on where the base runs on CUDA and off elsewhere,
`shared_drafts_enabled`; sentence or token granularity with the settings lazy thinking accepts,
``draft="sentence"``, batch > 1, not with a ``schedule``): without them the rows that start a sentence at a step
draft their whole next sentence, one thinking forward per draft token, while every other row waits; a batch then
makes about as many thinking calls per step as the longest of those drafts. With shared drafts a row at a sentence
start instead drafts ONE token per step and does not write meanwhile, and every step runs one thinking forward for
all rows: the drafting rows feed their next draft token (in the thinking cache itself, at the positions after their
read tokens; the entries become masked holes once the draft ends) and the writing rows read the token they emitted
at the previous step (so the forward stays one position wide and the caches grow by one column a step). Then one
base forward for the writing rows (the drafting rows get a masked hole). A row's sentence still costs its read, its
draft and its writing, but the rows no longer wait for each other: about two model calls per step. Same tokens,
decisions and stats (tested). It pays where a call costs its launches (a GPU); on a CPU every row costs its position
in both forwards, drafting or not. Measured on the organism with the demo's SAE and vectors (CPU, batch 16,
``bench_hybrid.py``): 512 tokens with eos masked, 4,592 -> 2,096 model calls but 552 -> 399 tokens/s (the base cache
holds a hole for every step a row drafted); 32 test problems run to their end, 818 -> 621 calls, 926 -> 843
tokens/s. On an H200 (session 9, random-weight Qwen2-1.5B-shaped pair, ``benchmarks/hybrid_stages.py``) 64 tokens at
batch 16 without them took 1,633 model calls (1,568 of them thinking calls, drafts) against base-only's 64, and a
call cost about the same at batch 16 as at batch 1: the serialised drafts are the GPU's cost, hence on by default
there (their GPU speed-up itself was not measured yet). Draft reuse is off with it. With ``speculative="always"``
(session 10; or "single_row" once one row is left) a row whose draft has just ended verifies it in the step's one
base forward, as speculative steps do: every draft token the base writes as drafted costs no step of its own, so the
batch takes fewer steps, hence fewer calls, at the price of a wider base forward at those steps (all rows run
1 + the longest draft positions). Same tokens, decisions and stats (tested). On the organism with the demo's SAE and
vectors (batch 16, 512 tokens, eos masked, ``bench_hybrid.py``): 1,850 -> 1,544 model calls, but 5.7x the base's row
positions (past the answer most drafts are long and rejected at once), so 3.6x slower on a CPU, where positions
cost. "always" is therefore not the default: on a GPU it can pay only where a forward of 32 x (1 + draft) positions
still costs about its launches; not measured there yet (`gpu_check.sh`, part ``hybrid_shared``). In token
mode (session 9) the rows read lazily as in sentence mode, but a writing row decides at every step, so each step's
shared forward reads the token it emitted at the step before, and a row whose draft ended decides from the draft and
writes at once: same tokens, decisions and stats as one-token steps (tested at batch 8: 533 -> 309 model calls for
48 tokens).

Speculative steps (``speculative``: "off", "single_row", the default, or "always"; with lazy thinking and
``draft="sentence"``, not with a ``schedule``): at a sentence start the thinking model has just drafted its whole
next sentence to name the behavior. That draft is also a guess of what the base will write, so the base, steered
with the sentence's delta, is fed its last token followed by the draft's tokens in ONE forward, and emits its greedy
token after each position while the previous one equalled the draft's (the first differing token, the base's own, is
emitted too) and the sentence stays the same (a new or retracted cut would change the delta: the step ends there).
These are exactly the tokens one-token steps would emit: each is predicted from the same prefix with the same delta
at every position. The stats are tallied per token as one-token steps would (the thinking greedy token after an
accepted draft token is the draft's next one). Rows of a batch accept different numbers of tokens, and rows that do
not start a sentence feed one token: the unused positions stay in the base cache as masked holes (the thinking cache
gets holes the same way when its rows catch up on different numbers of tokens); position ids count real tokens only.
On the organism about a third of the emitted tokens come from accepted drafts (mean 3.2 tokens a verified step at
batch 1). When it pays: a batch takes as many steps as its slowest row, so accepted tokens shorten a batch only
where every row accepts, while a verify forward runs 1 + (longest draft) positions for EVERY row (on a CPU each
position costs about what it costs in a one-token forward). "single_row" therefore verifies only while one row is
decoding (batch 1, or the last row of a batch); "always" verifies at every sentence start. Measured on the organism
with the demo's SAE and vectors (CPU, one thread, ``bench_hybrid.py --natural``): 32 test problems generated to their
end, batch 1: 334 tokens/s without, 440 with "single_row" (0.40x and 0.53x base-only on the same lengths); batch 16
(the last rows only): 954 and 965; "always" at batch 16 cost 25% in session 5 (734 against 551). In the benchmark's
fixed-length runs (512 tokens, eos masked: the text after the answer is out of distribution and most drafts are
rejected at their first token) "single_row" cost 5% at batch 1 (292 against 306 tokens/s). Hence "single_row" by
default; on a GPU, where a step costs its launches more than its positions, it should pay more, but it was not
measured there.

Token-mode speculative steps (session 8; ``granularity="token"``, ``speculative`` not "off", a lone row with draft
reuse, plain mode or the bias_only / random_vectors controls, not with ``record`` or a ``schedule``). Token mode
decides before every token from the running mean of the current sentence, so one delta per verify forward would be
wrong. But while the base writes the draft, the running mean at each position is known in advance: the draft's
outputs are what the thinking model reads when those tokens are emitted (draft reuse keeps them). So at a sentence
start the row's draft is verified in one base forward with, at position j, the delta of the decision made from the
mean over the draft's first j tokens (each decided alone, as a one-token step would, so the rounding is the same),
and each accepted token is tallied as a one-token step with its own decision. The positions stop before eos and
before any that one-token steps would not reach inside the sentence (a cut, a retraction, a sentence still without
a token of its own). The thinking model then takes the accepted tokens from the draft and reads only the base's
own last token. Same tokens, decisions and stats (tested). Not with the oracle (it emits thinking tokens) nor
random_behavior (its random draws would run ahead of the emitted tokens). Measured on the organism with the demo's SAE
and vectors (CPU, one thread, ``bench_hybrid.py``, batch 1): 512 tokens 232 -> 273 tokens/s (0.38x -> 0.45x
base-only), 256 tokens 0.39x -> 0.49x; base forwards for 4 problems of 512 tokens 2,052 -> 1,246. Tried and not kept:
drafting again in the middle of a sentence, after the base left the draft (a lone row in token mode pays a thinking
read per token there anyway). The base rarely wrote such drafts: for 4 problems of 512 tokens the thinking calls rose
from 2,818 to 3,211-5,930 and the base calls fell only to 836-956, slower in all three draft lengths tried.

Base self-drafts (session 9; the same lone rows). What does pay in mid-sentence, after the base left the thinking
model's draft, is a draft by the BASE: it writes the rest of the sentence greedily at the decision just made, on a
copy of its steered row's cache (one call a token, as one-token steps; up to ``draft_max_tokens``, ending after a
token that changes the sentence or before eos), the thinking model reads that draft in one forward (kept in its
cache as a draft-reuse trail), and the verify forward steers each position with the decision one-token steps would
make there (`_token_positions`, from those outputs). Within a sentence the decision rarely changes (on the organism
13 of 658 mid-sentence steps), so the base keeps its own tokens and the thinking model's read of each token becomes
one read per sentence; where the decision changes the verify step ends there, as one-token steps would. Same
tokens, decisions and stats (tested, five settings); the thinking calls fall (e.g. 139 -> 118 with 38 -> 41 base
calls in the plain test setting) at the cost of one verify forward per self-draft.
"""

from __future__ import annotations

import copy
import random
import warnings
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_reasoning.config import SPECULATIVE_MODES, HybridConfig, behavior_scales_problem
from sae_reasoning.errors import UserError
from sae_reasoning.hooks import add_to_resid_post
from sae_reasoning.models import LoadedModel, thinking_prompt
from sae_reasoning.prompts import base_prompt
from sae_reasoning.sentences import _boundaries

CONTROLS = ("none", "bias_only", "random_behavior", "random_vectors", "oracle", "unsteered_rerank")
GRANULARITIES = ("sentence", "token")

# Refusals of the re-tokenisation path (module doc, *Text-level re-tokenisation*): one line each.
_RETOKENIZE_REFUSALS = {
    "granularity": "hybrid.retokenize_text supports granularity=sentence only: with granularity=token the thinking "
                   "model would re-encode the whole text at every token (O(n^2)) and, mid-word, read a word cut where "
                   "its own tokenizer never cuts; sentence starts end at a word boundary",
    "candidate_mode": "hybrid.candidate_mode needs one shared vocabulary (the thinking model scores each candidate "
                      "base token by its next-token log-likelihood); it is refused with hybrid.retokenize_text",
    "oracle": "hybrid.control=oracle needs one shared vocabulary (it emits the thinking model's greedy token in "
              "the base's stream); it is refused with hybrid.retokenize_text",
    "unsteered_rerank": "hybrid.control=unsteered_rerank needs one shared vocabulary (the thinking model re-ranks "
                        "the base's top tokens by their log-likelihood); it is refused with hybrid.retokenize_text",
}


class HybridError(UserError):
    """A hybrid configuration or input that cannot work (mismatched tokenizers, vector shapes, layers)."""


def shared_drafts_enabled(setting: bool | None, base_device: Any) -> bool:
    """``hybrid.shared_drafts``: True / False as set; None (the default) = on where the base runs on CUDA. A GPU
    call costs its launches, not its rows, so serialised drafts dominate there; on a CPU rows cost positions and the
    holes shared drafts leave in the caches cost more than the calls they save (module doc, *Shared drafts*)."""
    if setting is not None:
        return bool(setting)
    return torch.device(base_device).type == "cuda"


def check_methods(thinking: LoadedModel, base: LoadedModel, cfg: Any, methods: Mapping[str, dict]) -> None:
    """Before any generation (eval.py): the one-line HybridError that HybridGenerator would raise for one of
    `methods` ({method: settings overrides}) on this pair, so that no method's generations are spent first."""
    for method, overrides in methods.items():
        s = HybridSettings.from_config(cfg, **overrides)
        retokenize, _ = _check_tokenizers(thinking, base, s.retokenize_text, s.force_retokenize)
        refusal = _retokenize_refusal(s) if retokenize else None
        if refusal:
            raise HybridError(f"eval.methods has {method}: {refusal}")


def _retokenize_refusal(s: "HybridSettings") -> str | None:
    """The line refusing settings `s` on the re-tokenisation path, or None when it supports them."""
    for key, refused in (("oracle", s.control == "oracle"), ("unsteered_rerank", s.control == "unsteered_rerank"),
                         ("granularity", s.granularity == "token"), ("candidate_mode", s.candidate_mode)):
        if refused:
            return _RETOKENIZE_REFUSALS[key]
    return None


@dataclass
class HybridSettings(HybridConfig):
    """Every knob of the hybrid decoder: the user-facing ones of `config.HybridConfig` (documented there) plus
    those eval.py and tests set per method. `from_config` reads the fields a config has."""

    force_retokenize: bool = False  # tests/diagnostics: take the re-tokenisation path even for one shared vocabulary
    control: str = "none"  # one of CONTROLS
    seed: int = 0
    rerank_top_c: int | None = None  # unsteered_rerank: candidates per step (default: candidate-mode count)
    bias_always: bool = True  # bias at every step (True) or only together with a behavior vector
    track_unsteered: bool = True  # keep the unsteered base cache for changed_fraction / disagreement_rate
    draft_reuse: bool = True  # tests/diagnostics: a lone row's catch-up keeps the draft entries it emitted
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: Any = None, **overrides: Any) -> "HybridSettings":
        values = {}
        for f in fields(cls):
            if isinstance(cfg, Mapping) and f.name in cfg:
                values[f.name] = cfg[f.name]
            elif cfg is not None and not isinstance(cfg, Mapping) and hasattr(cfg, f.name):
                values[f.name] = getattr(cfg, f.name)
        values.update(overrides)
        if "coefficients" in values:
            values["coefficients"] = [float(c) for c in values["coefficients"]]
        settings = cls(**values)
        settings.validate()
        return settings

    @property
    def n_candidates(self) -> int:
        return len(self.coefficients) + int(self.unsteered_candidate)

    def validate(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise HybridError(f"hybrid.granularity={self.granularity!r}: must be one of {GRANULARITIES}")
        if self.control not in CONTROLS:
            raise HybridError(f"hybrid.control={self.control!r}: must be one of {CONTROLS}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise HybridError("hybrid.max_new_tokens and hybrid.batch_size must be >= 1")
        if self.candidate_mode and not self.coefficients:
            raise HybridError("hybrid.coefficients is empty: candidate mode needs at least one coefficient")
        if self.draft not in ("sentence", "token"):
            raise HybridError(f"hybrid.draft={self.draft!r}: must be 'sentence' or 'token'")
        if self.speculative not in SPECULATIVE_MODES:
            raise HybridError(f"hybrid.speculative={self.speculative!r}: must be one of {SPECULATIVE_MODES}")
        if self.rerank_top_c is not None and self.rerank_top_c < 1:
            raise HybridError(f"hybrid.rerank_top_c={self.rerank_top_c}: must be >= 1")
        problem = behavior_scales_problem(self.behavior_scales)  # keys: titles are fine here (eval.py's config)
        if problem:
            raise HybridError(problem)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


def _plain_vocab(tok: Any) -> dict[str, int]:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return backend.get_vocab(with_added_tokens=False)
    return tok.get_vocab()


def _added_vocab(tok: Any) -> dict[int, str]:
    return {int(i): str(t) for i, t in getattr(tok, "added_tokens_decoder", {}).items()}


def _check_tokenizers(thinking: LoadedModel, base: LoadedModel, retokenize_text: bool,
                      force_retokenize: bool = False) -> tuple[bool, dict[int, tuple[str, str]]]:
    """(retokenize, conflicts): whether the thinking model reads re-encoded text, and conflicting added tokens.

    Raises unless both tokenizers give every ordinary token the same id or ``retokenize_text`` is set. Added
    (special) tokens may differ, as between the R1 distills and their Qwen bases: the returned
    {id: (base token, thinking token)} lists ids whose special meaning differs; emitting one is counted per problem
    (``n_conflicting_tokens``) because the thinking model reads it as its own special token. With re-tokenisation
    the thinking model reads no base ids, so there are no conflicts.
    """
    tv, bv = _plain_vocab(thinking.tokenizer), _plain_vocab(base.tokenizer)
    if force_retokenize or (tv != bv and retokenize_text):
        return True, {}
    if tv != bv:
        diff = sorted(set(tv.items()) ^ set(bv.items()), key=lambda kv: kv[1])
        example = diff[0] if diff else ("?", -1)
        raise HybridError(
            f"the thinking tokenizer ({thinking.source}, {len(tv)} tokens) and the base tokenizer ({base.source}, "
            f"{len(bv)} tokens) differ ({len(diff)} mismatched token/id pairs, e.g. {example[0]!r} -> {example[1]}): "
            "the hybrid feeds the base's token ids to the thinking model, so both must share one vocabulary; use a "
            "matching pair, or set hybrid.retokenize_text=true to let the thinking model re-encode the base's text "
            "with its own tokenizer at each sentence start (sentence granularity, no oracle/candidate controls)")
    ta, ba = _added_vocab(thinking.tokenizer), _added_vocab(base.tokenizer)
    conflicts = {i: (ba[i], ta.get(i, "")) for i in ba if ta.get(i) != ba[i]}
    conflicts.update({i: (ba.get(i, ""), ta[i]) for i in ta if ba.get(i) != ta[i]})
    if conflicts:
        warnings.warn(f"hybrid: {len(conflicts)} special token ids mean different things to the base and the "
                      f"thinking tokenizer (e.g. {next(iter(conflicts.items()))}); emitting one is counted as "
                      "n_conflicting_tokens", stacklevel=3)
    return False, conflicts


# ----------------------------------------------------------------------------------------------------------------
# Streaming sentences


class SentenceStream:
    """Emitted tokens of one row, their text and character spans, and the current sentence's tokens.

    Cuts come from ``sentences._boundaries`` run over the current line (a line start is a state of its scan, so the
    result equals a scan of the whole text); membership follows ``attach_token_spans``. See the module doc.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.ends: list[int] = []  # char end of each token; token i spans [ends[i-1] (or 0), ends[i])
        self._final = 0  # the last sentence cut that later text cannot change (a scan may resume there)
        self._read = 0  # tokens before this have their text in self.text

    def append(self, token_id: int) -> None:
        """Add one token. Its text is found by decoding a short window (as streaming detokenisers do: O(1) per
        token); a token that ends inside a multi-byte character gets no text until a later token completes it."""
        self.ids.append(int(token_id))
        n = len(self.ids)
        start = max(0, self._read - 6)  # a little left context, so that leading-space rules match a full decode
        prefix = self._decode(self.ids[start:self._read])
        window = self._decode(self.ids[start:])
        if window.startswith(prefix) and not window.endswith("\ufffd"):
            self.text += window[len(prefix):]
            self._read = n
        elif n - self._read > 8:  # the window never settles: fall back to decoding everything once
            self.text = self._decode(self.ids)
            self._read, self._final = n, 0
        self.ends.append(len(self.text))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if ids else ""

    def fork(self) -> "SentenceStream":
        """An independent copy sharing the tokenizer (token-mode speculative steps try tokens on it)."""
        other = SentenceStream(self.tokenizer)
        other.ids, other.text, other.ends = list(self.ids), self.text, list(self.ends)
        other._final, other._read = self._final, self._read
        return other

    def current(self) -> tuple[int, int, int]:
        """(cut, first, end): the char position where the current sentence begins and its member tokens
        [first, end). first == end means the current sentence has no token yet (a sentence start)."""
        text = self.text
        line = text.rfind("\n") + 1
        lo = max(line, self._final)
        if lo > line:
            # Resume the scan just before the last final cut: lo - 1 is a terminator/closer, so every look-back of
            # the splitter (words, digits, list markers, which stop at non-alphanumerics) sees exactly what a scan
            # from the line start sees, and the scan lands on lo as it did then.
            cuts = [lo] + [c for c in _boundaries(text, lo - 1, len(text)) if c > lo]
        else:
            cuts = [line] + _boundaries(text, line, len(text))
        cut = cuts[-1]
        # A cut followed by visible text can no longer change (retract or move): later scans start there.
        self._final = cut if text[cut:].strip() else (cuts[-2] if len(cuts) > 1 else lo)
        first, end = _sentence_members(text, cut, self.ends)
        return cut, first, end


def _sentence_members(text: str, cut: int, ends: Sequence[int]) -> tuple[int, int]:
    """Tokens [first, end) of the sentence that begins at char `cut` of `text`, for tokens where token i spans
    [ends[i-1] (or 0), ends[i]); (n, n) when it has no token yet. The membership rule of ``attach_token_spans``."""
    n = len(ends)
    rest = text[cut:]
    vis = len(text) - len(rest.lstrip())  # first visible char of the current sentence
    if vis >= len(text):
        return n, n
    vis_end = len(text.rstrip())
    prev_end = cut  # a token starting before the previous sentence's visible end belongs to it
    while prev_end > 0 and text[prev_end - 1].isspace():
        prev_end -= 1
    # Members: start in [prev_end, vis_end) and end after vis (a token starting in the gap joins the sentence
    # its first visible character is in). Starts and ends grow with i, so the members are contiguous.
    first = end = None
    for i in range(n - 1, -1, -1):
        a, b = (ends[i - 1] if i else 0), ends[i]
        if a < prev_end or b <= vis:
            break
        if a < vis_end:
            end = i + 1 if end is None else end
            first = i
    if end is None:
        return n, n
    return first, end


# ----------------------------------------------------------------------------------------------------------------
# The decoder


class _Draft:
    """One row's greedy draft of its next sentence, fed token by token: pooled (the mean block-`sae_layer` output of
    the draft's first sentence, as the SAE's training sentences were pooled) once its sentence ends or it emits eos.
    A premature cut (a "3." that a later "14" would retract) ends the draft early; that only shortens the span."""

    def __init__(self, tokenizer: Any, eos_ids: set[int]):
        self.stream = SentenceStream(tokenizer)
        self.eos_ids = eos_ids
        self.fed: list[int] = []  # every token fed, eos included
        self.hs: list[Tensor] = []  # outputs of the tokens in the stream
        self.pooled: Tensor | None = None

    def feed(self, t: int, h: Tensor) -> None:
        self.fed.append(t)
        if t in self.eos_ids:
            self.pooled = torch.stack(self.hs).mean(0) if self.hs else h
            return
        st = self.stream
        st.append(t)
        self.hs.append(h)
        cut = st.current()[0]
        if cut > 0:  # the draft's first sentence ended: its members start before the cut
            members = [x for j, x in enumerate(self.hs) if (st.ends[j - 1] if j else 0) < cut]
            self.pooled = torch.stack(members or self.hs[:1]).mean(0)

    def result(self) -> Tensor:
        """The pooled output; a draft cut off by its token budget pools everything it wrote."""
        return self.pooled if self.pooled is not None else torch.stack(self.hs).mean(0)


class _Stop(Exception):
    """Raised by the capture hook during a draft step: nothing after block sae_layer is needed."""


@dataclass(frozen=True)
class _Paths:
    """The paths a batch takes (`HybridGenerator._paths`; module doc)."""
    candidate: bool  # candidate mode (the paper's): K candidates scored by the thinking model
    S: int  # base rows per problem: steered (+ unsteered, for changed_fraction / disagreement_rate)
    K: int  # base query positions a step (candidates)
    lazy: bool  # lazy thinking
    spec: bool  # speculative steps (sentence mode)
    shared: bool  # shared drafts
    reuse: bool  # draft reuse
    tspec: bool  # token-mode speculative steps


@dataclass
class _Row:
    index: int  # position in the generate() input
    stream: SentenceStream
    rng: random.Random
    decided: dict[int, tuple[int, float]] = field(default_factory=dict)  # sentence cut -> (behavior, value)
    behavior: int = -1
    finished: bool = False
    n_steps: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict(steered=0, changed=0, disagree=0, bias=0,
                                                               substituted=0, reranked=0, decisions=0, drafts=0,
                                                               conflicting=0))
    behavior_counts: dict[int, int] = field(default_factory=dict)
    pend: list[int] = field(default_factory=list)  # lazy thinking: tokens emitted since the thinking model read
    pending_u: list[tuple[int, int]] = field(default_factory=list)  # (index in pend, unsteered greedy token)
    draft: "_Draft | None" = None  # shared drafts: the row's draft in progress (it does not write meanwhile)
    dnext: int = 0  # shared drafts: the next draft token to feed
    dcols: list[int] = field(default_factory=list)  # shared drafts: thinking-cache columns of the draft's tokens
    trail_used: int = 0  # draft reuse in token mode: the draft's tokens read so far
    trail: dict | None = None  # draft reuse: the draft left in the thinking cache (`_draft_sentence`'s trail)
    vectors: Tensor | None = None  # random_vectors control: this problem's own vectors [n_latents, d]
    record: dict[str, list] = field(default_factory=lambda: dict(step_logits=[], unsteered_logits=[],
                                                                candidate_logits=[], pooled=[], behavior=[],
                                                                coefficient=[], at_start=[], candidates=[],
                                                                thinking_greedy=[], base_greedy=[], emitted=[]))


@dataclass
class _Batch:
    """What `_run_batch` carries from step to step: the rows, and each model's cache with its attention mask and
    next positions. The base's have S rows per problem (`_Paths.S`), the thinking model's one; rows leave both
    together (`_drop_finished`). Under re-tokenisation the thinking model keeps no state (tcache ... tlogits and H
    are None)."""
    rows: list[_Row]  # every row of the batch, in input order
    active: list[int]  # the rows still decoding, in cache order
    orig: Tensor  # active position -> batch row (the first axis of H)
    H: Tensor | None  # [B, max_new_tokens, d]: the thinking model's block-sae_layer output at each emitted token
    tcache: Any
    tmask: Tensor | None
    tpos: Tensor | None  # [A]: the next position of each row (tokens read; drafts do not count)
    tlogits: Tensor | None  # [A, V]: the thinking logits after the last token each row read
    bcache: Any
    bmask: Tensor
    bpos: Tensor
    feed: Tensor  # [A]: each row's next base input, the token it emitted last
    bdev: torch.device  # the models' devices, read once: `LoadedModel.device` costs ~17 us a read (3% of a step at
    tdev: torch.device  # batch 1 on a CPU when each phase read it)

    @property
    def arows(self) -> list[_Row]:
        return [self.rows[i] for i in self.active]


@dataclass
class _Step:
    """One decode step, filled phase by phase: `_step_decide` (decisions), `_step_base` (the base forward and the
    chosen tokens), `_step_emit` (tallies). Per-row lists and tensors run over the active rows (A)."""
    arows: list[_Row]
    state: list[tuple[int, int, int]]  # each row's current sentence: (cut, first, end) (`SentenceStream.current`)
    need: list[bool]  # the row decides at this step
    starts: list[bool]  # its current sentence has no token yet (the decision pools a draft)
    g_known: list[bool]  # lazy thinking: the thinking greedy token after the row's text is known
    g: Tensor | None  # [A]: thinking greedy tokens (lazy: stale where not g_known; None: re-tokenisation)
    tlogp: Tensor | None  # [A, V]: thinking log-probs (candidate mode, unsteered re-ranking)
    cands: list[list[int]]  # speculative steps: the draft tokens the base verifies
    g_after: dict[int, list[int]]  # speculative steps: the thinking greedy token after each of them
    pooled_rows: list[int] = field(default_factory=list)  # the rows that decided, and their pooled activations
    pooled_t: Tensor | None = None
    behavior: Tensor | None = None  # [A]: the behavior each row writes with (-1: none)
    coef_sched: Tensor | None = None  # [A]: a schedule's coefficients
    pos_beh: list[int] | None = None  # token-mode speculative step: the behavior before each verified position
    writing: list[bool] | None = None  # shared drafts: the rows that write at this step (the others draft)
    # filled by _step_base
    logits: Tensor | None = None  # [A * S, K or 1 + L, V]: the base forward's
    e: Tensor | None = None  # [A]: each row's emitted token (one-token step); after _step_emit its next feed
    chosen: Tensor | None = None  # [A]: candidate mode / re-ranking: the chosen candidate
    options: Tensor | None = None  # [A, K or C]: candidate tokens (candidate mode) or re-ranked tokens
    sub: Tensor | None = None  # [A]: oracle: the thinking token replaced the base's
    L: int = 0  # speculative: draft tokens verified in this forward (0: a one-token step)
    greedy_b: list[list[int]] | None = None  # speculative: [A][1 + L] steered greedy token after each position
    greedy_u: list[list[int]] | None = None  # the same, unsteered
    cf: Tensor | None = None  # [A, Kc]: the coefficients
    use_vec: Tensor | None = None  # [A]: the row got its behavior vector
    bias_on: Tensor | None = None  # [A]: the row got the bias
    per_position: list[tuple[int, bool, bool]] | None = None  # token-mode speculative: (behavior, steered, bias)
    # filled by _step_emit: plain lists (one transfer per step)
    g_l: list[int | None] = field(default_factory=list)
    steered_l: list[bool] = field(default_factory=list)
    bias_l: list[bool] = field(default_factory=list)

    @property
    def A(self) -> int:
        return len(self.arows)


class HybridGenerator:
    """The hybrid decoder. ``generate(questions)`` returns one result dict per question (see the module doc).

    Args:
        thinking, base: loaded models sharing one tokenizer vocabulary (may be the same object), or, with
            ``retokenize_text``, any two tokenizers (the thinking model then re-encodes the base's text).
        sae: a `TopKSAE` trained at ``sae_layer`` of the thinking model (it owns its input normalisation).
        vectors: {latent: [d_model of base]} steering vectors at ``steering_layer`` of the base; latents without a
            vector are never steered.
        bias: the general bias vector [d_model] or None.
        cfg: a `config.HybridConfig`, a mapping, or None; ``overrides`` replace single fields (see
            `HybridSettings`).
    """

    def __init__(self, thinking: LoadedModel, base: LoadedModel, sae: Any, sae_layer: int,
                 vectors: Mapping[int, Tensor], bias: Tensor | None, steering_layer: int, cfg: Any = None,
                 **overrides: Any):
        self.settings = s = HybridSettings.from_config(cfg, **overrides)
        self.thinking, self.base = thinking, base
        self.retokenize, self.conflicts = _check_tokenizers(thinking, base, s.retokenize_text, s.force_retokenize)
        refusal = _retokenize_refusal(s) if self.retokenize else None
        if refusal:
            raise HybridError(refusal)
        if not 0 <= sae_layer < thinking.n_layers:
            raise HybridError(f"sae_layer={sae_layer}: the thinking model has blocks 0..{thinking.n_layers - 1}")
        if not 0 <= steering_layer < base.n_layers:
            raise HybridError(f"steering_layer={steering_layer}: the base model has blocks 0..{base.n_layers - 1}")
        if sae.d_in != thinking.d_model:
            raise HybridError(f"the SAE reads {sae.d_in}-dim vectors but the thinking model has d_model "
                              f"{thinking.d_model}")
        self.sae_layer, self.steering_layer = sae_layer, steering_layer
        self.sae = copy.deepcopy(sae).float().to(thinking.device).eval()
        self.n_latents = sae.n_latents
        d = base.d_model
        V = torch.zeros(self.n_latents, d)
        has = torch.zeros(self.n_latents, dtype=torch.bool)
        for latent, vec in vectors.items():
            latent = int(latent)
            if not 0 <= latent < self.n_latents:
                raise HybridError(f"steering vector for latent {latent}: the SAE has latents 0..{self.n_latents - 1}")
            vec = torch.as_tensor(vec).detach().float().flatten().cpu()
            if vec.numel() != d:
                raise HybridError(f"steering vector for latent {latent} has {vec.numel()} entries; the base model's "
                                  f"d_model is {d}")
            V[latent], has[latent] = vec, True
        for key, scale in dict(s.behavior_scales).items():  # values checked in HybridSettings.validate
            if not str(key).strip().isdigit():
                raise HybridError(f"hybrid.behavior_scales key {key!r}: HybridGenerator takes latent indices; titles "
                                  "are resolved by eval.py (hybrid_stage.resolve_behavior_scales)")
            latent = int(key)
            if not 0 <= latent < self.n_latents or not has[latent]:
                raise HybridError(f"hybrid.behavior_scales key {key!r}: latent {latent} has no steering vector")
            V[latent] = V[latent] * float(scale)
        if bias is not None:
            bias = torch.as_tensor(bias).detach().float().flatten().cpu()
            if bias.numel() != d:
                raise HybridError(f"the bias vector has {bias.numel()} entries; the base model's d_model is {d}")
        self.vectors = V.to(base.device)  # [n_latents, d]
        self.has_vector = has.to(thinking.device)
        self.available = [int(i) for i in has.nonzero().flatten()]
        self.bias = None if bias is None else bias.to(base.device)
        # Without any behavior vector no decision can activate anything: skip drafts and the SAE altogether.
        self.decides = bool(self.available)
        # Whether the base cache can ever differ from the unsteered base.
        if s.control in ("oracle", "unsteered_rerank"):
            self.steers = False
        elif s.control == "bias_only":
            self.steers = bias is not None
        else:
            self.steers = bool(self.available) or bias is not None
        attn = getattr(base.model.config, "_attn_implementation", "sdpa")
        if s.candidate_mode and s.control == "none" and attn not in ("sdpa", "eager"):
            raise HybridError(f"hybrid.candidate_mode needs the base model's attention to be 'sdpa' or 'eager' (it "
                              f"evaluates the candidates with a custom 4D attention mask), not {attn!r}")
        self.eos_ids = self._eos_ids(base)
        tok = base.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else sorted(self.eos_ids)[0]
        if self.retokenize:  # the thinking side has its own ids: its own eos ends drafts, its own pad pads
            try:
                thinking.tokenizer("a.", add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            except (NotImplementedError, KeyError, TypeError, ValueError):
                raise HybridError(f"hybrid.retokenize_text needs a fast thinking tokenizer (character offsets); "
                                  f"{thinking.source} has {type(thinking.tokenizer).__name__}") from None
            self.thinking_eos_ids = self._eos_ids(thinking)
            ttok = thinking.tokenizer
            self.thinking_pad_id = (ttok.pad_token_id if ttok.pad_token_id is not None
                                    else sorted(self.thinking_eos_ids)[0])
        self._mode: str | None = None
        self._delta: Tensor | None = None
        self._captured: Tensor | None = None

    # ------------------------------------------------------------------------------------------------ public API

    def random_vectors(self, key: int) -> Tensor:
        """random_vectors control: problem `key`'s own vectors [n_latents, d], each a seeded random direction with
        the norm of the real vector of that latent (zero where there is none). One draw per problem, so the
        control's accuracy averages over random directions instead of resting on a single draw (on the organism
        single draws ranged from 0.11 to 0.45 accuracy on 200 validation problems)."""
        gen = torch.Generator().manual_seed((self.settings.seed * 1_000_003 + key) % 2**63)
        dirs = torch.randn(self.n_latents, self.vectors.shape[1], generator=gen)
        norms = self.vectors.float().norm(dim=1, keepdim=True).cpu()
        return (dirs / dirs.norm(dim=1, keepdim=True) * norms).to(self.vectors.device)

    def prompts(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids of (base prompt, thinking prompt) for one question."""
        b = self.base.tokenizer(base_prompt(question))["input_ids"]
        t = self.thinking.tokenizer(thinking_prompt(self.thinking.tokenizer, question),
                                    add_special_tokens=False)["input_ids"]
        return list(b), list(t)

    def generate(self, questions: Sequence[Any], progress: bool | None = None) -> list[dict]:
        """Hybrid generations for `questions` (strings, or objects/dicts with `question` and optionally `id`)."""
        texts: list[str] = []
        ids: list[Any] = []
        for q in questions:
            if isinstance(q, str):
                text, qid = q, None
            elif isinstance(q, Mapping):
                text, qid = q["question"], q.get("id")
            else:
                text, qid = q.question, getattr(q, "id", None)
            texts.append(text)
            ids.append(qid)
        pairs = [self.prompts(t) for t in texts]
        # the controls' random streams: by problem id when there is one, so they do not depend on how eval.py batches
        keys = [None if i is None else zlib.crc32(str(i).encode()) for i in ids]
        results = self.generate_ids([p[0] for p in pairs], [p[1] for p in pairs], progress=progress,
                                    row_keys=keys if None not in keys else None)
        for r, t, i in zip(results, texts, ids):
            r["question"] = t
            if i is not None:
                r["id"] = i
        return results

    def generate_ids(self, base_ids: Sequence[Sequence[int]], thinking_ids: Sequence[Sequence[int]], *,
                     schedule: Sequence[Sequence[tuple[int | None, float]]] | None = None, record: bool = False,
                     progress: bool | None = None, row_keys: Sequence[int] | None = None) -> list[dict]:
        """Generate from prompt token ids. `row_keys[row]` seeds that problem's random stream (random_behavior,
        random_vectors);
        default: its position in `base_ids`. `schedule[row][step] = (behavior or None, coefficient)` replaces the
        decision (candidate mode: only the behavior), for tests; `record` adds per-step tensors to each result
        (``record``: step_logits, unsteered_logits, candidate_logits, pooled, behavior, coefficient, at_start,
        candidates, thinking_greedy, base_greedy, emitted; one entry per step)."""
        if len(base_ids) != len(thinking_ids):
            raise HybridError("base_ids and thinking_ids must have one prompt per problem each")
        s = self.settings
        show = s.progress if progress is None else progress
        results: list[dict] = []
        bar = tqdm(total=len(base_ids), desc="hybrid", unit="q", disable=not show)
        for start in range(0, len(base_ids), s.batch_size):
            stop = min(start + s.batch_size, len(base_ids))
            sched = None if schedule is None else list(schedule[start:stop])
            keys = list(range(start, stop)) if row_keys is None else list(row_keys[start:stop])
            results += self._run_batch(list(range(start, stop)), [list(x) for x in base_ids[start:stop]],
                                       [list(x) for x in thinking_ids[start:stop]], sched, record, bar, keys)
        bar.close()
        return results

    # ------------------------------------------------------------------------------------------------ internals

    @staticmethod
    def _eos_ids(lm: LoadedModel) -> set[int]:
        eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = lm.tokenizer.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if not eos:
            raise HybridError(f"the model {lm.source} has no eos token id")
        return {int(e) for e in eos}

    def _hook_capture(self, hidden: Tensor) -> None:
        if self._mode == "prefix":  # re-tokenisation: every position of the re-encoded prefix
            self._captured = hidden
        elif self._mode in ("think", "draft"):
            self._captured = hidden[:, -1]
            if self._mode == "draft":
                raise _Stop
        return None

    def _hook_steer(self, hidden: Tensor) -> Tensor | None:
        return self._delta if self._mode == "base" else None

    @staticmethod
    def _left_pad(seqs: list[list[int]], pad: int, device) -> tuple[Tensor, Tensor]:
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, x in enumerate(seqs):
            if x:
                ids[i, width - len(x):] = torch.tensor(x)
                mask[i, width - len(x):] = 1
        return ids.to(device), mask.to(device)

    @staticmethod
    def _right_pad(seqs: list[list[int]], width: int, pad: int, device) -> tuple[Tensor, Tensor]:
        """Token ids [n, width] and their mask (1 = real), each row's tokens first (new positions of a cached
        forward: a row with fewer leaves masked positions behind, holes its later tokens never attend to)."""
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, x in enumerate(seqs):
            if x:
                ids[i, :len(x)] = torch.tensor(x)
                mask[i, :len(x)] = 1
        return ids.to(device), mask.to(device)

    def _emit_verified(self, st: _Step, a: int, lazy: bool) -> int:
        """Speculative step of the row at batch position `a`: the base was fed its last token and then the draft
        tokens `st.cands[a]` in one forward at this sentence's delta. Emit the base's greedy token after each fed
        position while the previous one equalled the draft's, the row's sentence (its cut) stays the same, and it
        neither ends nor runs out of budget: exactly the tokens one-token steps would emit, since each of them is
        predicted from the same prefix with the same delta. Each emitted token is tallied as a one-token step
        (its thinking greedy token: the draft's next one). Token mode (`per_position`): position j had its own
        decision (behavior, steered, bias), made from the running mean over the draft's tokens before it, and
        counts as one. `st.g_after[a][j]`: the thinking model's greedy token after draft token j (a thinking
        draft's next token; a base self-draft's, read by the thinking model). Returns how many were emitted
        (>= 1)."""
        r, cand, cut = st.arows[a], st.cands[a], st.state[a][0]
        steered, bias = st.steered_l[a], st.bias_l[a]
        for j in range(len(cand) + 1):
            tok = st.greedy_b[a][j]
            g = st.g_l[a] if j == 0 else st.g_after[a][j - 1]
            if st.per_position is not None:
                r.behavior, steered, bias = st.per_position[j]
                r.counts["decisions"] += j > 0  # position 0's decision is counted where it was made
            self._tally(r, tok, steered, bias, None if st.greedy_u is None else st.greedy_u[a][j], g,
                        j == 0 and not st.g_known[a])
            if self._append(r, tok, lazy=lazy):
                return j + 1
            if (r.n_steps >= self.settings.max_new_tokens or j == len(cand) or tok != cand[j]
                    or r.stream.current()[0] != cut):
                return j + 1
        raise AssertionError("unreachable: the last position always stops")

    def _tally(self, r: _Row, tok: int, steered: bool, bias: bool, u: int | None, g: int | None,
               g_pending: bool) -> None:
        """The per-token stats of one emitted token `tok` (one-token and speculative steps alike): `u` the
        unsteered base's greedy token (None: not tracked), `g` the thinking model's, or `g_pending` when the
        thinking model has not read the prefix yet (lazy thinking: settled by the next catch-up)."""
        c = r.counts
        r.n_steps += 1
        c["steered"] += steered
        c["bias"] += bias
        if steered:
            r.behavior_counts[r.behavior] = r.behavior_counts.get(r.behavior, 0) + 1
        if u is not None:
            c["changed"] += tok != u
            if g_pending:
                r.pending_u.append((len(r.pend), u))
            else:
                c["disagree"] += g is not None and u != g
        c["conflicting"] += tok in self.conflicts

    def _append(self, r: _Row, tok: int, lazy: bool) -> bool:
        """Add emitted `tok` to row `r` (its sentence stream; lazy thinking: its tokens to read); True on eos."""
        if lazy:
            r.pend.append(tok)
        if tok in self.eos_ids:
            r.finished = True
            return True
        r.stream.append(tok)
        return False

    def _forward(self, lm: LoadedModel, mode: str, ids: Tensor, mask: Tensor, pos: Tensor, cache: Any,
                 logits_to_keep: int = 0) -> Tensor | None:
        self._mode = mode
        try:
            out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                           use_cache=True, logits_to_keep=logits_to_keep)
            return out.logits
        except _Stop:
            return None
        finally:
            self._mode = None

    def _draft_sentence(self, first: Tensor, tmask: Tensor, tpos: Tensor, tcache: Any, rows: Tensor | None,
                        max_tokens: int | None = None, eos_ids: set[int] | None = None,
                        seqs: list[list[int]] | None = None, trail: list[dict] | None = None) -> Tensor:
        """Mean block-`sae_layer` output over the thinking model's greedy draft of its next sentence, [A, d].

        Starting from `first` (its greedy next token), the thinking model writes on greedily until its own sentence
        splitter sees the sentence end (or eos, or draft_max_tokens); the draft is pooled exactly as the SAE's
        training sentences were (mean over the sentence's tokens) and the cache is cropped back, so the draft only
        names the next behavior: the emitted tokens still come from the base. A premature cut (a "3." that a later
        "14" would retract) ends the draft early; that only shortens the pooled span. Only `rows` (the batch rows at
        a sentence start) draft, on their own copy of the cache, so the others cost nothing and nothing is rolled back.
        ``rows=None``: every row of `tcache` drafts and the cache (a throwaway one) is extended in place.
        ``max_tokens`` (default ``draft_max_tokens``) = 1 gives the first token's output alone (``draft="token"``);
        ``eos_ids`` (default the base's, which is the thinking model's with one shared vocabulary) end a draft.
        ``seqs`` (a list) receives each row's drafted tokens (those it was fed until its draft ended) followed by
        the thinking model's greedy token after them (speculative verification).
        ``trail`` (a list; with ``rows=None``, whose cache then keeps the draft) receives per row its fed tokens
        (``fed``), their block-`sae_layer` outputs (``h``, [n, d]) and the greedy token after each (``after``):
        what a later catch-up needs to reuse the draft's cache entries (`_run_batch`, *draft reuse*).
        """
        A = first.shape[0]
        eos_ids = self.eos_ids if eos_ids is None else eos_ids
        if rows is not None:
            tcache = self._rows_copy(tcache, rows)
        drafts = [_Draft(self.thinking.tokenizer, eos_ids) for _ in range(A)]
        nxt: list[int] = [0] * A
        fed_h: list[list[Tensor]] = [[] for _ in range(A)]
        after: list[list[int]] = [[] for _ in range(A)]
        keep_trail = trail is not None
        tok, mask = first, tmask
        for i in range(self.settings.draft_max_tokens if max_tokens is None else max_tokens):
            mask = torch.cat([mask, mask.new_ones(A, 1)], 1)
            self._captured = None
            logits = self._forward(self.thinking, "think", tok[:, None], mask, (tpos + i)[:, None], tcache,
                                   logits_to_keep=1)
            h = self._captured.float()  # [A, d]
            greedy = logits[:, -1].argmax(-1)
            greedy_l = greedy.tolist() if seqs is not None or keep_trail else None
            for a, t in enumerate(tok.tolist()):
                if drafts[a].pooled is not None:
                    continue
                drafts[a].feed(t, h[a])
                if seqs is not None or keep_trail:
                    nxt[a] = greedy_l[a]
                if keep_trail:
                    fed_h[a].append(h[a])
                    after[a].append(greedy_l[a])
            if all(d.pooled is not None for d in drafts):
                break
            tok = greedy
        if seqs is not None:
            seqs.extend(d.fed + [n] for d, n in zip(drafts, nxt))
        if keep_trail:
            trail.extend(dict(fed=d.fed, h=torch.stack(x), after=g) for d, x, g in zip(drafts, fed_h, after))
        return torch.stack([d.result() for d in drafts])

    def _pool_retokenized(self, prompts: list[list[int]], texts: list[str], cuts: list[int]
                          ) -> tuple[Tensor, list[bool]]:
        """Re-tokenisation (module doc): the pooled activations [n, d] of n rows that need a decision, and whether
        each row drafted.

        Each row's thinking input is its chat prompt ids + its generated text (`texts`) encoded by the thinking
        tokenizer; one uncached forward over the left-padded batch gives every block-`sae_layer` output and a fresh
        cache. A row whose current sentence (beginning at char `cuts` of its text) has no re-encoded token yet (a
        sentence start) drafts from that cache as `_draft_sentence` does; another row pools the re-encoded tokens of
        that sentence (found by the tokenizer's character offsets into the text and the membership rule of the
        base's stream)."""
        from sae_reasoning.kv_cache import growing_cache

        tok, tdev = self.thinking.tokenizer, self.thinking.device
        enc = [tok(t, add_special_tokens=False, return_offsets_mapping=True) if t else None for t in texts]
        gen = [list(e["input_ids"]) if e is not None else [] for e in enc]
        ids, mask = self._left_pad([p + g for p, g in zip(prompts, gen)], self.thinking_pad_id, tdev)
        T = ids.shape[1]
        cache = growing_cache(self.thinking.model.config)
        self._captured = None
        logits = self._forward(self.thinking, "prefix", ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache,
                               logits_to_keep=1)
        hidden = self._captured  # [n, T, d]
        pooled: list[Tensor | None] = [None] * len(texts)
        for j, (e, g) in enumerate(zip(enc, gen)):
            if e is None:
                continue
            first, end = _sentence_members(texts[j], cuts[j], [b for _, b in e["offset_mapping"]])
            if first < end:
                pooled[j] = hidden[j, T - len(g) + first: T - len(g) + end].float().mean(0)
        drafting = [j for j, p in enumerate(pooled) if p is None]
        if drafting:
            sel = torch.tensor(drafting, device=tdev)
            if len(drafting) < len(texts):
                cache.batch_select_indices(sel)
            h = self._draft_sentence(logits[sel, -1].argmax(-1), mask[sel], mask[sel].sum(-1), cache, None,
                                     max_tokens=1 if self.settings.draft == "token" else None,
                                     eos_ids=self.thinking_eos_ids)
            for k, j in enumerate(drafting):
                pooled[j] = h[k]
        return torch.stack(pooled), [j in drafting for j in range(len(texts))]

    def _decide(self, rows: list[_Row], pooled: Tensor) -> tuple[Tensor, Tensor]:
        """Pooled raw activations [n, d] -> (behavior [n], value [n]); behavior -1 = none."""
        pre = self.sae.pre_acts(self.sae.normalise(pooled.float()))
        value, latent = pre.max(-1)
        active = (value >= self.settings.threshold) & self.has_vector[latent]
        behavior = torch.where(active, latent, -1)
        if self.settings.control == "random_behavior":
            behavior = torch.tensor([r.rng.choice(self.available) if bool(a) else -1 for r, a in zip(rows, active)],
                                    device=behavior.device)
        return behavior, value

    @torch.inference_mode()
    def _run_batch(self, indices: list[int], base_ids: list[list[int]], think_ids: list[list[int]],
                   schedule: list | None, record: bool, bar: Any, row_keys: list[int] | None = None) -> list[dict]:
        """Decode one batch (module doc). Each step: decide (`_step_decide`), one steered base forward
        (`_step_base`), emit and tally (`_step_emit`), drop the finished rows (`_drop_finished`), and on the
        one-token path the thinking model reads what was emitted (`_read_emitted`)."""
        s = self.settings
        B = len(indices)
        if any(len(x) < 1 for x in base_ids) or any(len(x) < 1 for x in think_ids):
            raise HybridError("empty prompt")
        keys = indices if row_keys is None else row_keys
        rows = [_Row(index=i, stream=SentenceStream(self.base.tokenizer),
                     rng=random.Random(s.seed * 1_000_003 + key),
                     vectors=self.random_vectors(key) if s.control == "random_vectors" else None)
                for i, key in zip(indices, keys)]
        retok = self.retokenize  # the thinking model reads re-encoded text at decisions only: no cache, no H
        tdev = self.thinking.device
        H = None if retok else torch.zeros(B, s.max_new_tokens, self.thinking.d_model, dtype=self.thinking.model.dtype,
                                           device=tdev)
        with ExitStack() as stack:
            stack.enter_context(add_to_resid_post(self.thinking.model, self.sae_layer, self._hook_capture))
            stack.enter_context(add_to_resid_post(self.base.model, self.steering_layer, self._hook_steer))
            thinking_state = (None,) * 4 if retok else self._prefill_thinking(think_ids)
            paths = self._paths(B, record, schedule is not None, thinking_state[0])
            bt = _Batch(rows, list(range(B)), torch.arange(B, device=tdev), H, *thinking_state,
                        *self._prefill_base(base_ids, paths.S), bdev=self.base.device, tdev=tdev)
            coefs = torch.tensor(s.coefficients if paths.candidate else [s.coefficient], device=bt.bdev)
            # shared drafts: a step may only read or draft, so a row's steps are bounded by a read and a whole
            # draft before each token
            for step in range(s.max_new_tokens * (s.draft_max_tokens + 2) if paths.shared else s.max_new_tokens):
                st = self._step_decide(bt, paths, step, schedule, think_ids, coefs)
                if st is None:  # shared drafts: every row is drafting
                    continue
                self._step_base(bt, paths, st, coefs)
                n_emitted = self._step_emit(bt, paths, st, coefs, record)
                if not self._drop_finished(bt, paths, st, bar):
                    break
                if step == s.max_new_tokens - 1 or retok or paths.lazy:
                    continue
                # the thinking model reads the emitted token (a token-mode speculative step: the tokens)
                self._read_emitted(bt, st.greedy_b[0][:n_emitted[0]] if st.L else None)
            for _ in bt.active:
                bar.update(1)
        return [self._result(r, record) for r in rows]

    def _step_decide(self, bt: _Batch, paths: _Paths, step: int, schedule: list | None, think_ids: list[list[int]],
                     coefs: Tensor) -> _Step | None:
        """Phase 1 of a step: bring the thinking model up to date where a row decides (lazy catch-up, shared drafts),
        pool each deciding row's sentence (`_pool_step`), decide, and for a token-mode speculative step gather the
        positions the base verifies. None: shared drafts, and no row writes at this step."""
        s, tdev = self.settings, bt.tdev
        arows = bt.arows
        state = [r.stream.current() for r in arows]
        need = [self.decides and (s.granularity == "token" or cut not in r.decided) and r.draft is None
                for r, (cut, _, _) in zip(arows, state)]
        starts = [first == end for (_, first, end) in state]
        done_drafts: list[int] = []  # shared drafts: rows whose draft ended at this step
        if paths.shared:
            done_drafts = self._shared_draft_turn(bt, need, starts)
            need = [n and r.draft is None for n, r in zip(need, arows)]  # drafting rows decide later
        elif paths.lazy and any(need) and any(r.pend or r.trail for r in arows):
            self._catch_up(bt, None)
        st = _Step(arows=arows, state=state, need=need, starts=starts,
                   g_known=[not r.pend for r in arows],  # lazy: this step's greedy token known once caught up
                   g=None if self.retokenize else bt.tlogits.argmax(-1),
                   tlogp=None if self.retokenize or paths.lazy else torch.log_softmax(bt.tlogits, -1),
                   cands=[[] for _ in arows], g_after={})
        self._pool_step(bt, paths, st, done_drafts, think_ids)
        behavior = torch.tensor([r.behavior for r in arows], device=tdev)
        if st.pooled_rows:
            beh, val = self._decide([arows[a] for a in st.pooled_rows], st.pooled_t)
            for j, a in enumerate(st.pooled_rows):
                r = arows[a]
                r.counts["decisions"] += 1
                if s.granularity == "sentence":
                    r.decided[state[a][0]] = (int(beh[j]), float(val[j]))
                else:
                    behavior[a] = beh[j]
        if s.granularity == "sentence" and self.decides:  # (-1 for a row still drafting: it does not write)
            behavior = torch.tensor([r.decided.get(cut, (-1,))[0] for r, (cut, _, _) in zip(arows, state)],
                                    device=tdev)
        if schedule is not None:
            plan = [schedule[i][step] if step < len(schedule[i]) else (None, 0.0) for i in bt.active]
            behavior = torch.tensor([-1 if b is None else int(b) for b, _ in plan], device=tdev)
            st.coef_sched = torch.tensor([float(c) for _, c in plan], device=bt.bdev)
        for r, b in zip(arows, behavior.tolist()):
            r.behavior = b
        st.behavior = behavior
        if paths.tspec and st.A == 1:
            r, cut = arows[0], state[0][0]
            if need[0] and not starts[0] and r.trail is None and s.max_new_tokens - r.n_steps > 1:
                # in mid-sentence, off the thinking model's draft: the base drafts the rest of the sentence
                st.cands[0], st.g_after[0] = self._base_self_draft(
                    bt, behavior, coefs, cut, min(s.max_new_tokens - r.n_steps - 1, s.draft_max_tokens))
            if st.cands[0]:
                st.pos_beh = self._token_positions(r, int(bt.orig[0]), cut, st.cands[0], bt.H, int(behavior[0]))
                st.cands[0] = st.cands[0][:len(st.pos_beh) - 1]
        if paths.shared:  # the rows that write at this step (the others, drafting, get a masked hole)
            st.writing = [r.draft is None and (not self.decides or s.granularity == "token" or cut in r.decided)
                          for r, (cut, _, _) in zip(arows, state)]  # (token mode: decided at this step)
            if not any(st.writing):
                return None
        return st

    def _shared_draft_turn(self, bt: _Batch, need: list[bool], starts: list[bool]) -> list[int]:
        """Shared drafts, at the start of a step: a row at a sentence start with nothing to read starts its draft at
        once; every row reads the token it emitted at the last step while every drafting row feeds its next draft
        token, in ONE thinking forward (`_catch_up`); a row that has just read at a sentence start drafts from the
        next step. Returns the rows whose draft ended (its cache entries become masked holes)."""
        s, arows = self.settings, bt.arows

        def start_draft(a: int) -> None:  # its first token: the thinking greedy token after what it read
            arows[a].draft = _Draft(self.thinking.tokenizer, self.eos_ids)
            arows[a].dnext, arows[a].dcols = int(bt.tlogits[a].argmax()), []

        for a, r in enumerate(arows):
            if need[a] and starts[a] and not r.pend:
                start_draft(a)
        # one token read a step (unless a verified draft emitted several): the forward stays one position wide, so
        # the cache grows by one column a step, not by the longest backlog
        readers = [a for a, r in enumerate(arows) if r.pend]
        if readers or any(r.draft is not None for r in arows):
            self._catch_up(bt, readers)
        done: list[int] = []
        for a, r in enumerate(arows):
            if a in readers and need[a] and starts[a]:
                start_draft(a)
            elif r.draft is not None and a not in readers and (
                    r.draft.pooled is not None or len(r.draft.fed) >= s.draft_max_tokens):
                done.append(a)
                bt.tmask[a, r.dcols] = 0
        return done

    def _pool_step(self, bt: _Batch, paths: _Paths, st: _Step, done_drafts: list[int],
                   think_ids: list[list[int]]) -> None:
        """The pooled activation of each row that decides at this step (`st.pooled_rows`, `st.pooled_t`): at a
        sentence start its thinking draft's (drafted now, or a shared draft that has just ended), in mid-sentence
        the running mean over the sentence's tokens in H; under re-tokenisation both from the re-encoded text.
        Speculative steps: each draft's tokens go to `st.cands`, the thinking greedy token after each to
        `st.g_after`."""
        s, tdev = self.settings, bt.tdev
        arows, need, starts, A = st.arows, st.need, st.starts, st.A
        verify = (paths.spec and (A == 1 or s.speculative == "always")) or (paths.tspec and A == 1)
        pooled: list[Tensor] = []
        draft_h = None
        if self.retokenize:
            st.pooled_rows = [a for a, n in enumerate(need) if n]
            if st.pooled_rows:
                st.pooled_t, drafted = self._pool_retokenized(
                    [think_ids[bt.active[a]] for a in st.pooled_rows], [arows[a].stream.text for a in st.pooled_rows],
                    [st.state[a][0] for a in st.pooled_rows])
                for a, d in zip(st.pooled_rows, drafted):
                    arows[a].counts["drafts"] += d
            return
        if paths.shared:
            for a in done_drafts:
                r = arows[a]
                st.pooled_rows.append(a)
                pooled.append(r.draft.result().float())
                r.counts["drafts"] += 1
                if verify:  # its draft tokens; the greedy token after each is the next one, after the last dnext
                    st.cands[a] = r.draft.fed[:s.max_new_tokens - r.n_steps - 1]
                    st.g_after[a] = r.draft.fed[1:] + [r.dnext]
                r.draft = None
        elif any(n and at_start for n, at_start in zip(need, starts)):
            g = st.g
            if s.draft == "sentence":
                rows_d = [a for a, (n, at_start) in enumerate(zip(need, starts)) if n and at_start]
                sel = torch.tensor(rows_d, device=tdev)
                draft_h = torch.zeros(A, self.thinking.d_model, device=tdev)
                seqs: list[list[int]] | None = [] if verify else None
                if paths.reuse and A == 1:  # a lone row drafts in place (draft reuse)
                    r = arows[0]
                    if r.trail is not None:  # a token-mode draft not used up: drop its unread rest
                        self._crop(bt.tcache, len(r.trail["fed"]) - r.trail_used)
                    trail: list[dict] = []
                    draft_h = self._draft_sentence(g, bt.tmask, bt.tpos, bt.tcache, None, seqs=seqs, trail=trail)
                    r.trail, r.trail_used = trail[0], 0
                else:
                    draft_h[sel] = self._draft_sentence(g[sel], bt.tmask[sel], bt.tpos[sel], bt.tcache, sel,
                                                        seqs=seqs)
                for a, seq in zip(rows_d, seqs or []):
                    room = s.max_new_tokens - arows[a].n_steps - 1  # the verify step emits <= len + 1
                    st.cands[a] = seq[:-1][:room]
                    st.g_after[a] = seq[1:]  # (a greedy draft: its next token; then the one after it)
            else:
                self._captured = None
                self._forward(self.thinking, "draft", g[:, None], torch.cat([bt.tmask, bt.tmask.new_ones(A, 1)], 1),
                              bt.tpos[:, None], bt.tcache)
                draft_h = self._captured  # [A, d]
                for layer in bt.tcache.layers[: self.sae_layer + 1]:
                    layer.crop(-1)
        for a, (n, at_start, (_, first, end)) in enumerate(zip(need, starts, st.state)):
            if not n:
                continue
            st.pooled_rows.append(a)
            if at_start:
                pooled.append(draft_h[a].float())
                arows[a].counts["drafts"] += 1
            else:
                pooled.append(bt.H[bt.active[a], first:end].float().mean(0))
        if pooled:
            st.pooled_t = torch.stack(pooled)

    def _step_base(self, bt: _Batch, paths: _Paths, st: _Step, coefs: Tensor) -> None:
        """Phase 2 of a step: the steering deltas, ONE base forward (each row's fed token, plus a speculative step's
        draft tokens, or candidate mode's K copies) and the token each row emits (`st.e`; a speculative step's
        greedy tokens `st.greedy_b`). A one-token step's new cache column is added to `bt.bmask`."""
        s, bdev = self.settings, bt.bdev
        S, K, A = paths.S, paths.K, st.A
        beh_b = st.behavior.to(bdev)
        is_active = beh_b >= 0
        writing_t = None if st.writing is None else torch.tensor(st.writing, device=bdev)
        # the steering: delta [A, K, d] for the steered rows
        if st.coef_sched is not None and not paths.candidate:
            st.cf = st.coef_sched[:, None]  # [A, 1]
        else:
            st.cf = coefs[None, :].expand(A, -1)  # [A, Kc]
        tables = [r.vectors for r in st.arows] if s.control == "random_vectors" else None
        delta, st.use_vec, st.bias_on = self._deltas(beh_b, st.cf, tables)  # [A, Kc, d], [A], [A]
        if paths.candidate and s.unsteered_candidate and delta is not None:
            delta = torch.cat([delta, torch.zeros_like(delta[:, :1])], 1)
        if st.pos_beh is not None:  # token-mode speculative step (one row): a delta per verified position
            n_pos = len(st.pos_beh)
            p_delta, p_vec, p_bias = self._deltas(torch.tensor(st.pos_beh, device=bdev), st.cf[:1].expand(n_pos, -1),
                                                  None if tables is None else tables * n_pos)
            delta = None if p_delta is None else p_delta[:, 0][None]  # [1, 1 + L, d]
            st.per_position = list(zip(st.pos_beh, (p_vec & (st.cf[0, 0] != 0) & self.steers).tolist(),
                                       (p_bias & (self.bias is not None) & self.steers).tolist()))
        if delta is not None and S == 2:  # interleave the unsteered rows (zero delta)
            delta = torch.stack([delta, torch.zeros_like(delta)], 1).flatten(0, 1)
        R = A * S
        # the new base column of each row: 1, or 0 for a row that does not write (shared drafts)
        col = (bt.bmask.new_ones(R, 1) if writing_t is None else
               writing_t.repeat_interleave(S)[:, None].to(bt.bmask.dtype))
        st.L = L = max(len(c) for c in st.cands)  # speculative: draft tokens verified in this forward (0: none)
        if L:  # each row: its fed token + its draft's tokens (padded with masked positions) at one delta
            inp, cols = self._right_pad([[f] + c for f, c in zip(bt.feed.tolist(), st.cands)], 1 + L, self.pad_id,
                                        bdev)
            inp, cols = inp.repeat_interleave(S, 0), cols.repeat_interleave(S, 0)
            mask_in, pos_in = torch.cat([bt.bmask, cols], 1), bt.bpos[:, None] + torch.arange(1 + L, device=bdev)
        else:
            inp, pos_in = bt.feed.repeat_interleave(S)[:, None].expand(R, K), bt.bpos[:, None].expand(R, K)
            if K == 1:
                mask_in = torch.cat([bt.bmask, col], 1)
            else:
                mask_in = self._candidate_mask(bt.bmask, K, self.base.model.dtype)
        self._delta = delta
        logits = self._forward(self.base, "base", inp, mask_in, pos_in, bt.bcache).float()
        self._delta = None
        st.logits = logits
        steered_logits = logits[0::S]  # [A, K, V]
        # the token each row emits
        st.chosen = torch.zeros(A, dtype=torch.long, device=bdev)
        if paths.candidate:
            st.options = steered_logits.argmax(-1)  # [A, K]
            score = st.tlogp.to(bdev).gather(1, st.options)
            st.chosen = torch.where(is_active, score.argmax(1), 0)
            st.e = st.options.gather(1, st.chosen[:, None])[:, 0]
            self._keep_candidate(bt.bcache, bt.bmask.shape[1], st.chosen.repeat_interleave(S) * (
                torch.arange(R, device=bdev) % S == 0), K)
        elif s.control == "oracle":
            base_greedy = steered_logits[:, 0].argmax(-1)
            st.sub = is_active & (st.g.to(bdev) != base_greedy)
            st.e = torch.where(st.sub, st.g.to(bdev), base_greedy)
        elif s.control == "unsteered_rerank":
            st.options = steered_logits[:, 0].topk(s.rerank_top_c or s.n_candidates, -1).indices  # [A, C]
            score = st.tlogp.to(bdev).gather(1, st.options)
            st.chosen = torch.where(is_active, score.argmax(1), 0)
            st.e = st.options.gather(1, st.chosen[:, None])[:, 0]
        else:
            st.e = steered_logits[:, 0].argmax(-1)
            if writing_t is not None:  # a drafting row keeps the token it will feed when it writes
                st.e = torch.where(writing_t, st.e, bt.feed)
        if L:  # [A][1 + L]: the steered (and unsteered) greedy token after each fed position
            st.greedy_b = steered_logits.argmax(-1).tolist()
            st.greedy_u = logits[1::2].argmax(-1).tolist() if S == 2 else (None if self.steers else st.greedy_b)
        else:
            bt.bmask = torch.cat([bt.bmask, col], 1)
            bt.bpos = bt.bpos + col[:, 0]

    def _step_emit(self, bt: _Batch, paths: _Paths, st: _Step, coefs: Tensor, record: bool) -> list[int]:
        """Phase 3 of a step: tally and append each writing row's emitted token (a speculative step: its verified
        tokens, `_emit_verified`), keep `record`'s per-step tensors, and set `st.e` to each row's next base input.
        Returns the tokens each row emitted at a speculative step (else [])."""
        s, bdev = self.settings, bt.bdev
        S, A, logits = paths.S, st.A, st.logits
        if paths.candidate:
            chosen = st.chosen
            k_coef = torch.where(chosen < len(s.coefficients), coefs[chosen.clamp(max=len(coefs) - 1)], 0.0)
        else:
            k_coef = st.cf[:, 0] if self.steers else torch.zeros(A, device=bdev)
        steered = st.use_vec & (k_coef != 0) & self.steers
        bias_on = st.bias_on
        if paths.candidate and s.unsteered_candidate:
            bias_on = bias_on & (st.chosen < len(s.coefficients))
        # one transfer per step, not one per row
        u = logits[1::2, 0].argmax(-1) if S == 2 else (None if self.steers else logits[:, 0].argmax(-1))
        e_l, ch_l, st.steered_l = st.e.tolist(), st.chosen.tolist(), steered.tolist()
        st.g_l = [None] * A if st.g is None else st.g.tolist()
        u_l = None if u is None else u.tolist()
        st.bias_l = (bias_on & (self.bias is not None) & self.steers).tolist()
        sub_l = st.sub.tolist() if s.control == "oracle" else [False] * A
        n_emitted = []  # speculative steps: tokens emitted per row
        for a, r in enumerate(st.arows):
            if st.writing is not None and not st.writing[a]:
                n_emitted.append(0)  # (a speculative step: it emits nothing, its columns become holes)
                continue
            if st.L:
                n_emitted.append(self._emit_verified(st, a, paths.lazy))
                continue
            self._tally(r, e_l[a], st.steered_l[a], st.bias_l[a], None if u_l is None else u_l[a], st.g_l[a],
                        not st.g_known[a])
            c = r.counts
            c["substituted"] += sub_l[a]
            if paths.candidate or s.control == "unsteered_rerank":
                c["reranked"] += ch_l[a] != 0
            if record:
                rec = r.record
                k = ch_l[a] if paths.candidate else 0
                rec["step_logits"].append(logits[a * S, k].cpu())
                rec["candidate_logits"].append(logits[a * S].cpu())
                rec["unsteered_logits"].append(logits[a * S + 1, 0].cpu() if S == 2 else None)
                j = st.pooled_rows.index(a) if a in st.pooled_rows else None
                rec["pooled"].append(None if j is None else st.pooled_t[j].cpu())
                rec["at_start"].append(st.starts[a] if st.need[a] else None)
                rec["behavior"].append(r.behavior)
                rec["coefficient"].append(float(k_coef[a]))
                rec["candidates"].append(None if st.options is None else st.options[a].tolist())
                rec["thinking_greedy"].append(st.g_l[a])
                rec["base_greedy"].append(None if u_l is None else u_l[a])
                rec["emitted"].append(e_l[a])
            self._append(r, e_l[a], paths.lazy)
        if st.L:  # keep each row's fed positions whose predictions were emitted; the rest become holes
            n_t = torch.tensor(n_emitted, device=bdev).repeat_interleave(S)
            bt.bmask = torch.cat([bt.bmask, (torch.arange(1 + st.L, device=bdev)[None] < n_t[:, None]).to(
                bt.bmask.dtype)], 1)
            bt.bpos = bt.bpos + n_t
            st.e = torch.tensor([st.greedy_b[a][n - 1] if n else f for a, (n, f) in enumerate(
                zip(n_emitted, bt.feed.tolist()))], device=bdev)  # the next feed
        return n_emitted

    def _drop_finished(self, bt: _Batch, paths: _Paths, st: _Step, bar: Any) -> bool:
        """After a step: settle the stats of rows that leave (lazy thinking), drop them from both caches, and feed
        each remaining row the token it emitted (`st.e`). False when no row is left."""
        s = self.settings
        done = [r.finished or r.n_steps >= s.max_new_tokens for r in st.arows]
        if paths.lazy and any(d and r.pending_u for d, r in zip(done, st.arows)):
            self._catch_up(bt, None)  # settle a leaving row's stats
        keep = [a for a, d in enumerate(done) if not d]
        if any(done):
            bar.update(sum(done))
        if not keep:
            bt.active = []
            return False
        e = st.e
        if len(keep) < st.A:
            bdev, S = bt.bdev, paths.S
            kb = torch.tensor(keep, device=bdev)
            kbs = (kb[:, None] * S + torch.arange(S, device=bdev)).flatten()
            bt.bcache.batch_select_indices(kbs)
            bt.bmask, bt.bpos = bt.bmask[kbs], bt.bpos[kbs]
            if not self.retokenize:
                kt = kb.to(bt.tdev)
                bt.tcache.batch_select_indices(kt)
                bt.tmask, bt.tpos, bt.orig, bt.tlogits = bt.tmask[kt], bt.tpos[kt], bt.orig[kt], bt.tlogits[kt]
            e = e[kb]
            bt.active = [bt.active[a] for a in keep]
        bt.feed = e
        return True

    def _deltas(self, behavior: Tensor, cf: Tensor, tables: list[Tensor] | None
                ) -> tuple[Tensor | None, Tensor, Tensor]:
        """Steering of n rows with `behavior` [n] (-1: none) at coefficients `cf` [n, Kc]: the deltas [n, Kc, d]
        (None where nothing ever steers the base), whether each row gets its behavior vector [n], and whether it
        gets the bias [n] (meaningful only with a bias). `tables`: each row's own vectors (random_vectors)."""
        use_vec = behavior.ge(0) & (self.settings.control != "bias_only")
        index = behavior.clamp(min=0)
        if tables is not None:
            table = torch.stack([t[b] for t, b in zip(tables, index.tolist())])
        else:
            table = self.vectors[index]
        bias_on = torch.zeros_like(use_vec)
        if not self.steers:
            return None, use_vec, bias_on
        delta = cf[:, :, None] * (table * use_vec[:, None])[:, None, :]  # [n, Kc, d]
        if self.bias is not None:
            bias_on = torch.ones_like(bias_on) if self.settings.bias_always else use_vec
            delta = delta + bias_on[:, None, None] * self.bias
        return delta, use_vec, bias_on

    def _prefill_base(self, base_ids: list[list[int]], S: int) -> tuple[Any, Tensor, Tensor, Tensor]:
        """The base reads every prompt but its last token (no steering there; the last one is fed at step 0), left
        padded, each row twice when S == 2 (steered, unsteered). Returns (cache, mask, next positions, feed)."""
        from sae_reasoning.kv_cache import growing_cache

        bdev = self.base.device
        cache = growing_cache(self.base.model.config)
        ids, mask = self._left_pad([x[:-1] for x in base_ids], self.pad_id, bdev)
        if ids.shape[1] > 0:
            self._forward(self.base, "prefill", ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache,
                          logits_to_keep=1)
        pos = mask.sum(-1)  # the next position of each row = its number of real tokens
        if S == 2:
            cache.batch_repeat_interleave(2)
            mask, pos = mask.repeat_interleave(2, 0), pos.repeat_interleave(2, 0)
        return cache, mask, pos, torch.tensor([x[-1] for x in base_ids], device=bdev)

    def _prefill_thinking(self, think_ids: list[list[int]]) -> tuple[Any, Tensor, Tensor, Tensor]:
        """The thinking model reads each whole chat prompt (left padded). Returns (cache, mask, next positions, the
        last logits [B, V], whose argmax is the first thinking greedy token)."""
        from sae_reasoning.kv_cache import growing_cache

        cache = growing_cache(self.thinking.model.config)
        ids, mask = self._left_pad(think_ids, self.pad_id, self.thinking.device)
        logits = self._forward(self.thinking, "think", ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache,
                               logits_to_keep=1)
        return cache, mask, mask.sum(-1), logits[:, -1].float()

    def _paths(self, B: int, record: bool, scheduled: bool, tcache: Any) -> "_Paths":
        """Which of the decoder's paths a batch of `B` rows takes (module doc), from the settings, `record`, whether
        a `schedule` replaces the decisions and the thinking cache `tcache` (None: re-tokenisation keeps none)."""
        from transformers.cache_utils import DynamicLayer

        from sae_reasoning.kv_cache import GrowingLayer

        s, retok = self.settings, self.retokenize
        candidate = s.candidate_mode and s.control not in ("oracle", "unsteered_rerank")
        # Lazy thinking: in sentence mode (plain, bias_only, random_*) the thinking model's state is needed only where
        # a row decides (its draft, or H for a sentence that already has tokens) and for the disagreement stat, which
        # can wait: the emitted tokens are read in ONE forward at the next decision instead of one forward per step.
        lazy_ok = (s.lazy_thinking and not retok and not record and not candidate
                   and s.control not in ("oracle", "unsteered_rerank"))
        lazy = lazy_ok and s.granularity == "sentence"
        # shared drafts: each row drafts one token a step inside one shared thinking forward while the others write.
        # Token mode too: there the rows read lazily, but a row decides at every step, so every step's shared forward
        # reads the token each writing row emitted at the step before (one thinking call a step, as without)
        shared = (lazy_ok and shared_drafts_enabled(s.shared_drafts, self.base.device) and s.draft == "sentence"
                  and not scheduled and B > 1 and self.decides)
        lazy = lazy or shared
        # speculative steps (sentence mode). With shared drafts a row verifies the draft it has just ended in the
        # step's one base forward, so on a GPU the verify costs no call of its own, but it widens that forward
        spec = (lazy and s.granularity == "sentence" and s.speculative != "off" and s.draft == "sentence"
                and not scheduled)
        # draft reuse: a lone row drafts in place; its catch-up (lazy) or its one-token reads (token mode) skip what
        # the draft already read. Only where the thinking logits serve no more than their argmax (lazy thinking
        # implies every condition but the draft's), and for plain caches (crop is exact there)
        reuse = (s.draft_reuse and s.draft == "sentence" and tcache is not None and not record and not candidate
                 and s.control != "unsteered_rerank" and not shared
                 and all(type(layer) in (DynamicLayer, GrowingLayer) for layer in tcache.layers))
        # token-mode speculative steps: a lone row (draft reuse: its draft stays in the cache) verifies its draft
        # sentence with the decision one-token steps would make before each draft token. Not with the oracle (it
        # emits thinking tokens) nor random_behavior (its random draws would run ahead of the tokens)
        tspec = (s.granularity == "token" and s.speculative != "off" and reuse and not scheduled
                 and self.decides and s.control in ("none", "bias_only", "random_vectors"))
        return _Paths(candidate=candidate, S=2 if (self.steers and s.track_unsteered) else 1,
                      K=s.n_candidates if candidate else 1, lazy=lazy, spec=spec, shared=shared, reuse=reuse,
                      tspec=tspec)

    def _catch_up(self, bt: _Batch, readers: list[int] | None) -> None:
        """Lazy thinking: every active row (or those at the positions `readers`) reads its pending tokens
        (`_Row.pend`) in one forward; rows with fewer (speculative steps emit several tokens) are padded with masked
        positions, which stay in the cache as holes. Their block-`sae_layer` outputs go to `H` (row `orig[a]`).
        Settles the disagreement stat of the tokens whose thinking greedy token was not known yet. Draft reuse: a
        row whose draft was left in the cache (`_Row.trail`) keeps the entries of the draft's tokens that it then
        emitted (the longest common prefix; their outputs and greedy tokens are the draft's) and reads only the
        rest; with nothing left to read no forward runs at all. Shared drafts: every row that is drafting
        (`_Row.draft`) feeds its next draft token in the same forward, at the position after its draft's previous
        tokens (`tpos` counts read tokens only). Updates the batch's tmask, tpos and tlogits."""
        s, arows, tcache, H = self.settings, bt.arows, bt.tcache, bt.H
        tmask, tpos, tlogits = bt.tmask, bt.tpos, bt.tlogits
        tdev, A = tmask.device, len(arows)
        reading = [readers is None or a in readers for a in range(A)]
        drafting = [r.draft is not None and r.draft.pooled is None and len(r.draft.fed) < s.draft_max_tokens
                    for r in arows]
        reused = [0] * A
        for a, r in enumerate(arows):
            if r.trail is not None and reading[a]:
                fed, m = r.trail["fed"], 0
                while m < min(len(fed), len(r.pend)) and fed[m] == r.pend[m]:
                    m += 1
                self._crop(tcache, len(fed) - m)  # only a lone row drafts in place: the cache is its own
                reused[a] = m
        if any(reused):
            tmask = torch.cat([tmask, tmask.new_ones(A, max(reused))], 1)
            tpos = tpos + torch.tensor(reused, device=tdev)
        feeds = [r.pend[m:] if rd else ([r.dnext] if dr else [])
                 for r, m, rd, dr in zip(arows, reused, reading, drafting)]
        n_new = [len(f) if rd else 0 for f, rd in zip(feeds, reading)]
        p = max(len(f) for f in feeds)
        greedy = [[] for _ in arows]  # [a][j]: the thinking greedy token after the row's j-th fed token
        if p:
            ids, chunk = self._right_pad(feeds, p, self.pad_id, tdev)
            col = tmask.shape[1]
            tmask = torch.cat([tmask, chunk], 1)
            offset = torch.tensor([len(r.draft.fed) if dr else 0 for r, dr in zip(arows, drafting)], device=tdev)
            self._captured = None
            logits = self._forward(self.thinking, "prefix", ids, tmask,
                                   (tpos + offset)[:, None] + torch.arange(p, device=tdev), tcache).float()
            hidden = self._captured.to(H.dtype)
            n_t = torch.tensor(n_new, device=tdev)
            last = logits[torch.arange(A, device=tdev), (n_t - 1).clamp(min=0)]
            tlogits = torch.where((n_t > 0)[:, None], last, tlogits)
            tpos = tpos + n_t
            greedy = logits.argmax(-1).tolist()
        for a, (r, n, m, o) in enumerate(zip(arows, n_new, reused, bt.orig.tolist())):
            if drafting[a]:  # shared drafts: one more draft token
                r.draft.feed(r.dnext, hidden[a, 0].float())
                r.dcols.append(col)
                r.dnext = greedy[a][0]
                continue
            if not reading[a]:
                continue
            after = (r.trail["after"][:m] if m else []) + greedy[a][:n]
            start = r.n_steps - n - m
            if m:
                H[o, start: start + m] = r.trail["h"][:m].to(H.dtype)
                if not n:  # nothing read: the greedy token after the last reused one is the draft's
                    self._set_greedy(tlogits, a, after[-1])
            if n:
                H[o, start + m: r.n_steps] = hidden[a, :n]
            r.counts["disagree"] += sum(u_ != after[j - 1] for j, u_ in r.pending_u)
            r.pend, r.pending_u, r.trail = [], [], None
        bt.tmask, bt.tpos, bt.tlogits = tmask, tpos, tlogits

    def _read_emitted(self, bt: _Batch, verified: list[int] | None) -> None:
        """The one-token path (no lazy thinking): the thinking model reads what each row emitted at this step, its
        next base input `bt.feed` [A] (a lone row's token-mode speculative step: the tokens `verified`), storing its
        block-`sae_layer` outputs in H and updating the batch's tmask, tpos and tlogits. A lone row whose draft is in
        the cache (draft reuse) takes the tokens the draft already read from it and reads only the rest, after
        cropping the draft's unread tokens."""
        arows, H, orig = bt.arows, bt.H, bt.orig
        tdev = bt.tmask.device
        r = arows[0]  # a trail exists only for a lone row
        new = verified if verified is not None else ([int(bt.feed[0])] if r.trail is not None else None)
        if new is None:
            bt.tmask = torch.cat([bt.tmask, bt.tmask.new_ones(len(arows), 1)], 1)
            bt.tlogits = self._forward(self.thinking, "think", bt.feed[:, None].to(tdev), bt.tmask, bt.tpos[:, None],
                                       bt.tcache)[:, -1].float()
            H[orig, torch.tensor([x.n_steps - 1 for x in arows], device=tdev)] = self._captured.to(H.dtype)
            bt.tpos = bt.tpos + 1
            return
        k, n0 = 0, r.n_steps - len(new)  # the tokens the draft already read, at these positions, are done
        while r.trail is not None and k < len(new) and r.trail["fed"][r.trail_used] == new[k]:
            H[orig, n0 + k] = r.trail["h"][r.trail_used].to(H.dtype)
            self._set_greedy(bt.tlogits, 0, r.trail["after"][r.trail_used])
            r.trail_used, k = r.trail_used + 1, k + 1
            if r.trail_used == len(r.trail["fed"]):
                r.trail = None
        bt.tmask = torch.cat([bt.tmask, bt.tmask.new_ones(1, len(new))], 1)
        bt.tpos = bt.tpos + k
        if k == len(new):
            return
        if r.trail is not None:  # the base left the draft: drop its unread rest
            self._crop(bt.tcache, len(r.trail["fed"]) - r.trail_used)
            r.trail = None
        rest = new[k:]
        self._captured = None
        bt.tlogits = self._forward(self.thinking, "prefix", torch.tensor([rest], device=tdev), bt.tmask,
                                   bt.tpos[:, None] + torch.arange(len(rest), device=tdev), bt.tcache)[:, -1].float()
        H[orig, n0 + k: n0 + len(new)] = self._captured.to(H.dtype)
        bt.tpos = bt.tpos + len(rest)

    def _base_self_draft(self, bt: _Batch, behavior: Tensor, coefs: Tensor, cut: int, limit: int
                         ) -> tuple[list[int], list[int]]:
        """Token mode, the lone row in mid-sentence (sentence `cut`) after the base left the thinking model's draft:
        one-token steps would now cost a thinking read per token. Instead the base drafts the rest of the sentence
        greedily at the decision just made (`behavior`), on a copy of its steered row's cache (up to `limit` tokens;
        it stops after a token that changes the sentence, and before eos), and the thinking model reads the draft in
        ONE forward, which stays in its cache as a draft-reuse trail. The verify forward then steers each position
        with the decision one-token steps would make there (`_token_positions`, from the draft's outputs), so the
        base keeps its tokens while the decision holds (within a sentence it rarely changes) and the result is
        one-token steps' own. Returns the draft and the thinking model's greedy token after each of its tokens."""
        r = bt.arows[0]
        bdev, tdev = bt.bmask.device, bt.tmask.device
        tables = [r.vectors] if self.settings.control == "random_vectors" else None
        delta, _, _ = self._deltas(behavior[:1].to(bdev), coefs[None, :1], tables)  # [1, 1, d] or None
        cache = self._rows_copy(bt.bcache, torch.zeros(1, dtype=torch.long, device=bdev))  # the steered row
        stream, seq, tok, mask = r.stream.fork(), [], bt.feed[:1], bt.bmask[:1]
        for i in range(limit):
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
            self._delta = delta
            logits = self._forward(self.base, "base", tok[:, None], mask, (bt.bpos[:1] + i)[:, None], cache,
                                   logits_to_keep=1)
            self._delta = None
            t = int(logits[0, -1].argmax())
            if t in self.eos_ids:
                break
            seq.append(t)
            stream.append(t)
            c, first, end = stream.current()
            if c != cut or first == end:  # the sentence changes after t: the verify step ends there anyway
                break
            tok = torch.tensor([t], device=bdev)
        if not seq:
            return [], []
        self._captured = None
        logits = self._forward(self.thinking, "prefix", torch.tensor([seq], device=tdev),
                               torch.cat([bt.tmask, bt.tmask.new_ones(1, len(seq))], 1),
                               bt.tpos[:, None] + torch.arange(len(seq), device=tdev), bt.tcache)
        after = logits[0].argmax(-1).tolist()
        r.trail, r.trail_used = dict(fed=seq, h=self._captured.reshape(len(seq), -1).float(), after=after), 0
        return seq, after

    def _token_positions(self, r: _Row, o: int, cut: int, cand: list[int], H: Tensor, first_behavior: int
                         ) -> list[int]:
        """A token-mode speculative step of lone row `r` (batch row `o` of `H`) in sentence `cut`, at its start (the
        thinking model's draft) or in mid-sentence (a base self-draft): the behavior that one-token steps would
        decide before each position of the verify forward, while the base writes the draft's tokens `cand` (its
        trail, `r.trail`). Position 0's is `first_behavior` (the decision made at this step); position
        j pools the running mean of the sentence with the draft's first j tokens emitted, whose outputs are the
        draft's (written into `H` where one-token steps would read them; later reads overwrite what the base does
        not write). Stops before a position that one-token steps would not reach inside this sentence: after eos, or
        where the sentence would change (a cut or a retraction, or still no token of its own: a new draft). The
        caller verifies only the positions returned (the first len(result) - 1 draft tokens)."""
        start = r.n_steps
        H[o, start: start + len(cand)] = r.trail["h"][:len(cand)].to(H.dtype)
        stream, behaviors = r.stream.fork(), [first_behavior]
        for t in cand:
            if t in self.eos_ids:
                break
            stream.append(t)
            c, first, end = stream.current()
            if c != cut or first == end:
                break
            behavior, _ = self._decide([r], H[o, first:end].float().mean(0)[None])  # one row: one-token rounding
            behaviors.append(int(behavior[0]))
        return behaviors

    @staticmethod
    def _rows_copy(cache: Any, rows: Tensor) -> Any:
        """A cache holding only `rows` of `cache`, to extend on its own: indexing makes new tensors, so the shared
        cache is left untouched (and a copied `GrowingLayer` never appends into the original's buffer)."""
        cache = copy.copy(cache)
        cache.layers = [copy.copy(layer) for layer in cache.layers]
        cache.batch_select_indices(rows)
        return cache

    @staticmethod
    def _crop(cache: Any, n: int) -> None:
        """Drop the last `n` entries of every layer of `cache` (draft reuse: a lone row's unread draft)."""
        if n > 0:
            for layer in cache.layers:
                layer.crop(-n)

    @staticmethod
    def _set_greedy(tlogits: Tensor, a: int, token: int) -> None:
        """Row `a`'s thinking logits known only by their greedy token (a reused draft's): only their argmax is
        read where draft reuse runs."""
        tlogits[a] = float("-inf")
        tlogits[a, token] = 0.0

    @staticmethod
    def _candidate_mask(past: Tensor, K: int, dtype: torch.dtype) -> Tensor:
        """Additive 4D mask [R, 1, K, T + K]: each of the K copies of the new token sees the cache and itself."""
        R, T = past.shape
        seen = torch.cat([past.bool()[:, None, None, :].expand(R, 1, K, T),
                          torch.eye(K, dtype=torch.bool, device=past.device)[None, None].expand(R, 1, K, K)], -1)
        mask = torch.zeros(seen.shape, dtype=dtype, device=past.device)
        return mask.masked_fill(~seen, torch.finfo(dtype).min)

    @staticmethod
    def _keep_candidate(cache: Any, T: int, chosen: Tensor, K: int) -> None:
        """Reduce the K candidate entries appended at position T to the chosen one per row, in place."""
        from transformers.cache_utils import DynamicLayer

        from sae_reasoning.kv_cache import GrowingLayer

        rows = torch.arange(chosen.shape[0], device=chosen.device)
        for layer in cache.layers:
            if type(layer) not in (DynamicLayer, GrowingLayer):
                raise HybridError(f"candidate mode needs plain DynamicLayer caches, got {type(layer).__name__} "
                                  "(sliding-window or other special attention)")
            for name in ("keys", "values"):
                t = getattr(layer, name)  # [R, heads, T + K, head_dim]
                t[:, :, T] = t[rows, :, T + chosen.to(t.device)]
            layer.crop(-(K - 1))

    def _result(self, r: _Row, record: bool) -> dict:
        n = max(r.n_steps, 1)
        c = r.counts
        track = self.settings.track_unsteered or not self.steers
        out = {
            "index": r.index,
            "text": self.base.tokenizer.decode(r.stream.ids, skip_special_tokens=False),
            "token_ids": list(r.stream.ids),
            "n_tokens": len(r.stream.ids),
            "n_steps": r.n_steps,
            "finished": r.finished,
            "truncated": not r.finished,
            "control": self.settings.control,
            "granularity": self.settings.granularity,
            "candidate_mode": self.settings.candidate_mode,
            "steered_fraction": c["steered"] / n,
            "changed_fraction": c["changed"] / n if track else None,
            "disagreement_rate": c["disagree"] / n if track and not self.retokenize else None,
            "bias_fraction": c["bias"] / n,
            "substituted_fraction": c["substituted"] / n,
            "reranked_fraction": c["reranked"] / n,
            "behavior_counts": {str(k): v for k, v in sorted(r.behavior_counts.items())},
            "n_decisions": c["decisions"],
            "n_drafts": c["drafts"],
            "n_conflicting_tokens": c["conflicting"],
        }
        if record:
            out["record"] = r.record
        return out
