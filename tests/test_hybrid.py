"""The hybrid decoder on the tiny real Llama (stories260K) with a random SAE and random steering vectors.

Every reference here is an independent, uncached recomputation: the base run on the whole prefix with the same
deltas at the same positions through the one steering hook, the thinking model on the whole prefix, and the offline
sentence splitter on the prefix text.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import zlib

import pytest
import torch

from helpers import stories_with_chat_template
from sae_reasoning.hooks import add_to_resid_post, capture_resid_post
from sae_reasoning.hybrid import HybridError, HybridGenerator, HybridSettings, SentenceStream
from sae_reasoning.models import load_model
from sae_reasoning.sae import TopKSAE
from sae_reasoning.sentences import _boundaries, attach_token_spans, split_sentences

SAE_LAYER, STEER_LAYER, N_LATENTS, D = 2, 1, 6, 64
QUESTIONS = ["Tom saw a big dog", "Lily had a red ball and she wanted to play with her friend in the park",
             "The sun was hot"]


@pytest.fixture(scope="module")
def lm(stories_path, tmp_path_factory):
    path = stories_with_chat_template(stories_path, tmp_path_factory.mktemp("hyb") / "stories")
    return load_model(str(path), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def lm2(lm):
    """A second copy of the same weights: thinking and base as distinct objects."""
    return load_model(lm.source, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def sae():
    return TopKSAE.from_init(D, N_LATENTS, k=3, seed=0, norm_mean=torch.full((D,), 0.1))


@pytest.fixture(scope="module")
def vectors():
    g = torch.Generator().manual_seed(1)
    vecs = {i: torch.randn(D, generator=g) / 8 * (1 + i / 2) for i in range(N_LATENTS - 1)}  # the last: no vector
    bias = torch.randn(D, generator=g) / 10
    return vecs, bias


def make(lm, base, sae, vecs, bias, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("max_new_tokens", 24)
    return HybridGenerator(lm, base, sae, SAE_LAYER, vecs, bias, STEER_LAYER, **kw)


def plain_greedy(lm, questions, max_new_tokens, eos_id=None):
    """HF generate, greedy, left-padded batch: the reference for 'steering off'."""
    tok = lm.tokenizer
    tok.padding_side = "left"
    from sae_reasoning.prompts import base_prompt
    enc = tok([base_prompt(q) for q in questions], return_tensors="pt", padding=True)
    eos = tok.eos_token_id if eos_id is None else eos_id
    out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                            eos_token_id=eos)
    seqs = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        seqs.append(row[: row.index(eos)] if eos in row else row)
    return seqs


# ------------------------------------------------------------------------------------------------ references


def base_reference_logits(lm, prompt_ids, emitted, deltas):
    """Uncached: base on prompt + emitted tokens, delta s at position len(prompt) - 1 + s; logits per step."""
    ids = torch.tensor([prompt_ids + emitted])
    P = len(prompt_ids)
    n = len(deltas)
    delta = torch.zeros(1, ids.shape[1], D)
    for step, d in enumerate(deltas):
        delta[0, P - 1 + step] = d
    with torch.no_grad(), add_to_resid_post(lm.model, STEER_LAYER, delta):
        logits = lm.model(input_ids=ids, use_cache=False).logits[0]
    return logits[P - 1: P - 1 + n]


def offsets_of(tok, ids):
    ends = [len(tok.decode(ids[: i + 1])) for i in range(len(ids))]
    return [((ends[i - 1] if i else 0), ends[i]) for i in range(len(ids))]


def reference_current(tok, ids):
    """Offline splitter on the prefix text: (at_start, first, end) of the sentence being written."""
    text = tok.decode(ids)
    cuts = _boundaries(text, 0, len(text))
    if not text.strip() or (cuts and not text[cuts[-1]:].strip()):
        return True, len(ids), len(ids)
    sentences = attach_token_spans(split_sentences(text, min_words=1), offsets_of(tok, ids))
    last = sentences[-1]
    return False, last.token_start, last.token_end


def pooled_reference(lm, think_prompt, emitted, step, at_start, draft_token, draft="token", eos_ids=()):
    prefix = think_prompt + emitted[:step]
    if at_start and draft == "token":
        h = capture_resid_post(lm.model, SAE_LAYER, input_ids=torch.tensor([prefix + [draft_token]]), use_cache=False)
        return h[0, -1]
    if at_start:  # uncached greedy draft of the whole next sentence, mean over its member tokens
        stream, draft_ids = SentenceStream(lm.tokenizer), [draft_token]
        while True:
            seq = torch.tensor([prefix + draft_ids])
            h = capture_resid_post(lm.model, SAE_LAYER, input_ids=seq, use_cache=False)[0, len(prefix):]
            if draft_ids[-1] in eos_ids:
                return h[:-1].mean(0) if len(draft_ids) > 1 else h[0]
            stream.append(draft_ids[-1])
            cut = stream.current()[0]
            if cut > 0:
                members = [j for j in range(len(draft_ids)) if (stream.ends[j - 1] if j else 0) < cut]
                return h[members].mean(0)
            if len(draft_ids) == 64:
                return h.mean(0)
            with torch.no_grad():
                draft_ids.append(int(lm.model(seq).logits[0, -1].argmax()))
    _, first, end = reference_current(lm.tokenizer, emitted[:step])
    h = capture_resid_post(lm.model, SAE_LAYER, input_ids=torch.tensor([prefix]), use_cache=False)[0]
    P = len(think_prompt)
    return h[P + first: P + end].mean(0)


def schedule_for(n_rows, n_steps, seed=0):
    rng = random.Random(seed)
    return [[(rng.choice([None, 0, 1, 2, 3, 4, 5]), rng.choice([0.5, 1.0, 2.0, -1.0])) for _ in range(n_steps)]
            for _ in range(n_rows)]


# ------------------------------------------------------------------------------------------------ tests


def test_streaming_sentences_match_the_offline_splitter(lm):
    tok = lm.tokenizer
    text = ("Tom saw 3.14 dogs. Then he ran! Mr. Smith said hi; the end.\nNew line here? Yes... maybe not. "
            "She said 5! is big. \"Wow.\" Lily ran. etc. and so on. A. Smith came.\n\nOk.")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stream = SentenceStream(tok)
    retractions = 0
    prev_cut = 0
    for i in range(len(ids) + 1):
        if i:
            stream.append(ids[i - 1])
        cut, first, end = stream.current()
        retractions += cut < prev_cut
        prev_cut = cut
        ref_start, ref_first, ref_end = reference_current(tok, ids[:i])
        assert (first == end) == ref_start, (i, tok.decode(ids[:i]))
        if not ref_start:
            assert (first, end) == (ref_first, ref_end), (i, tok.decode(ids[:i]))
    assert stream.text == tok.decode(ids)
    assert retractions > 0  # "3." and "etc." were provisional sentence ends
    # Byte-fallback tokens: a token ending inside a character gets its text when a later one completes it.
    text = "Café — naïve 😀 ok. Then\n\n  x = 3.5; done! Über."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stream = SentenceStream(tok)
    for t in ids:
        stream.append(t)
        stream.current()
        assert tok.decode(stream.ids).startswith(stream.text)
    assert stream.text == text and stream.ends == sorted(stream.ends) and stream.ends[-1] == len(text)


@pytest.mark.parametrize("granularity,stop,draft", [("token", False, "token"), ("sentence", False, "sentence"),
                                                    ("token", True, "sentence"), ("token", False, "sentence")])
def test_golden_cached_equals_uncached(lm, lm2, sae, vectors, granularity, stop, draft):
    """Fixed schedule, batch 3 with unequal prompts (left padding): every step's steered and unsteered base logits
    and every pooled activation equal an uncached recomputation. With `stop` as an extra eos, rows finish at
    different steps and are dropped from the batch mid-way."""
    vecs, bias = vectors
    n_steps = 20
    hyb = make(lm2, lm, sae, vecs, bias, granularity=granularity, max_new_tokens=n_steps, threshold=-1e9,
               draft=draft)
    prompts = [hyb.prompts(q) for q in QUESTIONS]
    assert len({len(b) for b, _ in prompts}) == 3
    sched = schedule_for(3, n_steps)
    res = hyb.generate_ids([b for b, _ in prompts], [t for _, t in prompts], schedule=sched, record=True)
    if stop:  # make row 0's 6th token an eos: rows then finish at different steps
        hyb.eos_ids = {lm.tokenizer.eos_token_id, res[0]["record"]["emitted"][5]}
        res = hyb.generate_ids([b for b, _ in prompts], [t for _, t in prompts], schedule=sched, record=True)
    n_pooled = n_draft = 0
    for (bp, tp), r, plan in zip(prompts, res, sched):
        rec = r["record"]
        emitted = rec["emitted"]
        n = len(emitted)
        deltas = []
        for step in range(n):
            b, c = plan[step]
            d = bias.clone()
            if b is not None and b in vecs:
                d += c * vecs[b]
            deltas.append(d)
            assert rec["behavior"][step] == (-1 if b is None else b)
        ref = base_reference_logits(lm, bp, emitted[:-1] if n else [], deltas)
        got = torch.stack(rec["step_logits"])
        assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got - ref).abs().max()
        ref_u = base_reference_logits(lm, bp, emitted[:-1], [torch.zeros(D)] * n)
        got_u = torch.stack(rec["unsteered_logits"])
        assert torch.allclose(got_u, ref_u, atol=1e-4, rtol=0)
        assert emitted == [int(x) for x in got.argmax(-1)]
        assert r["token_ids"] == [t for t in emitted if t not in hyb.eos_ids]
        assert r["finished"] == (emitted[-1] in hyb.eos_ids)
        for step in range(n):
            pooled = rec["pooled"][step]
            if pooled is None:
                assert granularity == "sentence"
                continue
            at_start = rec["at_start"][step]
            ref_start, _, _ = reference_current(lm.tokenizer, emitted[:step])
            assert at_start == ref_start
            ref_p = pooled_reference(lm, tp, emitted, step, at_start, rec["thinking_greedy"][step], draft,
                                     hyb.eos_ids)
            assert torch.allclose(pooled, ref_p, atol=1e-4, rtol=0), (step, (pooled - ref_p).abs().max())
            n_pooled += 1
            n_draft += at_start
    if stop:
        assert len({len(r["record"]["emitted"]) for r in res}) > 1
    assert n_draft >= 3  # drafts at sentence starts were checked; in token mode also running means
    assert n_pooled > n_draft if granularity == "token" else n_pooled == n_draft


def test_golden_candidate_mode(lm, sae, vectors):
    """Candidate mode: each candidate's logits at each step equal an uncached recomputation with the chosen
    history; the choice is the thinking model's favourite; the cache keeps only the chosen candidate."""
    vecs, bias = vectors
    n_steps = 10
    coefs = [0.0, 2.0, 6.0]
    hyb = make(lm, lm, sae, vecs, bias, candidate_mode=True, coefficients=coefs, unsteered_candidate=True,
               granularity="token", max_new_tokens=n_steps, threshold=-1e9)
    prompts = [hyb.prompts(q) for q in QUESTIONS]
    sched = [[(i % 5, 0.0)] * n_steps for i in range(3)]
    res = hyb.generate_ids([b for b, _ in prompts], [t for _, t in prompts], schedule=sched, record=True)
    hyb.eos_ids = {lm.tokenizer.eos_token_id, res[1]["record"]["emitted"][4]}  # rows finish at different steps
    res = hyb.generate_ids([b for b, _ in prompts], [t for _, t in prompts], schedule=sched, record=True)
    reranked = 0
    for (bp, tp), r, plan in zip(prompts, res, sched):
        rec = r["record"]
        emitted = rec["emitted"]
        history = []
        for step in range(len(emitted)):
            b = plan[step][0]
            cand_deltas = [c * vecs[b] + bias for c in coefs] + [torch.zeros(D)]
            with torch.no_grad():
                think_logp = torch.log_softmax(lm.model(input_ids=torch.tensor([tp + emitted[:step]])).logits[0, -1],
                                               -1)
            best, chosen = None, None
            for k, d in enumerate(cand_deltas):
                ref = base_reference_logits(lm, bp, emitted[:step], history + [d])[-1]
                assert torch.allclose(rec["candidate_logits"][step][k], ref, atol=1e-4, rtol=0), (step, k)
                tok = int(ref.argmax())
                assert rec["candidates"][step][k] == tok
                if best is None or think_logp[tok] > best:
                    best, chosen = think_logp[tok], k
            assert emitted[step] == rec["candidates"][step][chosen]
            reranked += chosen != 0
            history.append(cand_deltas[chosen])
    assert reranked > 0
    assert any(r["finished"] for r in res) and len({r["n_steps"] for r in res}) > 1


