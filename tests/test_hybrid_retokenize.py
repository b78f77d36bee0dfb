"""Text-level re-tokenisation in the hybrid decoder (``hybrid.retokenize_text``), on real small models.

- The organism pair (one tokenizer) forced through the re-tokenisation path equals the token-level path.
- The organism's thinking model deciding for the tiny stories Llama (another tokenizer, another d_model): refused
  without ``retokenize_text``; with it, every decision equals an independent uncached recomputation from the text.
- Steering off in re-tokenisation mode is plain greedy decoding of the base.
"""

from __future__ import annotations

import pytest
import torch

from sae_reasoning.config import HybridConfig
from sae_reasoning.hooks import add_to_resid_post, capture_resid_post
from sae_reasoning.hybrid import HybridError, HybridGenerator
from sae_reasoning.models import load_model, thinking_prompt
from sae_reasoning.organism import BASE_DIR, THINKING_DIR, make_splits
from sae_reasoning.prompts import base_prompt
from sae_reasoning.sae import TopKSAE
from sae_reasoning.sentences import _boundaries, attach_token_spans, split_sentences

SAE_LAYER, STEER_LAYER, N_LATENTS = 2, 1, 6
STORIES = ["Tom saw a big dog", "Lily had a red ball and she wanted to play with her friend in the park",
           "The sun was hot", "A bird sang"]


