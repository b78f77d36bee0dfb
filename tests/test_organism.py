"""Tests of the model organism (issue 3): task, tokenizer, labels, committed weights, training.

Fast: the whole file runs in well under a minute on one thread.
"""

from __future__ import annotations

import json
import os
import random
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)

from sae_reasoning.organism import BASE_DIR, METRICS_FILE, THINKING_DIR
from sae_reasoning.organism.corpus import (
    BEHAVIOR_KEYWORDS,
    BEHAVIORS,
    DEFAULT_BASE_MIX,
    EOS,
    chat_prompt,
    fragment_sentences,
    label_sentence,
    labelled_trace,
    plan_sentence,
    sample_base_document,
    thinking_document,
    trace_sentences,
)
from sae_reasoning.organism.task import EVAL_OPS, TRAIN_OPS, make_problem, make_splits, parse_answer
from sae_reasoning.prompts import base_prompt

SPLITS = make_splits(seed=0, n_train=5000)


# ---------------------------------------------------------------- task


def test_answers_match_independent_evaluation():
    for split, problems in SPLITS.items():
        for p in problems:
            expr = " ".join([str(p.operands[0])] + [f"{o} {b}" for o, b in zip(p.ops, p.operands[1:])])
            assert eval(expr) == p.answer, (split, p)  # noqa: S307 - digits and +/- only
            assert p.question == f"What is {expr}?"
            assert all(1 <= b <= 99 for b in p.operands)
            assert all(0 <= v <= 99 for v in p.running_values())


def test_splits_sizes_ops_disjoint_and_deterministic():
    train, val, test = SPLITS["train"], SPLITS["val"], SPLITS["test"]
    assert len(test) >= 500 and len(val) > 0 and len(train) == 5000
    assert {p.n_ops for p in test} == set(EVAL_OPS) and {p.n_ops for p in val} == set(EVAL_OPS)
    assert {p.n_ops for p in train} == set(TRAIN_OPS)
    tr, va, te = ({p.expression for p in s} for s in (train, val, test))
    assert len(tr) == len(train) and len(va) == len(val) and len(te) == len(test)
    assert not (tr & te) and not (tr & va) and not (va & te)
    assert len({p.id for p in train + val + test}) == len(train) + len(val) + len(test)
    again = make_splits(seed=0, n_train=10)
    assert again["test"] == test and again["val"] == val  # eval splits do not depend on n_train
    assert make_splits(seed=1, n_train=10)["test"] != test


def test_parse_answer():
    assert parse_answer("So the answer is 12.\n</think>\nThe answer is 92.") == 92
    assert parse_answer("no number here") is None


# ---------------------------------------------------------------- traces and labels


def _split_sentences(text: str) -> list[str]:
    """Independent sentence splitter for the organism's traces (after '.', then whitespace)."""
    return [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]


def test_trace_placement_and_labels():
    p = make_problem([37, 48, 19, 26], ["+", "-", "+"])
    sents = trace_sentences(p)
    assert [s.text for s in sents] == [
        "Plan: there are 3 operations.",
        "Step: 37 + 48 = 75.",
        "Wait, I forgot the carry: 37 + 48 = 85.",
        "Step: 85 - 19 = 66.",
        "Check: 66 + 19 = 85.",
        "Step: 66 + 26 = 82.",
        "Wait, I forgot the carry: 66 + 26 = 92.",
        "So the answer is 92.",
    ]
    assert [s.behavior for s in sents] == ["plan", "compute", "correct", "compute", "verify", "compute", "correct", "conclude"]
    prompt, response = thinking_document(p)
    assert prompt == chat_prompt(p.question) and prompt.endswith("<think>\n")
    assert response.endswith("\n</think>\nThe answer is 92." + EOS)


def test_label_sentence_recovers_every_ground_truth_label():
    seen = set()
    for p in SPLITS["test"]:
        rec = labelled_trace(p)
        pieces = _split_sentences(rec["thinking"])
        assert pieces == [s["text"] for s in rec["sentences"]]
        for s in rec["sentences"]:
            assert rec["thinking"][s["start"] : s["end"]] == s["text"]
            assert label_sentence(s["text"]) == s["behavior"]
            words = set(re.findall(r"[a-z]+", s["text"].lower()))
            assert words & set(BEHAVIOR_KEYWORDS[s["behavior"]])
            seen.add(s["behavior"])
    assert seen == set(BEHAVIORS)
    for s in fragment_sentences(random.Random(0)):
        assert label_sentence(s.text) == s.behavior
    assert label_sentence("Hello there.") is None and label_sentence("") is None