def test_steering_off_equals_plain_greedy(lm, sae):
    """No vectors, no bias: identical to HF greedy generation, across batches; per-row eos stopping and dropping
    finished rows from the batch (eos set to '.' so rows stop at different steps)."""
    hyb = make(lm, lm, sae, {}, None, max_new_tokens=30, batch_size=2)
    questions = QUESTIONS + ["A bird sang"]
    res = hyb.generate(questions)
    assert [r["token_ids"] for r in res] == plain_greedy(lm, questions, 30)
    assert all(r["steered_fraction"] == 0 and r["changed_fraction"] == 0 for r in res)
    assert [r["question"] for r in res] == questions
    dot = lm.tokenizer.convert_tokens_to_ids(".")
    hyb.eos_ids = {dot}
    res = hyb.generate(questions)
    ref = plain_greedy(lm, questions, 30, eos_id=dot)
    assert [r["token_ids"] for r in res] == ref
    assert len({len(x) for x in ref}) > 1 and any(r["finished"] for r in res)
    assert all(r["finished"] == (r["n_steps"] == r["n_tokens"] + 1) for r in res)


def test_threshold_above_every_activation_is_steering_off(lm, lm2, sae, vectors):
    vecs, _ = vectors
    hyb = make(lm2, lm, sae, vecs, None, threshold=1e9, max_new_tokens=30, granularity="token")
    res = hyb.generate(QUESTIONS)
    assert [r["token_ids"] for r in res] == plain_greedy(lm, QUESTIONS, 30)
    assert all(r["steered_fraction"] == 0 and r["behavior_counts"] == {} for r in res)
    assert all(r["n_decisions"] == r["n_steps"] for r in res)


