"""The organism's procedural task: chains of additions and subtractions on small integers.

A problem is ``k`` operations (``+`` or ``-``) applied left to right to operands 1-99, with every running
value kept in 0-99 (rejection sampling). Answers are exact. Splits are seeded and deterministic; the
validation and test expressions never occur in the training split (deduplicated by expression).

Pure Python: no torch, no tokenizer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

MIN_OPERAND = 1
MAX_OPERAND = 99
MAX_VALUE = 99  # every running value stays in 0..MAX_VALUE

TRAIN_OPS = (1, 2, 3, 4)
EVAL_OPS = (2, 3, 4)


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem. ``operands`` has ``len(ops) + 1`` entries; ``ops`` are ``"+"`` or ``"-"``."""

    id: str
    question: str
    answer: int
    operands: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def expression(self) -> str:
        return expression_of(self.operands, self.ops)

    @property
    def n_ops(self) -> int:
        return len(self.ops)

    def running_values(self) -> list[int]:
        """Values after 0, 1, …, k operations (first entry is the first operand)."""
        values = [self.operands[0]]
        for op, b in zip(self.ops, self.operands[1:]):
            values.append(apply_op(values[-1], op, b))
        return values


def apply_op(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    raise ValueError(f"unknown op {op!r}")


def expression_of(operands, ops) -> str:
    parts = [str(operands[0])]
    for op, b in zip(ops, operands[1:]):
        parts += [op, str(b)]
    return " ".join(parts)


def question_of(operands, ops) -> str:
    return f"What is {expression_of(operands, ops)}?"


def make_problem(operands, ops, id: str = "") -> Problem:
    operands, ops = tuple(int(x) for x in operands), tuple(ops)
    if len(operands) != len(ops) + 1:
        raise ValueError("need len(operands) == len(ops) + 1")
    value = operands[0]
    for op, b in zip(ops, operands[1:]):
        value = apply_op(value, op, b)
    return Problem(id=id, question=question_of(operands, ops), answer=value, operands=operands, ops=ops)


def sample_problem(rng: random.Random, n_ops: int, id: str = "") -> Problem:
    """Sample ``n_ops`` operations left to right; each step is rejection-sampled to stay in 0..99."""
    while True:
        value = rng.randint(MIN_OPERAND, MAX_OPERAND)
        operands, ops = [value], []
        ok = True
        for _ in range(n_ops):
            for _attempt in range(100):
                op = rng.choice("+-")
                b = rng.randint(MIN_OPERAND, MAX_OPERAND)
                nxt = apply_op(value, op, b)
                if 0 <= nxt <= MAX_VALUE:
                    break
            else:  # pragma: no cover - practically unreachable
                ok = False
                break
            operands.append(b)
            ops.append(op)
            value = nxt
        if ok:
            return make_problem(operands, ops, id=id)


def _sample_unique(rng, n, ops_choices, prefix, exclude: set[str]) -> list[Problem]:
    out: list[Problem] = []
    while len(out) < n:
        p = sample_problem(rng, rng.choice(ops_choices))
        if p.expression in exclude:
            continue
        exclude.add(p.expression)
        out.append(Problem(f"{prefix}-{len(out):06d}", p.question, p.answer, p.operands, p.ops))
    return out


def make_splits(seed: int = 0, n_train: int = 50_000, n_val: int = 300, n_test: int = 600) -> dict[str, list[Problem]]:
    """Seeded ``{"train", "val", "test"}`` splits.

    Test and validation (2-4 operations) are drawn first; training (1-4 operations) excludes every
    evaluation expression. Expressions are unique within each split. Deterministic given the arguments.
    """
    rng = random.Random(f"organism-task-{seed}")
    seen: set[str] = set()
    test = _sample_unique(rng, n_test, EVAL_OPS, "test", seen)
    val = _sample_unique(rng, n_val, EVAL_OPS, "val", seen)
    train = _sample_unique(rng, n_train, TRAIN_OPS, "train", seen)
    return {"train": train, "val": val, "test": test}


def parse_answer(text: str) -> int | None:
    """The integer after the final ``answer is`` in ``text`` (``None`` if absent)."""
    import re

    found = re.findall(r"answer is\s*(-?\d+)", text)
    return int(found[-1]) if found else None
