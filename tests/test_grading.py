"""Grader tests: hand-labelled tricky answers, the real MATH500 / GSM8K golds, threads, garbage."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sae_reasoning.grading import Extraction, extract_answer, grade, gsm8k_gold, normalise

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.exists():
    DATA = Path("/work/shared/data")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{2}} done", Extraction("\\frac{1}{2}", "boxed")),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", Extraction("\\left( 3, \\frac{\\pi}{2} \\right)", "boxed")),
        ("first \\boxed{3}, then \\boxed{4}.", Extraction("4", "boxed")),
        ("\\fbox{12} and \\boxed 7", Extraction("7", "boxed")),
        ("\\boxed{5} then a truncated \\boxed{\\frac{1}{", Extraction("5", "boxed")),
        ("\\boxed{} is empty, \\boxed{6} is not", Extraction("6", "boxed")),
        ("Natalia sold 48 clips.\n#### 72", Extraction("72", "hashes")),
        ("The answer is 42.", Extraction("42", "answer_is")),
        ("The answer is 3.5. Let me double check 7.", Extraction("3.5", "answer_is")),
        ("the answer is: $\\frac{1}{2}$.", Extraction("$\\frac{1}{2}$", "answer_is")),
        ("**Answer:** 42", Extraction("42", "answer_is")),
        ("The answer is:\n\n**42**", Extraction("42", "answer_is")),
        ("The answer isn't obvious, maybe 7", Extraction("7", "last_number")),
        ("\\boxed{\\{1,2\\}} and later \\boxed{x^{2}}", Extraction("x^{2}", "boxed")),
        ("The answer is 4. Hmm, no, the answer is 5.", Extraction("5", "answer_is")),
        ("We get 12 apples, minus 3, so -1,250.5 left", Extraction("-1,250.5", "last_number")),
        ("5-3 gives 2, then 10-3", Extraction("3", "last_number")),
        ("no digits here at all", Extraction(None, "none")),
        ("", Extraction(None, "none")),
        # the thinking part is ignored once it is closed, and used when it is not
        ("<think>maybe \\boxed{7}</think>So it is 8", Extraction("8", "last_number")),
        ("<think>I am still thinking about 7", Extraction("7", "last_number")),
        ("<think>x</think>nothing here", Extraction(None, "none")),
    ],
)
def test_extract_answer(text: str, expected: Extraction) -> None:
    assert extract_answer(text) == expected


# (prediction, gold, kind, hand label)
HAND_LABELLED = [
    # fractions
    ("\\boxed{\\frac{1}{2}}", "0.5", "math", True),
    ("The answer is 0.5.", "\\frac{1}{2}", "math", True),
    ("$\\boxed{\\dfrac{1}{2}}$", "\\frac12", "math", True),
    ("\\boxed{\\tfrac{3}{4}}", "0.75", "number", True),
    ("\\boxed{\\frac{1}{3}}", "0.5", "math", False),
    ("\\boxed{1/2}", "\\frac{1}{2}", "math", True),
    # LaTeX
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", "math", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", "math", True),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", "math", False),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", "math", True),
    ("\\boxed{\\left(3, \\pi/2\\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", "math", True),
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", "math", False),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", "math", True),
    ("\\boxed{\\frac{270}{7}}", "\\frac{270}7\\text{ degrees}", "math", True),
    # units and currency
    ("The answer is $18.", "18", "number", True),
    ("The answer is 18 dollars.", "18", "number", True),
    ("\\boxed{\\$18}", "18", "number", True),
    ("\\boxed{18 \\text{ cm}}", "18", "number", True),
    ("\\boxed{18\\%}", "18", "number", True),
    ("The answer is 18%.", "18", "number", True),
    ("\\boxed{18\\%}", "0.18", "math", False),  # documented: % is dropped, not divided by 100
    ("The answer is 18.90 dollars.", "\\$18.90", "math", True),
    ("\\boxed{5.4}", "5.4 \\text{ cents}", "math", True),
    ("\\boxed{19 dollars}", "18", "number", False),
    # thousands separators
    ("#### 1,000", "1000", "number", True),
    ("The answer is 1,000,000.", "1000000", "number", True),
    ("\\boxed{32,348}", "\\$32,\\!348", "math", True),
    ("\\boxed{32348}", "\\$32,\\!348", "math", True),
    ("\\boxed{1,000}", "100", "number", False),
    ("\\boxed{3, 5}", "3, 5", "math", True),
    # negative numbers
    ("\\boxed{-5}", "-5", "number", True),
    ("The answer is −5.", "-5", "number", True),
    ("\\boxed{−5}", "-5", "math", True),
    ("The answer is 5.", "-5", "number", False),
    ("\\boxed{-5}", "5", "number", False),
    # several boxed answers: the last counts
    ("\\boxed{3} no wait \\boxed{4}", "4", "number", True),
    ("\\boxed{3} no wait \\boxed{4}", "3", "number", False),
    # trailing period, plain answers, decimals
    ("The answer is 42.", "42", "number", True),
    ("The answer is 42.0.", "42", "number", True),
    ("The answer is 42.5.", "42", "number", False),
    # no answer at all / garbage
    ("I have no idea.", "4", "number", False),
    ("", "4", "number", False),
    ("\\boxed{{{{}", "4", "number", False),
    ("garbage \\boxed{))(( \\frac{", "2", "number", False),
    ("\\boxed{\\frac{\\frac{}{}}{\\sqrt[}{}", "\\frac12", "math", False),
    ("\x00\x01 ∑∫ 🎉 }}}{{{ $$$ \\\\", "4", "number", False),
]


@pytest.mark.parametrize("pred, gold, kind, label", HAND_LABELLED)
def test_hand_labels(pred: str, gold: str, kind: str, label: bool) -> None:
    g = grade(pred, gold, kind)
    assert g.correct is label, g


def test_grade_record_is_serialisable() -> None:
    g = grade("The answer is 42.", "42", "number")
    d = g.to_dict()
    assert d == {"correct": True, "extracted": "42", "method": "answer_is", "gold_parsed": "42", "pred_parsed": "42"}
    json.dumps(d)
    assert grade(None, "4", "number").correct is False  # type: ignore[arg-type]


def test_bad_gold_or_kind_raises() -> None:
    with pytest.raises(ValueError, match="does not parse"):
        grade("\\boxed{4}", "", "number")
    with pytest.raises(ValueError, match="kind"):
        grade("\\boxed{4}", "4", "text")  # type: ignore[arg-type]


def test_normalise() -> None:
    assert normalise(" $18$. ") == "18"
    assert normalise("\\$32,\\!348") == "32,348"
    assert normalise("18 dollars") == "18"
    assert normalise("−5") == "-5"
    assert normalise("**42**") == "42"
    assert normalise("\\(\\frac{1}{2}\\)") == "\\frac{1}{2}"


def test_pathological_inputs_are_fast() -> None:
    t0 = time.perf_counter()
    assert not grade("\\boxed{" * 30000 + "1", "18", "number").correct  # many unclosed boxes
    assert not grade("The answer is 18 " + "ab " * 5000 + "1", "18", "number").correct  # runaway line
    assert not grade("18 " + "a" * 50 + "1", "18", "number").correct  # regex backtracking bait
    assert grade("1 " * 100_000, "1", "number").correct
    assert time.perf_counter() - t0 < 5.0


def test_gsm8k_gold() -> None:
    assert gsm8k_gold("She has 3 + 4 = <<3+4=7>>7.\n#### 1,234") == "1234"
    assert gsm8k_gold("#### -5") == "-5"


def test_worker_threads() -> None:
    # math-verify's SIGALRM timeouts fail outside the main thread; grade must turn them off there.
    cases = [(p, g, k, lab) for p, g, k, lab in HAND_LABELLED[:20]]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda c: grade(c[0], c[1], c[2]).correct, cases))
    assert got == [c[3] for c in cases]


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        pytest.skip(f"{path} not found")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_all_math500_golds_grade_correct_against_themselves() -> None:
    rows = _jsonl(DATA / "math500" / "test.jsonl")
    assert len(rows) == 500
    bad = [r["answer"] for r in rows if not grade("So the final answer is \\boxed{" + r["answer"] + "}.", r["answer"]).correct]
    assert bad == []


def test_gsm8k_golds_sample() -> None:
    rows = _jsonl(DATA / "gsm8k" / "test.jsonl")
    golds = [gsm8k_gold(r["answer"]) for r in random.Random(0).sample(rows, 150)]
    for g in golds:
        for pred in (f"#### {g}", f"The answer is {g}.", f"<think>try 3.</think> so \\boxed{{{g}}}"):
            assert grade(pred, g, "number").correct, (pred, g)
        wrong = str(int(float(g)) + 1)
        assert not grade(f"The answer is {wrong}.", g, "number").correct