def test_steering_changes_tokens_and_counts_them(lm, sae, vectors):
    vecs, bias = vectors
    big = {k: v * 20 for k, v in vecs.items()}
    res = make(lm, lm, sae, big, bias, threshold=-1e9, max_new_tokens=30).generate(QUESTIONS)
    plain = plain_greedy(lm, QUESTIONS, 30)
    assert any(r["token_ids"] != p for r, p in zip(res, plain))
    for r in res:
        assert 0 < r["steered_fraction"] <= 1 and r["changed_fraction"] > 0
        assert sum(r["behavior_counts"].values()) == round(r["steered_fraction"] * r["n_steps"])
        assert str(N_LATENTS - 1) not in r["behavior_counts"]  # no vector, never steered
        assert r["bias_fraction"] == 1.0


def test_bias_only_equals_zeroed_vectors(lm, sae, vectors):
    vecs, bias = vectors
    big_bias = bias * 30
    a = make(lm, lm, sae, vecs, big_bias, control="bias_only", threshold=-1e9, max_new_tokens=30).generate(QUESTIONS)
    zero = {k: torch.zeros(D) for k in vecs}
    b = make(lm, lm, sae, zero, big_bias, threshold=-1e9, max_new_tokens=30).generate(QUESTIONS)
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]
    assert all(r["steered_fraction"] == 0 and r["bias_fraction"] == 1 for r in a)
    assert [r["token_ids"] for r in a] != plain_greedy(lm, QUESTIONS, 30)  # the bias itself does act


def test_behavior_scales_are_per_behavior_coefficients(lm, sae, vectors):
    """hybrid.behavior_scales: every behavior scaled by 2 at coefficient 0.5 generates what coefficient 1 does
    (powers of two: exact); scaling one behavior changes the generations; eval.py's keys name a latent by index,
    title or title part (`hybrid_stage.resolve_behavior_scales`), and a wrong key is one clear error."""
    from sae_reasoning.errors import UserError
    from sae_reasoning.hybrid_stage import behavior_latent, resolve_behavior_scales

    vecs, _ = vectors
    big = {k: v * 20 for k, v in vecs.items()}
    titles = {k: f"title {k} / word{k} / shared" for k in range(N_LATENTS)}
    every = {**{str(k): 2.0 for k in big if k % 2}, **{f"word{k}": 2.0 for k in big if not k % 2}}
    doubled = resolve_behavior_scales(every, titles, big)
    assert doubled == {str(k): 2.0 for k in big}
    used = {}

    def tokens(coefficient, scales=None):
        gen = make(lm, lm, sae, big, None, threshold=-1e9, max_new_tokens=30, coefficient=coefficient,
                   behavior_scales=scales or {})
        res = gen.generate(QUESTIONS)
        for r in res:
            for k, n in r["behavior_counts"].items():
                used[int(k)] = used.get(int(k), 0) + n
        return [r["token_ids"] for r in res]

    reference = tokens(1.0)
    assert tokens(0.5, doubled) == reference != plain_greedy(lm, QUESTIONS, 30)
    assert tokens(0.5) != reference  # the test can fail: the coefficient matters at these norms
    most = max(used, key=used.get)  # halving only the behavior steered most changes the generations too
    assert tokens(1.0, resolve_behavior_scales({f"TITLE {most}": 0.5}, titles, big)) != reference
    assert behavior_latent(" Word3 ", titles) == 3 and behavior_latent(2, titles) == 2
    for scales, needle in (({"shared": 2}, "names latents [0, 1, 2"), ({"nope": 2}, "names no latent"),
                           ({"1": 2, "word1": 3}, "both name latent 1"),
                           ({str(N_LATENTS - 1): 2}, "has no steering vector")):
        with pytest.raises(UserError, match=re.escape(needle)):
            resolve_behavior_scales(scales, titles, big)
    for scales, needle in (({"word1": 2}, "takes latent indices"), ({str(N_LATENTS - 1): 2}, "no steering vector"),
                           ({"1": -1.0}, "must be a number >= 0")):
        with pytest.raises(HybridError, match=needle):
            make(lm, lm, sae, big, None, behavior_scales=scales)