@pytest.fixture(scope="module")
def organism():
    return (load_model(str(THINKING_DIR), dtype="float32", device="cpu"),
            load_model(str(BASE_DIR), dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def stories(stories_path):
    return load_model(str(stories_path), dtype="float32", device="cpu")


def random_sae(d):
    return TopKSAE.from_init(d, N_LATENTS, k=3, seed=0, norm_mean=torch.full((d,), 0.1))


def random_vectors(d, scale, seed=1):
    g = torch.Generator().manual_seed(seed)
    vecs = {i: torch.randn(d, generator=g) * scale * (1 + i / 2) for i in range(N_LATENTS - 1)}  # last: no vector
    return vecs, torch.randn(d, generator=g) / 10


def make(thinking, base, sae, vecs, bias, **kw):
    kw.setdefault("progress", False)
    return HybridGenerator(thinking, base, sae, SAE_LAYER, vecs, bias, STEER_LAYER, **kw)


def organism_prompts(hyb, base_tok):
    """Three test problems with 2, 3 and 4 operations (unequal prompt lengths); the base is started on " Plan:"
    (as in the organism's forced-plan evaluation) so that it writes several sentences."""
    problems = make_splits(0, n_train=10, n_val=3, n_test=40)["test"]
    chosen = [next(p for p in problems if p.n_ops == k) for k in (2, 3, 4)]
    plan = base_tok(" Plan:", add_special_tokens=False)["input_ids"]
    pairs = [hyb.prompts(p.question) for p in chosen]
    return [b + plan for b, _ in pairs], [t for _, t in pairs]


# ------------------------------------------------------------------------------------------------ references


def offline_current(text):
    """(at_start, cut) of the sentence being written, from the offline splitter on the whole text."""
    cuts = _boundaries(text, 0, len(text))
    cut = cuts[-1] if cuts else 0
    return not text[cut:].strip(), cut


def reference_pooled(thinking, think_prompt, text, at_start, draft_max=64):
    """Uncached: the thinking model on its prompt + `text` encoded by its own tokenizer. At a sentence start: its
    greedy draft of the next sentence (ended by the offline splitter or its eos), mean block output over the draft
    sentence's tokens; else the mean over the re-encoded tokens (by character offsets) of the text's last
    sentence."""
    tok = thinking.tokenizer
    gen = tok(text, add_special_tokens=False)["input_ids"] if text else []
    prefix = think_prompt + gen
    if not at_start:
        h = capture_resid_post(thinking.model, SAE_LAYER, input_ids=torch.tensor([prefix]), use_cache=False)[0]
        ends = [b for _, b in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        spans = [((ends[i - 1] if i else 0), ends[i]) for i in range(len(gen))]
        last = attach_token_spans(split_sentences(text, min_words=1), spans)[-1]
        return h[len(think_prompt) + last.token_start: len(think_prompt) + last.token_end].mean(0)
    eos = thinking.tokenizer.eos_token_id
    draft = []
    with torch.no_grad():
        draft.append(int(thinking.model(torch.tensor([prefix])).logits[0, -1].argmax()))
    while True:
        seq = torch.tensor([prefix + draft])
        h = capture_resid_post(thinking.model, SAE_LAYER, input_ids=seq, use_cache=False)[0, len(prefix):]
        if draft[-1] == eos:
            return h[:-1].mean(0) if len(draft) > 1 else h[0]
        dtext = tok.decode(draft)
        cuts = _boundaries(dtext, 0, len(dtext))
        if cuts:  # the draft's first sentence ended: its tokens are those starting before the cut
            starts = [len(tok.decode(draft[:j])) for j in range(len(draft))]
            return h[[j for j in range(len(draft)) if starts[j] < cuts[-1]]].mean(0)
        if len(draft) == draft_max:
            return h.mean(0)
        with torch.no_grad():
            draft.append(int(thinking.model(seq).logits[0, -1].argmax()))


def reference_decision(sae, pooled, vecs, threshold):
    with torch.no_grad():
        value, latent = sae.pre_acts(sae.normalise(pooled[None].float()))[0].max(-1)
    return int(latent) if float(value) >= threshold and int(latent) in vecs else -1


def plain_greedy(lm, questions, max_new_tokens):
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok([base_prompt(q) for q in questions], return_tensors="pt", padding=True)
    eos = tok.eos_token_id
    out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                            eos_token_id=eos)
    return [row[: row.index(eos)] if eos in row else row for row in out[:, enc["input_ids"].shape[1]:].tolist()]


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("draft,control", [("sentence", "none"), ("token", "random_behavior")])
def test_forced_retokenisation_equals_token_path(organism, draft, control):
    """One shared tokenizer whose encoding of the generated text gives back the emitted ids: re-encoding the text at
    each sentence start must give the same pooled activations, decisions and generations as feeding the ids."""
    thinking, base = organism
    sae = random_sae(thinking.d_model)
    vecs, bias = random_vectors(base.d_model, 0.5)
    kw = dict(granularity="sentence", threshold=-1e9, max_new_tokens=80, batch_size=3, draft=draft, control=control,
              seed=2)
    token_path = make(thinking, base, sae, vecs, bias, **kw)
    text_path = make(thinking, base, sae, vecs, bias, force_retokenize=True, **kw)
    assert not token_path.retokenize and text_path.retokenize
    base_ids, think_ids = organism_prompts(token_path, base.tokenizer)
    assert len({len(x) for x in base_ids}) == 3 and len({len(x) for x in think_ids}) == 3
    a = token_path.generate_ids(base_ids, think_ids, record=True)
    b = text_path.generate_ids(base_ids, think_ids, record=True)
    n_decisions, behaviors = 0, set()
    for ra, rb in zip(a, b):
        # the premise of exactness: the thinking tokenizer re-encodes the generated text to the emitted ids
        assert thinking.tokenizer(rb["text"], add_special_tokens=False)["input_ids"] == rb["token_ids"]
        assert rb["token_ids"] == ra["token_ids"] and rb["text"] == ra["text"]
        assert rb["record"]["behavior"] == ra["record"]["behavior"]
        assert rb["record"]["at_start"] == ra["record"]["at_start"]
        for pa, pb in zip(ra["record"]["pooled"], rb["record"]["pooled"]):
            assert (pa is None) == (pb is None)
            if pa is not None:
                assert torch.allclose(pa, pb, atol=1e-4, rtol=0), (pa - pb).abs().max()
                n_decisions += 1
        for key in ("n_decisions", "n_drafts", "steered_fraction", "changed_fraction", "bias_fraction",
                    "behavior_counts", "finished", "n_steps"):
            assert rb[key] == ra[key], key
        assert ra["disagreement_rate"] is not None and rb["disagreement_rate"] is None
        assert all(g is None for g in rb["record"]["thinking_greedy"])
        behaviors |= set(rb["record"]["behavior"])
    assert n_decisions >= 15 and len(behaviors) >= 3  # many sentences, several behaviors (and -1: no vector)
    assert len({r["n_steps"] for r in b}) > 1 and any(r["finished"] for r in b)  # rows dropped mid-batch


def test_mismatched_tokenizers_decide_from_reencoded_text(organism, stories):
    """Thinking = the organism's thinking model (226 word-level tokens, d_model 128), base = stories260K (512
    SentencePiece tokens, d_model 64). Each decision equals an uncached recomputation from the decoded text; each
    emitted token equals the uncached base steered with the recorded behaviors."""
    thinking, _ = organism
    sae = random_sae(thinking.d_model)
    vecs, bias = random_vectors(stories.d_model, 0.2)  # small enough that the stories stay stories (sentences)
    bias = bias / 2
    with pytest.raises(HybridError) as err:
        make(thinking, stories, sae, vecs, bias)
    assert "\n" not in str(err.value) and "hybrid.retokenize_text=true" in str(err.value)
    threshold = 0.0
    hyb = make(thinking, stories, sae, vecs, bias, cfg=HybridConfig(retokenize_text=True), threshold=threshold,
               max_new_tokens=48, batch_size=4)
    assert hyb.retokenize and hyb.settings.granularity == "sentence"
    res = hyb.generate(STORIES)
    think_prompts = [hyb.prompts(q)[1] for q in STORIES]
    assert all(p == thinking.tokenizer(thinking_prompt(thinking.tokenizer, q), add_special_tokens=False)["input_ids"]
               for p, q in zip(think_prompts, STORIES))
    # rerun with records (the same generations: decoding is deterministic)
    rec_res = hyb.generate_ids([hyb.prompts(q)[0] for q in STORIES], think_prompts, record=True)
    n_checked = n_active = 0
    decisions = set()
    for q, tp, r, rr in zip(STORIES, think_prompts, res, rec_res):
        assert r["token_ids"] == rr["token_ids"]
        rec, stok = rr["record"], stories.tokenizer
        emitted = rec["emitted"]
        for step in range(len(emitted)):
            if rec["pooled"][step] is None:
                continue
            text = stok.decode(emitted[:step])
            at_start, _cut = offline_current(text)
            assert rec["at_start"][step] == at_start
            ref = reference_pooled(thinking, tp, text, at_start)
            assert torch.allclose(rec["pooled"][step], ref, atol=1e-4, rtol=0), (step, text)
            assert rec["behavior"][step] == reference_decision(hyb.sae, ref, vecs, threshold), (step, text)
            n_checked += 1
            n_active += rec["behavior"][step] >= 0
            decisions.add(rec["behavior"][step])
        # every token: the uncached base with bias + behavior vector at its position gives it as argmax
        bp = hyb.prompts(q)[0]
        ids = torch.tensor([bp + emitted[:-1]])
        delta = torch.zeros(1, ids.shape[1], stories.d_model)
        for step, beh in enumerate(rec["behavior"]):
            delta[0, len(bp) - 1 + step] = bias + (vecs[beh] if beh >= 0 else 0)
        with torch.no_grad(), add_to_resid_post(stories.model, STEER_LAYER, delta):
            logits = stories.model(input_ids=ids, use_cache=False).logits[0, len(bp) - 1:]
        assert logits.argmax(-1).tolist() == emitted
        assert r["disagreement_rate"] is None and r["changed_fraction"] is not None
        assert r["n_decisions"] == sum(p is not None for p in rec["pooled"]) and r["n_drafts"] >= 1
        assert sum(r["behavior_counts"].values()) == round(r["steered_fraction"] * r["n_steps"])
    assert n_checked >= 15 and n_active >= 10 and len(decisions) >= 3
    # a decision inside a sentence that already has text pools the re-encoded sentence's own tokens
    text = stories.tokenizer.decode(rec_res[0]["token_ids"])
    one = text[: text.index(" ", text.index(".") + 3)]  # a word or so into the second sentence
    two = text[: text.index(" ", len(one) + 2)]  # one more word
    assert not offline_current(one)[0] and not offline_current(two)[0]
    cuts = [offline_current(one)[1], offline_current(two)[1]]
    with torch.no_grad(), add_to_resid_post(thinking.model, SAE_LAYER, hyb._hook_capture):  # as in _run_batch
        pooled, drafted = hyb._pool_retokenized(think_prompts[:2], [one, two], cuts)
    assert drafted == [False, False]
    for p, tp, t in zip(pooled, think_prompts, (one, two)):
        assert torch.allclose(p, reference_pooled(thinking, tp, t, False), atol=1e-4, rtol=0)


def test_retokenised_steering_off_equals_plain_greedy(organism, stories):
    """Decisions are made (threshold above every activation, so none applies) or there is nothing to apply: the
    base decodes exactly as plain greedy decoding, across batches."""
    thinking, _ = organism
    sae = random_sae(thinking.d_model)
    vecs, _ = random_vectors(stories.d_model, 5.0)
    ref = plain_greedy(stories, STORIES, 40)
    for v, threshold in ((vecs, 1e9), ({}, 0.0)):
        hyb = make(thinking, stories, sae, v, None, retokenize_text=True, threshold=threshold, max_new_tokens=40,
                   batch_size=3)
        assert hyb.retokenize
        res = hyb.generate(STORIES)
        assert [r["token_ids"] for r in res] == ref
        assert all(r["steered_fraction"] == 0 and r["behavior_counts"] == {} and r["disagreement_rate"] is None
                   for r in res)
        if v:  # decisions were made, from drafts, and none applied
            assert all(r["n_decisions"] >= 2 and r["n_drafts"] == r["n_decisions"] for r in res)
            assert all(r["changed_fraction"] == 0 for r in res)
        else:
            assert all(r["n_decisions"] == 0 for r in res)
    # the same vectors under threshold 0 do steer the base: the check above is not vacuous
    hyb = make(thinking, stories, sae, vecs, None, retokenize_text=True, threshold=0.0, max_new_tokens=40)
    assert [r["token_ids"] for r in hyb.generate(STORIES)] != ref


def test_retokenisation_refusals(organism, stories):
    thinking, _ = organism
    sae = random_sae(thinking.d_model)
    vecs, bias = random_vectors(stories.d_model, 0.5)
    for kw, word in ((dict(granularity="token"), "granularity=sentence only"),
                     (dict(candidate_mode=True), "candidate_mode"), (dict(control="oracle"), "oracle"),
                     (dict(control="unsteered_rerank", candidate_mode=True), "unsteered_rerank")):
        with pytest.raises(HybridError) as err:
            make(thinking, stories, sae, vecs, bias, retokenize_text=True, **kw)
        assert word in str(err.value) and "retokenize_text" in str(err.value) and "\n" not in str(err.value)
    for control in ("bias_only", "random_behavior", "random_vectors"):
        assert make(thinking, stories, sae, vecs, bias, retokenize_text=True, control=control).retokenize


def test_eval_refuses_a_method_before_generating_anything(organism, stories):
    """eval.py checks every hybrid method against the pair first (check_methods), instead of failing at oracle after
    the earlier methods' generations."""
    from sae_reasoning.hybrid import check_methods
    from sae_reasoning.hybrid_stage import method_overrides

    thinking, _ = organism
    ok = ("hybrid", "bias_only", "random_behavior", "random_vectors")
    check_methods(thinking, stories, {"retokenize_text": True}, {m: method_overrides(m) for m in ok})
    for bad in ("oracle", "unsteered_rerank"):
        with pytest.raises(HybridError, match=f"eval.methods has {bad}: .*retokenize_text"):
            check_methods(thinking, stories, {"retokenize_text": True},
                          {m: method_overrides(m) for m in (*ok, bad)})
    with pytest.raises(HybridError, match="hybrid.retokenize_text=true"):  # mismatched and not enabled
        check_methods(thinking, stories, {}, {"hybrid": method_overrides("hybrid")})