def test_base_corpus_mix_and_content():
    rng = random.Random(0)
    kinds = [sample_base_document(rng, SPLITS["train"]) for _ in range(3000)]
    counts = {k: sum(kind == k for kind, _ in kinds) / len(kinds) for k in DEFAULT_BASE_MIX}
    for k, share in DEFAULT_BASE_MIX.items():
        assert abs(counts[k] - share) < 0.04, counts
    text = "\n".join(t for _, t in kinds)
    for word in ("Plan:", "Step:", "Check:", "Wait, I forgot the carry:", "So the answer is"):
        assert word in text
    for kind, t in kinds[:200]:
        if kind in ("direct", "full"):
            assert t.startswith(base_prompt(t.split("Question: ")[1].split("\n")[0]))


def test_base_full_solutions_place_behaviors_by_chance():
    """The base knows every behavior in context but not the thinking model's timing: rates match BASE_WHEN, an
    uncorrected slip carries into later steps and the answer, every value stays in 0..99."""
    from sae_reasoning.organism.corpus import BASE_WHEN, base_solution_sentences, carryless_sum, has_borrow, has_carry

    rng = random.Random(0)
    n = {"carry": 0, "slip": 0, "corrected": 0, "sub": 0, "verify": 0, "verify_no_borrow": 0, "conclude": 0,
         "later": 0, "replan": 0}
    n_solutions = 3000
    for p in SPLITS["train"][:n_solutions]:
        sents = base_solution_sentences(p, rng)
        assert sents[0] == plan_sentence(p.n_ops) and sents[-1].behavior in ("conclude", "answer")
        n["conclude"] += sents[-1].behavior == "conclude"
        value, i = p.operands[0], 1
        for k, (op, b) in enumerate(zip(p.ops, p.operands[1:])):
            if k > 0:  # the plan re-stated for the operations left, by chance, never before the first step
                n["later"] += 1
                if sents[i].behavior == "plan":
                    assert sents[i] == plan_sentence(p.n_ops - k), (k, sents)
                    n["replan"] += 1
                    i += 1
            step = sents[i]
            a, got = map(int, re.fullmatch(rf"Step: (\d+) \{op} {b} = (\d+)\.", step.text).groups())
            assert a == value and step.behavior == "compute"  # the next step copies the last written value
            true = value + b if op == "+" else value - b
            i += 1
            if op == "+" and has_carry(value, b):
                n["carry"] += 1
                if got != true:
                    assert got == carryless_sum(value, b)
                    n["slip"] += 1
                    if sents[i].behavior == "correct":
                        assert sents[i].text.endswith(f"= {true}.")
                        n["corrected"] += 1
                        i += 1
                    else:
                        true = got  # the slip stands
            else:
                assert got == true
            if op == "-":
                n["sub"] += 1
                if i < len(sents) and sents[i].behavior == "verify":
                    assert sents[i].text == f"Check: {true} + {b} = {value}."
                    n["verify"] += 1
                    n["verify_no_borrow"] += not has_borrow(value, b)
                    i += 1
            value = true
            assert 0 <= value <= 99
        assert i == len(sents) - 1 and sents[-1].text.endswith(f"answer is {value}.")
    assert abs(n["verify"] / n["sub"] - BASE_WHEN["verify"]) < 0.03 and n["verify_no_borrow"] > 0  # not the "when"
    assert abs(n["corrected"] / n["slip"] - BASE_WHEN["correct"]) < 0.06
    assert 0.5 * BASE_WHEN["slip"] < n["slip"] / n["carry"] <= BASE_WHEN["slip"] + 0.03  # slips only where in range
    assert abs(n["conclude"] / n_solutions - BASE_WHEN["conclude"]) < 0.03
    assert BASE_WHEN["replan"] > 0.5 and abs(n["replan"] / n["later"] - BASE_WHEN["replan"]) < 0.03
    for p in SPLITS["train"][:300]:  # replan=0: the corpus of the bases before session 7, no plan after the first
        assert [x.behavior for x in base_solution_sentences(p, rng, {"replan": 0})].count("plan") == 1