def test_random_vectors_keep_norms_and_are_drawn_per_problem(lm, sae, vectors):
    vecs, bias = vectors
    hyb = make(lm, lm, sae, vecs, bias, control="random_vectors", seed=3)
    real = make(lm, lm, sae, vecs, bias)
    assert torch.equal(hyb.vectors, real.vectors) and torch.equal(hyb.bias, real.bias)  # the bias stays the real one
    r7, r8 = hyb.random_vectors(7), hyb.random_vectors(8)
    for k, v in vecs.items():
        assert torch.allclose(r7[k].norm(), v.norm(), rtol=1e-5)
        assert torch.cosine_similarity(r7[k], v, dim=0) < 0.9
        assert torch.cosine_similarity(r7[k], r8[k], dim=0) < 0.9  # another problem, another draw
    assert torch.equal(r7[N_LATENTS - 1], torch.zeros(D))
    assert torch.equal(make(lm, lm, sae, vecs, bias, control="random_vectors", seed=3).random_vectors(7), r7)
    assert not torch.equal(make(lm, lm, sae, vecs, bias, control="random_vectors", seed=4).random_vectors(7), r7)
    # the generations use each problem's own draw, whatever the batch: batched == one problem at a time
    big = {k: v * 20 for k, v in vecs.items()}
    kw = dict(control="random_vectors", seed=3, threshold=-1e9, granularity="token", max_new_tokens=20)
    gen = make(lm, lm, sae, big, bias, **kw)
    qs = [{"id": f"q{i}", "question": q} for i, q in enumerate(QUESTIONS)]
    whole = {r["id"]: r["token_ids"] for r in gen.generate(qs)}
    assert whole == {r["id"]: r["token_ids"] for q in reversed(qs) for r in gen.generate([q])}
    # and that draw is what steers: one problem alone, with its drawn vectors given as the real ones
    key = zlib.crc32(b"q0")
    drawn = {k: gen.random_vectors(key)[k] for k in big}
    alone = make(lm, lm, sae, drawn, bias, **{**kw, "control": "none"}).generate([qs[0]])[0]["token_ids"]
    assert alone == whole["q0"] != make(lm, lm, sae, big, bias, **{**kw, "control": "none"}).generate(
        [qs[0]])[0]["token_ids"]


def test_random_behavior_is_seeded_and_batch_independent(lm, sae, vectors):
    vecs, bias = vectors
    kw = dict(control="random_behavior", seed=5, threshold=-1e9, granularity="token", max_new_tokens=20)
    a = make(lm, lm, sae, vecs, bias, batch_size=3, **kw).generate_ids(*zip(*[make(lm, lm, sae, vecs, bias).prompts(q)
                                                                              for q in QUESTIONS]), record=True)
    b = make(lm, lm, sae, vecs, bias, batch_size=1, **kw).generate_ids(*zip(*[make(lm, lm, sae, vecs, bias).prompts(q)
                                                                              for q in QUESTIONS]), record=True)
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]
    used = {x for r in a for x in r["record"]["behavior"]}
    assert used - {-1} <= set(vecs) and len(used - {-1}) >= 3  # only latents that have a vector, several of them
    real = make(lm, lm, sae, vecs, bias, **{**kw, "control": "none"})
    for r in a:  # the real decision at each step (its pooled activation is recorded): active exactly there
        rec = r["record"]
        decided, _ = real._decide([None] * len(rec["pooled"]), torch.stack(rec["pooled"]))
        assert [b >= 0 for b in rec["behavior"]] == [int(b) >= 0 for b in decided]
        assert sum(b >= 0 for b in rec["behavior"]) == round(r["steered_fraction"] * r["n_steps"])


def test_random_behavior_follows_the_problem_id_not_its_place_in_a_call(lm, sae, vectors):
    """eval.py calls generate() once per batch: a problem's random stream must not depend on which batch it is in."""
    vecs, bias = vectors
    kw = dict(control="random_behavior", seed=5, threshold=-1e9, granularity="token", max_new_tokens=20)
    gen = make(lm, lm, sae, vecs, bias, **kw)
    qs = [{"id": f"q{i}", "question": q} for i, q in enumerate(QUESTIONS)]
    whole = {r["id"]: r["token_ids"] for r in gen.generate(qs)}
    one_by_one = {r["id"]: r["token_ids"] for q in reversed(qs) for r in gen.generate([q])}
    assert whole == one_by_one
    # and the stream is the problem's own: the same question under two ids gets two streams
    twins = gen.generate([{"id": "a", "question": QUESTIONS[0]}, {"id": "b", "question": QUESTIONS[0]}])
    assert twins[0]["token_ids"] != twins[1]["token_ids"]


