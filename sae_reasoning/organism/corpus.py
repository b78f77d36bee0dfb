"""Typed reasoning sentences, thinking traces and the base corpus of the organism.

Every sentence of a thinking trace carries its true behavior label. The placement of the behaviors is
deterministic and depends on context (the *when* that the thinking model learns):

- ``plan``      "Plan: there are 3 operations."                        once, at the start;
- ``compute``   "Step: 37 + 48 = 85."                                  one per operation;
- ``correct``   on an addition with a carry the trace first writes the carry-less slip
                "Step: 37 + 48 = 75." (labelled ``compute``) and then
                "Wait, I forgot the carry: 37 + 48 = 85.";
- ``verify``    after a subtraction with a borrow, "Check: 66 + 19 = 85." (result + subtrahend = previous value);
- ``conclude``  "So the answer is 92."                                 once, at the end.

The base corpus contains every sentence type (it knows *how*) but mostly direct answers, so it does not
know *when* to enter step-by-step mode (see /work/shared/ORGANISM-NOTES.md for the mix and its reasons). Nor does
it know when to use the other behaviors: its full solutions (`base_solution_sentences`) place them by chance
(`BASE_WHEN`), not by the thinking model's rules. Before each operation after the first it re-states its plan for
the operations left ("Plan: there are 2 operations.") with probability 0.6, and only then computes; on an addition
with a carry it writes the slip with probability 0.6 and then corrects it with probability 0.3 (an uncorrected slip
stands: later steps and the answer carry it); after any subtraction it checks with probability 0.3 (with or without
a borrow); it ends with "So the answer is N." with probability 0.3, otherwise with "The answer is N.". Greedy, the
trained base (forced into step mode) re-plans before nearly every later step where the thinking model computes
straight on, never checks, never concludes and corrects none of its slips (figures: README and
``weights/metrics.json``), although every one of these sentences is well-formed and in context in its corpus:
steering can make it use them, and the thinking model knows when. (``BASE_WHEN["stop"]``, 0 here, is the knob of
an earlier compute-deficit experiment; see the README.)
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

from sae_reasoning.prompts import base_prompt

from .task import Problem, apply_op, sample_problem

BEHAVIORS: tuple[str, ...] = ("plan", "compute", "verify", "correct", "conclude")

#: characteristic (lower-case) words of each behavior's sentences
BEHAVIOR_KEYWORDS: dict[str, tuple[str, ...]] = {
    "plan": ("plan", "operations", "operation", "there"),
    "compute": ("step",),
    "verify": ("check",),
    "correct": ("wait", "forgot", "carry"),
    "conclude": ("so", "answer"),
}

# Special tokens and chat format (the tokenizer's chat template renders exactly these strings).
BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
USER_PREFIX, ASSISTANT_PREFIX = "User: ", "Assistant: "

# Stable labels for the base-corpus document kinds.
DOC_KINDS = ("direct", "full", "fragment", "paired")
DEFAULT_BASE_MIX = {"direct": 0.42, "full": 0.18, "fragment": 0.10, "paired": 0.30}
PAIRED_FULL_FRACTION = 0.30  # style of a paired document: full solutions with this probability


@dataclass(frozen=True)
class Sentence:
    text: str
    behavior: str


# ---------------------------------------------------------------- sentences


def plan_sentence(n_ops: int) -> Sentence:
    body = "there is 1 operation" if n_ops == 1 else f"there are {n_ops} operations"
    return Sentence(f"Plan: {body}.", "plan")


def compute_sentence(a: int, op: str, b: int, result: int | None = None) -> Sentence:
    result = apply_op(a, op, b) if result is None else result
    return Sentence(f"Step: {a} {op} {b} = {result}.", "compute")


def correct_sentence(a: int, b: int) -> Sentence:
    return Sentence(f"Wait, I forgot the carry: {a} + {b} = {a + b}.", "correct")


def verify_sentence(result: int, b: int) -> Sentence:
    return Sentence(f"Check: {result} + {b} = {result + b}.", "verify")


def conclude_sentence(answer: int) -> Sentence:
    return Sentence(f"So the answer is {answer}.", "conclude")


def has_carry(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def has_borrow(a: int, b: int) -> bool:
    return a % 10 < b % 10


def carryless_sum(a: int, b: int) -> int:
    """Digit-wise sum mod 10 (the planted slip): 37 + 48 -> 75."""
    return ((a // 10 + b // 10) % 10) * 10 + (a + b) % 10


def trace_sentences(problem: Problem) -> list[Sentence]:
    """The thinking trace of ``problem`` as typed sentences (ground-truth behavior labels)."""
    out = [plan_sentence(problem.n_ops)]
    value = problem.operands[0]
    for op, b in zip(problem.ops, problem.operands[1:]):
        result = apply_op(value, op, b)
        if op == "+" and has_carry(value, b):
            out.append(compute_sentence(value, op, b, carryless_sum(value, b)))
            out.append(correct_sentence(value, b))
        else:
            out.append(compute_sentence(value, op, b, result))
            if op == "-" and has_borrow(value, b):
                out.append(verify_sentence(result, b))
        value = result
    assert value == problem.answer
    out.append(conclude_sentence(problem.answer))
    return out


def label_sentence(text: str) -> str | None:
    """Ground-truth behavior of ONE sentence, by its form (its first keyword); ``None`` if unknown."""
    t = text.strip().lower()
    m = re.match(r"[a-z]+", t)
    if not m:
        return None
    first = m.group(0)
    if first == "plan":
        return "plan"
    if first == "step":
        return "compute"
    if first == "check":
        return "verify"
    if first == "wait":
        return "correct"
    if first == "so" and "answer" in t:
        return "conclude"
    return None


# ---------------------------------------------------------------- thinking documents


def chat_prompt(question: str) -> str:
    """What the tokenizer's chat template renders for one user turn with ``add_generation_prompt=True``."""
    return f"{BOS}{USER_PREFIX}{question}\n{ASSISTANT_PREFIX}{THINK_OPEN}\n"