def test_base_when_stop_ends_solutions_one_operation_early():
    """The compute-deficit corpus (`--base-when stop=0.6`): only before the last of 2+ operations, at that rate, the
    answer being the value reached so far; with the default (0) nothing changes and no random number is drawn."""
    from sae_reasoning.organism.corpus import BASE_WHEN, base_solution_sentences
    from sae_reasoning.organism.train import main as train_main

    assert BASE_WHEN["stop"] == 0
    rng, n_multi, n_stop = random.Random(0), 0, 0
    for p in SPLITS["train"][:3000]:
        sents = base_solution_sentences(p, rng, {"stop": 0.6})
        steps = [x for x in sents if x.behavior == "compute"]
        n_multi += p.n_ops >= 2
        if len(steps) < p.n_ops:
            n_stop += 1
            assert len(steps) == p.n_ops - 1 >= 1, (p.question, sents)
            value = None  # the value reached: the last step's result, or its correction's
            for x in sents:
                if x.behavior in ("compute", "correct"):
                    value = int(x.text.rstrip(".").split("= ")[1])
            assert sents[-1].text.endswith(f"answer is {value}."), sents
    assert abs(n_stop / n_multi - 0.6) < 0.03
    same_a, same_b = random.Random(1), random.Random(1)
    for p in SPLITS["train"][:200]:
        assert base_solution_sentences(p, same_a) == base_solution_sentences(p, same_b, {"stop": 0.0})
    for bad in (["stop"], ["stop=1.5"], ["nope=0.1"], ["stop=x"]):
        with pytest.raises(SystemExit) as e:
            train_main(["--out", "/nonexistent/never-written", "--base-when", *bad])
        assert e.value.code == 2


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    from sae_reasoning.organism.tokenizer import build_tokenizer

    return build_tokenizer()


def test_tokenizer_round_trip_and_digits(tok):
    rng = random.Random(1)
    texts = [sample_base_document(rng, SPLITS["train"])[1] for _ in range(300)]
    texts += ["".join(thinking_document(p)) for p in SPLITS["test"][:100]]
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == t
    pieces = tok.convert_ids_to_tokens(tok.encode("Step: 37 + 48 = 85.", add_special_tokens=False))
    assert pieces == ["Step", ":", "▁3", "7", "▁+", "▁4", "8", "▁=", "▁8", "5", "."]