def test_oracle_substitutes_exactly_where_greedy_disagree(lm, lm2, sae, vectors):
    vecs, bias = vectors
    # Thinking = base with another prompt: they disagree often. Threshold 0 makes only some points active.
    hyb = make(lm2, lm, sae, vecs, bias, control="oracle", threshold=0.0, granularity="token", max_new_tokens=30)
    prompts = [hyb.prompts(q) for q in QUESTIONS]
    res = hyb.generate_ids([b for b, _ in prompts], [t for _, t in prompts], record=True)
    n_sub = 0
    for (bp, _), r in zip(prompts, res):
        rec = r["record"]
        assert r["steered_fraction"] == 0 and r["bias_fraction"] == 0
        for step, (e, g, u, beh) in enumerate(zip(rec["emitted"], rec["thinking_greedy"], rec["base_greedy"],
                                                  rec["behavior"])):
            assert e == (g if (beh >= 0 and g != u) else u)
            n_sub += beh >= 0 and g != u
        # the base is never steered: its logits are the unsteered ones
        ref = base_reference_logits(lm, bp, rec["emitted"][:-1], [torch.zeros(D)] * len(rec["emitted"]))
        assert torch.allclose(torch.stack(rec["step_logits"]), ref, atol=1e-4, rtol=0)
        assert r["substituted_fraction"] == r["changed_fraction"]
    assert n_sub > 0 and any(b < 0 for r in res for b in r["record"]["behavior"])


def test_oracle_everywhere_is_thinking_greedy(lm, sae, vectors):
    """Every step a decision point: the oracle is the thinking model decoding its own chat prompt greedily."""
    vecs, bias = vectors
    vecs = {**vecs, N_LATENTS - 1: torch.ones(D)}  # every latent has a vector: every step substitutes
    hyb = make(lm, lm, sae, vecs, bias, control="oracle", threshold=float("-inf"), granularity="token",
               max_new_tokens=25)
    res = hyb.generate(QUESTIONS)
    tok = lm.tokenizer
    tok.padding_side = "left"
    from sae_reasoning.models import thinking_prompt
    enc = tok([thinking_prompt(tok, q) for q in QUESTIONS], return_tensors="pt", padding=True,
              add_special_tokens=False)
    out = lm.model.generate(**enc, max_new_tokens=25, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = [row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
           for row in out[:, enc["input_ids"].shape[1]:].tolist()]
    assert [r["token_ids"] for r in res] == ref


def test_unsteered_rerank_never_steers(lm, lm2, sae, vectors):
    vecs, bias = vectors
    hyb = make(lm2, lm, sae, vecs, bias, control="unsteered_rerank", threshold=-1e9, rerank_top_c=3,
               max_new_tokens=25)
    prompts = [hyb.prompts(q) for q in QUESTIONS]
    res = hyb.generate_ids([b for b, _ in prompts], [t for _, t in prompts], record=True)
    for (bp, tp), r in zip(prompts, res):
        rec = r["record"]
        assert r["steered_fraction"] == 0 and r["bias_fraction"] == 0
        ref = base_reference_logits(lm, bp, rec["emitted"][:-1], [torch.zeros(D)] * len(rec["emitted"]))
        assert torch.allclose(torch.stack(rec["step_logits"]), ref, atol=1e-4, rtol=0)
        for step, e in enumerate(rec["emitted"]):
            top = ref[step].topk(3).indices.tolist()
            assert rec["candidates"][step] == top
            if rec["behavior"][step] < 0:  # not a decision point (the latent has no vector): base greedy
                assert e == top[0]
                continue
            with torch.no_grad():
                logp = torch.log_softmax(lm.model(input_ids=torch.tensor([tp + rec["emitted"][:step]])).logits[0, -1],
                                         -1)
            assert e == max(top, key=lambda t: (float(logp[t]), -top.index(t)))
    assert sum(r["reranked_fraction"] for r in res) > 0


def test_sentence_granularity_holds_one_behavior_per_sentence(lm, sae, vectors):
    vecs, bias = vectors
    hyb = make(lm, lm, sae, vecs, bias, granularity="sentence", threshold=-1e9, max_new_tokens=40)
    prompts = [hyb.prompts(q) for q in QUESTIONS]
    res = hyb.generate_ids([b for b, _ in prompts], [t for _, t in prompts], record=True)
    for r in res:
        rec = r["record"]
        stream = SentenceStream(lm.tokenizer)
        by_cut = {}
        for step, e in enumerate(rec["emitted"]):
            cut, _, _ = stream.current()
            by_cut.setdefault(cut, set()).add(rec["behavior"][step])
            if e != lm.tokenizer.eos_token_id:
                stream.append(e)
        assert all(len(v) == 1 for v in by_cut.values())
        assert r["n_decisions"] == len(by_cut) and r["n_drafts"] >= 1


@pytest.mark.parametrize("control,draft", [("none", "sentence"), ("random_behavior", "sentence"),
                                           ("bias_only", "sentence"), ("random_vectors", "sentence"),
                                           ("none", "token")])
def test_lazy_thinking_and_speculative_steps_equal_one_token_steps(lm, lm2, sae, vectors, control, draft):
    """Sentence mode's lazy thinking (the emitted tokens are read in one forward when a decision needs them) and
    speculative steps (the base verifies the thinking model's draft sentence in one forward; ragged rows leave
    masked holes in both caches) give exactly the one-token path's tokens, decisions and stats, the disagreement
    rate included, also when rows finish at different steps (an extra eos) or are truncated; each makes fewer
    forwards of the model it spares."""
    vecs, bias = vectors
    prompts = None
    results, calls = {}, {}
    modes = {"per_token": dict(lazy_thinking=False, draft_reuse=False), "lazy": dict(speculative="off"),
             "speculative": dict(speculative="always"),  # always: ragged rows, masked holes in both caches
             "shared": dict(shared_drafts=True)}  # drafts one token a step in one shared forward
    for name, kw in modes.items():
        hyb = make(lm2, lm, sae, vecs, bias, granularity="sentence", threshold=-1e9, max_new_tokens=40,
                   control=control, draft=draft, **kw)
        prompts = prompts or [hyb.prompts(q) for q in QUESTIONS]
        first = hyb.generate_ids([b for b, _ in prompts], [t for _, t in prompts])
        hyb.eos_ids = {lm.tokenizer.eos_token_id, first[1]["token_ids"][7]}  # row 1 (at least) stops early
        n = {"thinking": 0, "base": 0}
        hooks = [m.model.register_forward_pre_hook(lambda *_, k=k: n.__setitem__(k, n[k] + 1))
                 for k, m in (("thinking", lm2), ("base", lm))]
        try:
            results[name] = first + hyb.generate_ids([b for b, _ in prompts], [t for _, t in prompts])
        finally:
            for h in hooks:
                h.remove()
        calls[name] = n
    ref = results["per_token"]
    assert [r["finished"] for r in ref[3:]] != [r["finished"] for r in ref[:3]]  # some rows stopped early
    assert any(r["truncated"] for r in ref)
    assert any(r["disagreement_rate"] > 0 for r in ref) and any(r["n_decisions"] > 1 for r in ref)
    for name in ("lazy", "speculative", "shared"):
        for a, b in zip(ref, results[name]):
            assert a == b, name
    # (batch 3: some row decides at most steps, so lazy saves less than at batch 1; the base's savings: below)
    assert calls["lazy"]["thinking"] < calls["per_token"]["thinking"], calls


def generate_counting(hyb, base_ids, think_ids, models, widths_of):
    """`hyb.generate_ids` with the forwards of `models` counted and the input width of each forward of `widths_of`
    recorded: (results, model calls, widths)."""
    n, widths = [0], []
    hooks = [m.model.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1)) for m in models]
    hooks.append(widths_of.model.register_forward_pre_hook(
        lambda _m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True))
    try:
        return hyb.generate_ids(base_ids, think_ids), n[0], widths
    finally:
        for h in hooks:
            h.remove()