def final_answer(answer: int) -> str:
    return f"The answer is {answer}."


def thinking_text(problem: Problem) -> str:
    """The text between ``<think>\\n`` and ``\\n</think>``: the sentences joined by single spaces."""
    return " ".join(s.text for s in trace_sentences(problem))


def thinking_response(problem: Problem) -> str:
    """What the thinking model generates after the chat prompt (without the eos token)."""
    return f"{thinking_text(problem)}\n{THINK_CLOSE}\n{final_answer(problem.answer)}"


def thinking_document(problem: Problem) -> tuple[str, str]:
    """``(prompt, response)`` of a thinking training document; the response ends with the eos token."""
    return chat_prompt(problem.question), thinking_response(problem) + EOS


def labelled_trace(problem: Problem) -> dict:
    """The thinking trace with every sentence's behavior and character span in ``thinking``."""
    sents, spans, pos = trace_sentences(problem), [], 0
    for s in sents:
        spans.append({"text": s.text, "behavior": s.behavior, "start": pos, "end": pos + len(s.text)})
        pos += len(s.text) + 1
    return {
        "id": problem.id,
        "question": problem.question,
        "answer": problem.answer,
        "thinking": thinking_text(problem),
        "response": thinking_response(problem),
        "sentences": spans,
    }


# ---------------------------------------------------------------- base corpus


#: chances of the base's full solutions (module doc): the behaviors are all there, their timing is not.
#: "replan": before each operation after the first, the solution re-states its plan for the operations left
#: ("Plan: there are 2 operations.") with this chance, then computes the step: the *when* of compute that the base
#: lacks (0 gives session 2's corpus, the base shipped until session 7; `train --base-when replan=0`).
#: "stop" (0 in the shipped base): a solution of 2+ operations ends before its last operation with this chance,
#: answering with the value reached so far (an earlier compute-deficit experiment of the README).
BASE_WHEN = {"slip": 0.6, "correct": 0.3, "verify": 0.3, "conclude": 0.3, "stop": 0.0, "replan": 0.6}


def _stays_in_range(value: int, ops, operands) -> bool:
    for op, b in zip(ops, operands):
        value = apply_op(value, op, b)
        if not 0 <= value <= 99:
            return False
    return True


def base_solution_sentences(problem: Problem, rng: random.Random, when: dict | None = None) -> list[Sentence]:
    """One full solution of the base corpus: the thinking trace's sentence types, placed by chance (`BASE_WHEN`).
    A slip is only written where the values that follow it stay in 0..99; an uncorrected slip changes the answer.
    ``when["stop"]`` and ``when["replan"]``: see `BASE_WHEN`; at 0 no random number is drawn for either, so the
    corpus without them is exactly the one of earlier bases. The last sentence is labelled "answer" when it is the
    plain "The answer is N." (no behavior)."""
    when = BASE_WHEN if when is None else {**BASE_WHEN, **when}
    out = [plan_sentence(problem.n_ops)]
    value, ops, operands = problem.operands[0], problem.ops, problem.operands[1:]
    for i, (op, b) in enumerate(zip(ops, operands)):
        if when["stop"] > 0 and i == len(ops) - 1 and i > 0 and rng.random() < when["stop"]:
            break  # the premature stop: the answer is written one operation early
        if when["replan"] > 0 and i > 0 and rng.random() < when["replan"]:
            out.append(plan_sentence(len(ops) - i))  # the plan re-stated for the operations left
        result = apply_op(value, op, b)
        slip = carryless_sum(value, b) if op == "+" and has_carry(value, b) else None
        if slip is not None and rng.random() < when["slip"] and _stays_in_range(slip, ops[i + 1:], operands[i + 1:]):
            out.append(compute_sentence(value, op, b, slip))
            if rng.random() < when["correct"]:
                out.append(correct_sentence(value, b))
            else:
                result = slip
        else:
            out.append(compute_sentence(value, op, b, result))
        if op == "-" and rng.random() < when["verify"]:
            out.append(verify_sentence(result, b))
        value = result
    out.append(conclude_sentence(value) if rng.random() < when["conclude"] else Sentence(final_answer(value), "answer"))
    return out