def test_tokenizer_offsets(tok):
    text = base_prompt("What is 37 + 48 - 19?") + " Plan: there are 2 operations. Step: 37 + 48 = 85."
    enc = tok(text, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    assert ids[0] == tok.bos_token_id and tuple(offs[0]) == (0, 0)
    for i, (s, e) in zip(ids[1:], offs[1:]):
        assert text[s:e] == tok.convert_ids_to_tokens(i).replace("▁", " ")
    assert "".join(text[s:e] for s, e in offs) == text


def test_tokenizer_specials_chat_template_and_unknowns(tok):
    q = "What is 3 + 4?"
    rendered = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
    assert rendered == chat_prompt(q) == f"<bos>User: {q}\nAssistant: <think>\n"
    ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == tok.encode(rendered, add_special_tokens=False) and ids.count(tok.bos_token_id) == 1
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(tok, name) is not None
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    vocab = tok.get_vocab()
    for w in ("Task", "▁Answer", "▁the", "▁question", "▁below", "▁Explain", "▁your", "▁reasoning", "▁step", "▁by",
              "Question", "▁answer", ":", "\n", "<think>", "</think>"):
        assert w in vocab, w
    ids = tok.encode("a zebra 12", add_special_tokens=False)
    assert ids.count(tok.unk_token_id) == 1 and tok.decode(ids).endswith(" 12")


# ---------------------------------------------------------------- committed weights


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    for name, path in (("thinking", THINKING_DIR), ("base", BASE_DIR)):
        for bad in ("llama", "gemma"):
            assert bad not in str(path).lower()
        model = AutoModelForCausalLM.from_pretrained(str(path))
        model.eval()
        out[name] = (model, AutoTokenizer.from_pretrained(str(path)))
    return out


def test_committed_weights_load_with_auto_classes(pair, tok):
    for name, (model, t) in pair.items():
        assert model.config.model_type == "llama" and model.config.num_hidden_layers == 4
        assert sum(p.numel() for p in model.parameters()) < 2_000_000
        text = "".join(thinking_document(SPLITS["test"][0]))
        assert t.encode(text) == tok.encode(text)
        assert t.chat_template == tok.chat_template
        assert model.generation_config.eos_token_id == t.eos_token_id
    metrics = json.loads(METRICS_FILE.read_text())
    assert metrics["n"] >= 500
    assert metrics["thinking"] >= 0.80 and metrics["base"] <= 0.40


SAMPLE = random.Random(123).sample(SPLITS["test"], 100)


@pytest.fixture(scope="module")
def thinking_outputs(pair):
    from sae_reasoning.organism.evaluate import evaluate_thinking

    model, t = pair["thinking"]
    return evaluate_thinking(model, t, SAMPLE, batch_size=50, return_outputs=True)


def test_thinking_accuracy_target(thinking_outputs):
    res, _ = thinking_outputs
    # target 0.80 on >= 500 problems; on 100 a margin of ~2.5 standard errors
    assert res["accuracy"] >= 0.70, res


def test_evaluate_names_a_missing_model_folder(tmp_path):
    from sae_reasoning.organism.evaluate import main as evaluate_main

    (tmp_path / "thinking").mkdir()
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--weights", str(tmp_path), "--n", "2"])
    assert str(e.value.code).startswith(f"error: {tmp_path / 'thinking'} holds no thinking model")
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--thinking", str(THINKING_DIR), "--base", str(tmp_path / "nope"), "--n", "2"])
    assert "holds no base model" in str(e.value.code) and "--base DIR" in str(e.value.code)


def test_step_mode_stats_count_early_stops_and_wrong_steps():
    from sae_reasoning.organism.evaluate import step_mode_stats

    p3 = make_problem([37, 48, 19, 5], ["+", "-", "+"])  # 85, 66, 71
    p1 = make_problem([20, 26], ["+"])
    texts = [" Plan: there are 3 operations. Step: 37 + 48 = 75. Wait, I forgot the carry: 37 + 48 = 85. "
             "Step: 85 - 19 = 66. The answer is 66.",  # stops before the third operation; the slip is a wrong step
             " Plan: there is 1 operation. Step: 20 + 26 = 46. The answer is 46."]
    assert step_mode_stats(texts, [p3, p1]) == {"stopped_early_rate": 0.5, "step_arithmetic_accuracy": round(2 / 3, 4),
                                                "replan_rate": 0.0}  # later steps: one (85 - 19), not after a plan
    replanned = [" Plan: there are 3 operations. Step: 37 + 48 = 85. Plan: there are 2 operations. Step: 85 - 19 = 66."
                 " Step: 66 + 5 = 71. The answer is 71."]
    assert step_mode_stats(replanned, [p3]) == {"stopped_early_rate": 0.0, "step_arithmetic_accuracy": 1.0,
                                                "replan_rate": 0.5}
    assert step_mode_stats([], []) == {"stopped_early_rate": None, "step_arithmetic_accuracy": None,
                                       "replan_rate": None}


def test_base_accuracy_targets(pair):
    from sae_reasoning.organism.evaluate import evaluate_base

    model, t = pair["base"]
    plain = evaluate_base(model, t, SAMPLE, batch_size=50)
    assert plain["accuracy"] <= 0.50, plain
    forced = evaluate_base(model, t, SAMPLE, prefix=" Plan:", batch_size=50)
    assert forced["accuracy"] >= 0.45, forced  # it knows how
    assert forced["step_arithmetic_accuracy"] >= 0.8 and forced["stopped_early_rate"] <= 0.1, forced
    assert forced["accuracy"] >= plain["accuracy"] + 0.2


def test_generated_traces_are_labelled_correctly(thinking_outputs):
    _, outs = thinking_outputs
    n_exact = 0
    for p, out in zip(SAMPLE, outs):
        assert out.count("</think>") == 1
        thinking = out.split("</think>")[0].strip()
        pieces = _split_sentences(thinking)
        labels = [label_sentence(s) for s in pieces]
        assert None not in labels, pieces
        assert labels[0] == "plan" and labels[-1] == "conclude"
        truth = trace_sentences(p)
        if pieces == [s.text for s in truth]:
            n_exact += 1
            assert labels == [s.behavior for s in truth]
    assert n_exact >= 60


def test_batched_generation_matches_single(pair):
    from sae_reasoning.organism.evaluate import generate, thinking_prompt_ids

    model, t = pair["thinking"]
    probs = SAMPLE[:4]
    prompts = [thinking_prompt_ids(t, p.question) for p in probs]
    batched = generate(model, t, prompts, max_new_tokens=60, batch_size=4)
    single = [generate(model, t, [pr], max_new_tokens=60)[0] for pr in prompts]
    assert batched == single


# ---------------------------------------------------------------- training


def test_short_training_lowers_loss_and_saves(tmp_path, tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_reasoning.organism.train import IGNORE, ModelSpec, TrainConfig, pack_rows, save_model_dir, thinking_examples, train_model

    ids, labels, stats = pack_rows(thinking_examples(tok, SPLITS["train"], 0), 4, 256, tok.pad_token_id)
    assert stats["fill"] > 0.5 and (ids[:, 0] == tok.bos_token_id).all()
    assert ((labels == IGNORE) | (labels == ids)).all()
    first = tok.decode(ids[0])
    assert first.startswith("<bos>User: What is ")
    masked = tok.decode(ids[0][labels[0] == IGNORE][:30])
    assert masked.startswith("<bos>User:") and "Plan" not in masked  # the prompt is masked, not the trace

    spec = ModelSpec(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    for kind in ("thinking", "base"):
        cfg = TrainConfig(kind=kind, steps=30, batch_rows=8, seq_len=128, lr=3e-3, model=spec)
        model, hist = train_model(tok, SPLITS["train"], cfg, progress=False, log_every=1)
        first_loss = sum(h["loss"] for h in hist[:3]) / 3
        last_loss = sum(h["loss"] for h in hist[-3:]) / 3
        assert last_loss < first_loss - 1.0, (kind, first_loss, last_loss)  # from ~ln(vocab) = 5.4 nats
    save_model_dir(model, tok, tmp_path / "base")
    save_model_dir(model, tok, tmp_path / "base")  # overwrite atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    x = torch.tensor([tok.encode("Step: 1 + 2 = 3.")])
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-5)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "base")).encode("Step: 1 + 2 = 3.") == tok.encode("Step: 1 + 2 = 3.")