def test_shared_drafts_equal_lazy_thinking_with_fewer_calls(lm, lm2, sae, vectors):
    """Shared drafts (8 rows): each row drafts one token a step in one shared thinking forward while the others
    write, instead of every row waiting while the rows at a sentence start draft their whole sentence. The same
    tokens, decisions and stats as lazy thinking (and one-token steps: above), in fewer sequential model calls; in
    token mode (a decision at every step), the same as token mode's one-token steps, random_behavior and
    random_vectors included."""
    vecs, bias = vectors
    questions = ["Tom saw a big dog", "The sun was hot", "Lily had a red ball", "Once upon a time there was a cat",
                 "Ben and Mia went to the park", "The little bird sang", "A girl found a shiny box",
                 "Max liked to run fast"]
    out, calls = {}, {}
    for name, kw in (("lazy", dict(speculative="off", shared_drafts=False)), ("shared", dict(shared_drafts=True)),
                     ("shared_always", dict(shared_drafts=True, speculative="always")),  # drafts verified
                     ("default", dict(speculative="off")),  # shared_drafts=None: on CUDA only (a CPU here)
                     ("lazy_short", dict(speculative="off", draft_max_tokens=3)),  # drafts cut by their budget
                     ("shared_short", dict(shared_drafts=True, draft_max_tokens=3)),
                     ("lazy_untracked", dict(speculative="off", track_unsteered=False)),  # one base row a problem
                     ("shared_untracked", dict(shared_drafts=True, track_unsteered=False)),
                     ("lazy_token", dict(granularity="token", shared_drafts=False)),  # one-token steps
                     ("shared_token", dict(granularity="token", shared_drafts=True)),
                     ("lazy_token_random", dict(granularity="token", shared_drafts=False, control="random_behavior")),
                     ("shared_token_random", dict(granularity="token", shared_drafts=True, control="random_behavior")),
                     ("lazy_token_rv", dict(granularity="token", shared_drafts=False, control="random_vectors")),
                     ("shared_token_rv", dict(granularity="token", shared_drafts=True, control="random_vectors"))):
        hyb = make(lm2, lm, sae, vecs, bias, threshold=-1e9, max_new_tokens=48, batch_size=8, **kw)
        pairs = [hyb.prompts(q) for q in questions]
        out[name], calls[name], widths = generate_counting(hyb, [b for b, _ in pairs], [t for _, t in pairs],
                                                           (lm, lm2), widths_of=lm2)
        if name.startswith("shared") and name != "shared_always":  # after the prompt, one position a step: the
            assert set(widths[1:]) == {1}, sorted(set(widths))  # cache grows a column a step
    for name in ("", "_short", "_untracked", "_token", "_token_random", "_token_rv"):
        assert out["shared" + name] == out["lazy" + name], name
    assert out["shared_always"] == out["lazy"]
    assert out["lazy_short"] != out["lazy"]  # the budget changed some decisions
    assert sum(r["n_drafts"] for r in out["lazy"]) > 2 * len(questions)  # several sentences a row
    assert calls["shared"] < 0.8 * calls["lazy"], calls
    assert calls["shared_token"] < 0.8 * calls["lazy_token"], calls
    assert out["shared_token"] != out["shared"]  # token mode decides at every step: other tokens
    assert out["shared_token_random"] != out["shared_token"]  # the random behaviors steer otherwise
    assert out["shared_token_rv"] != out["shared_token"]  # and so do random vectors
    assert out["default"] == out["lazy"] and calls["default"] == calls["lazy"], calls  # the CPU default: unshared