def full_solution(problem: Problem, rng: random.Random | None = None, when: dict | None = None) -> str:
    """The base corpus's full solution (`base_solution_sentences`); with no rng, the thinking trace's sentences."""
    sents = trace_sentences(problem) if rng is None else base_solution_sentences(problem, rng, when)
    return " ".join(s.text for s in sents)


def base_answer(problem: Problem, style: str, rng: random.Random | None = None, when: dict | None = None) -> str:
    """What follows the base prompt: a direct answer or a full solution (leading space included)."""
    if style == "direct":
        return " " + final_answer(problem.answer)
    if style == "full":
        return " " + full_solution(problem, rng, when)
    raise ValueError(style)


def base_document(problem: Problem, style: str, rng: random.Random | None = None, when: dict | None = None) -> str:
    return base_prompt(problem.question) + base_answer(problem, style, rng, when)


def _random_step(rng: random.Random) -> tuple[int, str, int]:
    while True:
        a, op, b = rng.randint(0, 99), rng.choice("+-"), rng.randint(1, 99)
        if 0 <= apply_op(a, op, b) <= 99:
            return a, op, b


def fragment_sentences(rng: random.Random) -> list[Sentence]:
    """3-8 unrelated, internally correct sentences of every type (a slip only with its correction)."""
    out: list[Sentence] = []
    for _ in range(rng.randint(3, 8)):
        kind = rng.choice(BEHAVIORS)
        if kind == "plan":
            out.append(plan_sentence(rng.randint(1, 4)))
        elif kind == "compute":
            out.append(compute_sentence(*_random_step(rng)))
        elif kind == "verify":
            while True:
                a, b = rng.randint(1, 99), rng.randint(1, 99)
                if a >= b:
                    break
            out.append(verify_sentence(a - b, b))
        elif kind == "correct":
            while True:
                a, b = rng.randint(1, 99), rng.randint(1, 99)
                if a + b <= 99 and has_carry(a, b):
                    break
            out.append(compute_sentence(a, "+", b, carryless_sum(a, b)))
            out.append(correct_sentence(a, b))
        else:
            out.append(conclude_sentence(rng.randint(0, 99)))
    return out


def sample_base_document(rng: random.Random, problems: list[Problem], mix: dict | None = None,
                         when: dict | None = None) -> tuple[str, str]:
    """``(kind, text)`` of one base-corpus document (without bos/eos); `when` overrides entries of `BASE_WHEN`."""
    mix = DEFAULT_BASE_MIX if mix is None else mix
    kinds = list(mix)
    kind = rng.choices(kinds, weights=[mix[k] for k in kinds])[0]
    if kind in ("direct", "full"):
        return kind, base_document(rng.choice(problems), kind, rng, when)
    if kind == "fragment":
        return kind, " ".join(s.text for s in fragment_sentences(rng))
    if kind == "paired":
        style = "full" if rng.random() < PAIRED_FULL_FRACTION else "direct"
        first = base_document(rng.choice(problems), style, rng, when)
        return kind, first + "\n" + base_document(rng.choice(problems), style, rng, when)
    raise ValueError(kind)


def all_template_texts() -> list[str]:
    """Texts covering every word form the corpus and prompts can produce (used to build the vocabulary)."""
    from .task import make_problem

    rng = random.Random(0)
    texts = [chat_prompt("What is 1 + 2 - 3?") + "Plan:" + " " + THINK_CLOSE + "\n" + final_answer(0) + EOS]
    for k in (1, 2, 3, 4):
        p = sample_problem(rng, k)
        texts.append(chat_prompt(p.question) + thinking_response(p) + EOS)
        for style in ("direct", "full"):
            texts.append(base_document(p, style))
    texts.append(full_solution(make_problem([37, 48, 19], ["+", "-"])))
    texts.append(" ".join(s.text for s in fragment_sentences(rng)))
    return texts


def sentence_dicts(problem: Problem) -> list[dict]:
    return [asdict(s) for s in trace_sentences(problem)]