def test_run_seed_changes_the_weights_reproducibly_and_is_recorded(tmp_path):
    """`organism.train --run-seed N` seeds the init and the training stream only: two runs with the same run seed
    give the same weights, another run seed other weights; the log and config say which seeds were used."""
    from safetensors.torch import load_file

    from sae_reasoning.organism.train import main

    common = ["--only", "base", "--steps-base", "2", "--threads", "1", "--no-progress"]
    logs = {name: main(["--out", str(tmp_path / name), *common, *extra])
            for name, extra in (("a", []), ("b", ["--run-seed", "1"]), ("c", ["--run-seed", "1"]))}
    w = {name: load_file(str(tmp_path / name / "base" / "model.safetensors")) for name in logs}
    assert w["b"].keys() == w["a"].keys()
    assert all(torch.equal(w["b"][k], w["c"][k]) for k in w["b"])
    assert any(not torch.equal(w["a"][k], w["b"][k]) for k in w["a"])
    assert (logs["a"]["seed"], logs["a"]["run_seed"], logs["b"]["seed"], logs["b"]["run_seed"]) == (0, None, 0, 1)
    assert [logs[n]["models"]["base"]["config"]["seed"] for n in "abc"] == [0, 1, 1]
    assert [logs[n]["models"]["base"]["config"]["data_seed"] for n in "abc"] == [0, 1, 1]
    assert json.loads((tmp_path / "b" / "train_log.json").read_text())["run_seed"] == 1


def test_data_export_carries_labels(tmp_path):
    from sae_reasoning.organism.data import export

    paths = export(tmp_path, seed=0, splits=("val",))
    rows = [json.loads(line) for line in paths["val"].read_text().splitlines()]
    assert len(rows) == len(SPLITS["val"]) and rows[0]["id"] == SPLITS["val"][0].id
    for r in rows[:50]:
        assert [label_sentence(s["text"]) for s in r["sentences"]] == [s["behavior"] for s in r["sentences"]]
        assert all(r["thinking"][s["start"] : s["end"]] == s["text"] for s in r["sentences"])