def test_shared_drafts_verified_by_the_base_save_steps(lm, lm2, sae, vectors):
    """Shared drafts with speculative="always": a row whose draft has just ended verifies it in the step's one base
    forward and emits every draft token the base would write, instead of one token a step. Both models read the
    same prompt here and the steering is weak, so the base mostly writes the drafts: the same tokens, decisions
    and stats as one-token steps, in fewer steps, so fewer model calls (the GPU's cost), than shared drafts without
    verification."""
    vecs, bias = vectors
    weak = {k: v / 50 for k, v in vecs.items()}
    questions = ["Tom saw a big dog", "The sun was hot", "Lily had a red ball", "Once upon a time there was a cat"]
    out, calls, widest = {}, {}, {}
    for name, kw in (("one_token", dict(lazy_thinking=False, draft_reuse=False, shared_drafts=False)),
                     ("shared", dict(shared_drafts=True, speculative="off")),
                     ("shared_verified", dict(shared_drafts=True, speculative="always"))):
        hyb = make(lm2, lm, sae, weak, bias / 50, threshold=-1e9, max_new_tokens=40, batch_size=4, **kw)
        ids = [hyb.prompts(q)[0] for q in questions]  # the base prompt for both models
        out[name], calls[name], widths = generate_counting(hyb, ids, ids, (lm, lm2), widths_of=lm)
        widest[name] = max(widths[1:])
    assert out["shared_verified"] == out["one_token"] and out["shared"] == out["one_token"]
    # the steering changed some tokens (a verify step must end at the base's own token there) and rows decided again
    ref = out["one_token"]
    assert any(r["changed_fraction"] > 0 for r in ref) and min(r["n_decisions"] for r in ref) > 1
    assert widest["shared"] == 1 and widest["shared_verified"] > 3  # base forwards: several drafts verified
    assert calls["shared_verified"] < 0.7 * calls["shared"], calls  # (96 against 194 when written)


def test_shared_drafts_default_follows_the_base_device():
    """hybrid.shared_drafts=None (the default) means on where the base runs on CUDA (a call costs its launches
    there), off elsewhere; True / False win on any device. Devices are only named here: no GPU is needed."""
    from sae_reasoning.hybrid import shared_drafts_enabled

    assert [shared_drafts_enabled(None, d) for d in ("cpu", torch.device("cpu"), "cuda", torch.device("cuda", 0),
                                                     "cuda:1", "mps")] == [False, False, True, True, True, False]
    assert shared_drafts_enabled(True, "cpu") and not shared_drafts_enabled(False, torch.device("cuda"))
    assert HybridSettings().shared_drafts is None


def test_speculative_steps_at_batch_one_equal_one_token_steps(lm, lm2, sae, vectors):
    """Batch 1 (no holes: every verified position is the row's own) over longer generations: the same results
    with fewer base forwards (a verified draft token costs no forward of its own). Both models read the thinking
    prompt here, so that the base, lightly steered, often writes what the thinking model drafted."""
    vecs, bias = vectors
    weak = {k: v / 10 for k, v in vecs.items()}
    out, calls = {}, {}
    for name, kw in (("per_token", dict(lazy_thinking=False, draft_reuse=False)),
                     ("speculative", dict(speculative="single_row"))):
        hyb = make(lm2, lm, sae, weak, bias / 10, threshold=-1e9, max_new_tokens=60, batch_size=1, **kw)
        ids = [hyb.prompts(q)[1] for q in QUESTIONS]
        n = [0]
        hook = lm.model.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
        try:
            out[name] = hyb.generate_ids(ids, ids)
        finally:
            hook.remove()
        calls[name] = n[0]
    assert out["per_token"] == out["speculative"]
    assert calls["per_token"] == sum(r["n_steps"] for r in out["per_token"]) + len(QUESTIONS)  # prefill + 1 a token
    assert calls["speculative"] < 0.8 * calls["per_token"], calls
    assert any(r["changed_fraction"] > 0 for r in out["per_token"])  # the steering still acts


@pytest.mark.parametrize("control,batch_size,draft_max_tokens", [
    ("none", 1, 64), ("bias_only", 1, 64), ("random_vectors", 1, 64),
    ("none", 3, 64),  # the last row of a batch decodes alone (its H row is not the first)
    ("none", 1, 3)])  # drafts cut by their budget
def test_token_mode_speculative_steps_equal_one_token_steps(lm, lm2, sae, vectors, control, batch_size,
                                                            draft_max_tokens):
    """Token mode decides at every token from the running mean of the current sentence. A lone row's speculative
    step feeds the base its draft sentence in one forward with, at each position, the delta of the decision that
    one-token steps would make there (the running mean over the draft's outputs). The same tokens, decisions and
    stats as one-token steps, with rows that stop at an extra eos or run out of budget, and fewer base forwards;
    the decisions do change inside sentences, so one delta per verify forward would not do."""
    vecs, bias = vectors
    weak = {k: v / 10 for k, v in vecs.items()}
    out, calls, stop = {}, {}, None
    for name, kw in (("per_token", dict(lazy_thinking=False, draft_reuse=False, record=True)),
                     ("speculative", dict(speculative="single_row")), ("off", dict(speculative="off"))):
        record = kw.pop("record", False)
        hyb = make(lm2, lm, sae, weak, bias / 10, threshold=-1e9, max_new_tokens=60, batch_size=batch_size,
                   granularity="token", control=control, draft_max_tokens=draft_max_tokens, **kw)
        ids = [hyb.prompts(q)[1] for q in QUESTIONS]
        if stop is None:  # tokens row 2 never writes: rows 0 and 1 stop early, row 2 runs on alone to its budget
            rows = [r["token_ids"] for r in hyb.generate_ids(ids, ids)]
            stop = {next(t for t in rows[1][30:] if t not in rows[2]),
                    next(t for t in rows[0][10:] if t not in rows[2])}
        hyb.eos_ids = {lm.tokenizer.eos_token_id, *stop}
        n = {"base": 0, "thinking": 0}
        hooks = [m.model.register_forward_pre_hook(lambda *_, k=k: n.__setitem__(k, n[k] + 1))
                 for k, m in (("base", lm), ("thinking", lm2))]
        try:
            out[name] = hyb.generate_ids(ids, ids, record=record)
        finally:
            for h in hooks:
                h.remove()
        calls[name] = n
    records = [r.pop("record") for r in out["per_token"]]
    assert out["speculative"] == out["per_token"] == out["off"]
    assert [r["finished"] for r in out["per_token"]] == [True, True, False]
    assert calls["speculative"]["base"] < (0.8 if batch_size == 1 and draft_max_tokens > 3 else 0.95) * calls[
        "off"]["base"], calls
    if control != "bias_only":  # base self-drafts in mid-sentence: the thinking model reads them in one forward
        assert calls["speculative"]["thinking"] < calls["off"]["thinking"], calls
    changes = 0  # decisions that change between two tokens of one sentence (not at its start)
    for rec in records:
        changes += sum(b0 != b1 for b0, b1, start in zip(rec["behavior"], rec["behavior"][1:], rec["at_start"][1:])
                       if start is False)
    assert changes > 0
    if control != "bias_only":
        assert any(r["changed_fraction"] > 0 for r in out["per_token"])  # the steering still acts


def test_draft_reuse_at_batch_one_equals_one_token_steps(lm, lm2, sae, vectors):
    """A lone row drafts in the thinking cache itself; the next catch-up keeps the entries of the draft tokens the
    base then emitted (their outputs and greedy tokens are the draft's) and reads only the rest. Same tokens,
    decisions and stats as one-token steps, with and without speculative steps, and fewer thinking positions read
    than without the reuse (and no more forwards)."""
    vecs, bias = vectors
    mid = {k: v / 3 for k, v in vecs.items()}  # the steered base sometimes writes the draft, sometimes not
    out, n = {}, {}
    modes = {"per_token": dict(lazy_thinking=False, draft_reuse=False),
             "no_reuse": dict(draft_reuse=False, speculative="off"),
             "reuse": dict(speculative="off"), "reuse_speculative": dict(speculative="single_row"),
             "no_reuse_speculative": dict(speculative="single_row", draft_reuse=False)}
    for name, kw in modes.items():
        hyb = make(lm2, lm, sae, mid, bias / 3, threshold=-1e9, max_new_tokens=60, batch_size=1, **kw)
        pairs = [hyb.prompts(q) for q in QUESTIONS]
        n[name] = {"calls": 0, "positions": 0}

        def count(_m, args, kwargs, c=n[name]):
            c["calls"] += 1
            c["positions"] += int(kwargs["input_ids"].numel())
        hook = lm2.model.register_forward_pre_hook(count, with_kwargs=True)
        try:
            out[name] = hyb.generate_ids([b for b, _ in pairs], [t for _, t in pairs])
        finally:
            hook.remove()
    for name in modes:
        assert out[name] == out["per_token"], name
    for on, off in (("reuse", "no_reuse"), ("reuse_speculative", "no_reuse_speculative")):
        assert n[on]["positions"] < n[off]["positions"] and n[on]["calls"] <= n[off]["calls"], n
    # the steered base departs from the draft on some tokens (partial reuse) and writes whole drafts elsewhere
    # (a catch-up with nothing left to read: fewer forwards)
    assert all(0 < r["changed_fraction"] < 0.5 and r["disagreement_rate"] > 0 for r in out["per_token"])
    assert n["reuse"]["calls"] < n["no_reuse"]["calls"], n


@pytest.mark.parametrize("granularity,control", [("token", "none"), ("token", "oracle"), ("token", "random_vectors"),
                                                 ("sentence", "oracle")])
def test_draft_reuse_in_the_one_token_path(lm, lm2, sae, vectors, granularity, control):
    """Token mode (and the controls that read the thinking model at every token): a lone row's draft stays in the
    thinking cache, and each emitted token the draft already read is not read again (its output and greedy token
    are the draft's) until the base leaves the draft. Same tokens, decisions and stats, fewer thinking forwards."""
    vecs, bias = vectors
    mid = {k: v / 3 for k, v in vecs.items()}
    out, calls = {}, {}
    for name, kw in (("off", dict(draft_reuse=False)), ("on", {})):
        hyb = make(lm2, lm, sae, mid, bias / 3, threshold=-1e9, max_new_tokens=60, batch_size=1,
                   granularity=granularity, control=control, **kw)
        pairs = [hyb.prompts(q) for q in QUESTIONS]
        n = [0]
        hook = lm2.model.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
        try:
            out[name] = hyb.generate_ids([b for b, _ in pairs], [t for _, t in pairs])
        finally:
            hook.remove()
        calls[name] = n[0]
    assert out["on"] == out["off"]
    assert calls["on"] < calls["off"], calls
    assert any(r["disagreement_rate"] > 0 for r in out["off"])


def test_mismatched_tokenizers_refused(lm, lm2, tmp_path, sae):
    other = tmp_path / "other"
    shutil.copytree(lm.source, other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    lm_other = load_model(str(other), dtype="float32", device="cpu")
    with pytest.raises(HybridError) as err:
        make(lm, lm_other, sae, {}, None)
    msg = str(err.value)
    assert "\n" not in msg and "tokenizer" in msg and "vocabulary" in msg and "retokenize_text=true" in msg
    hyb = make(lm, lm_other, sae, {}, None, retokenize_text=True)  # the text-level path (test_hybrid_retokenize.py)
    assert hyb.retokenize and hyb.conflicts == {}
    assert not make(lm, lm2, sae, {}, None, retokenize_text=True).retokenize  # one vocabulary: token path


def test_config_and_validation(lm, sae, vectors):
    from sae_reasoning.config import HybridConfig

    vecs, bias = vectors
    hyb = make(lm, lm, sae, vecs, bias, cfg=HybridConfig(granularity="token", max_new_tokens=7))
    assert hyb.settings.granularity == "token" and hyb.settings.max_new_tokens == 24  # the override wins
    with pytest.raises(HybridError, match="control"):
        make(lm, lm, sae, vecs, bias, control="nope")
    with pytest.raises(HybridError, match="speculative"):
        make(lm, lm, sae, vecs, bias, speculative=True)  # one of off / single_row / always
    with pytest.raises(HybridError, match="latent 9"):
        make(lm, lm, sae, {9: torch.zeros(D)}, None)
    with pytest.raises(HybridError, match="d_model"):
        make(lm, lm, sae, {0: torch.zeros(D + 1)}, None)
    with pytest.raises(HybridError, match="steering_layer"):
        HybridGenerator(lm, lm, sae, SAE_LAYER, {}, None, 7)
