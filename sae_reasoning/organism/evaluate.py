"""Greedy accuracy of the organism's models on held-out problems.

    python -m sae_reasoning.organism.evaluate [--weights DIR] [--n 600] [--split test] [--threads 2]

prints JSON: accuracy of the thinking model (chat-template prompt), of the base model (``base_prompt``), of
the base model forced to continue with ``" Plan:"`` (it *knows how*), and how often the base chooses step
mode by itself (its first generated word is "Plan"), each overall and per number of operations; for step-mode
answers, how often the base writes fewer steps than operations and how often its written steps are right.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path

from sae_reasoning.prompts import base_prompt

from .task import Problem, make_splits, parse_answer

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FORCED_PREFIX = " Plan:"


def load(path: str | Path):
    """``(model, tokenizer)`` through the ordinary Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    model.eval()
    return model, tok


def thinking_prompt_ids(tokenizer, question: str) -> list[int]:
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def base_prompt_ids(tokenizer, question: str, prefix: str = "") -> list[int]:
    return tokenizer(base_prompt(question) + prefix)["input_ids"]  # <bos> added, as in training


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 200, batch_size: int = 64) -> list[str]:
    """Greedy continuations (decoded up to eos, see ``decode_continuation``), batched with left padding."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompts[i]
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        for r, i in enumerate(idx):
            outs[i] = decode_continuation(tokenizer, gen[r, width:].tolist())
    return outs


def decode_continuation(tokenizer, ids: list[int]) -> str:
    """Text of generated ids up to the first eos; keeps ``<think>``/``</think>``, drops pad/bos/eos."""
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    drop = {tokenizer.pad_token_id, tokenizer.bos_token_id}
    return tokenizer.decode([t for t in ids if t not in drop], skip_special_tokens=False)


def base_answer_text(continuation: str) -> str:
    """A base continuation up to the first newline (the base may go on to invent a next question)."""
    return continuation.split("\n", 1)[0]


def _summary(problems: list[Problem], correct: list[bool], extra: dict | None = None) -> dict:
    by_k = defaultdict(list)
    for p, c in zip(problems, correct):
        by_k[p.n_ops].append(c)
    out = {
        "accuracy": sum(correct) / max(1, len(correct)),
        "n": len(correct),
        "by_n_ops": {str(k): round(sum(v) / len(v), 4) for k, v in sorted(by_k.items())},
    }
    out.update(extra or {})
    return out


def evaluate_thinking(model, tokenizer, problems: list[Problem], max_new_tokens: int = 220, batch_size: int = 64,
                      return_outputs: bool = False):
    prompts = [thinking_prompt_ids(tokenizer, p.question) for p in problems]
    outs = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    correct = [parse_answer(o) == p.answer for o, p in zip(outs, problems)]
    closed = sum("</think>" in o for o in outs) / max(1, len(outs))
    res = _summary(problems, correct, {"closed_think_rate": closed})
    return (res, outs) if return_outputs else res


def evaluate_base(model, tokenizer, problems: list[Problem], prefix: str = "", max_new_tokens: int = 200,
                  batch_size: int = 64, return_outputs: bool = False):
    prompts = [base_prompt_ids(tokenizer, p.question, prefix) for p in problems]
    outs = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    texts = [base_answer_text(prefix + o) for o in outs]
    correct = [parse_answer(t) == p.answer for t, p in zip(texts, problems)]
    step_mode = [t.lstrip().startswith(("Plan", "Step")) for t in texts]
    res = _summary(problems, correct, {"step_mode_rate": sum(step_mode) / max(1, len(texts)),
                                       **step_mode_stats([t for t, m in zip(texts, step_mode) if m],
                                                         [p for p, m in zip(problems, step_mode) if m])})
    return (res, texts) if return_outputs else res


_STEP = re.compile(r"Step: (\d+) ([+-]) (\d+) = (\d+)\.")


def step_mode_stats(texts: list[str], problems: list[Problem]) -> dict:
    """Of step-mode answers: ``stopped_early_rate``, the share that wrote fewer steps than the problem has
    operations, and ``step_arithmetic_accuracy``, the share of written "Step: a op b = c." sentences whose c is
    a op b (how well it *knows how*; a slip counts as wrong, a wrongly copied operand does not), and
    ``replan_rate``, the share of the steps after the first that come right after a re-stated plan (the base's
    missing *when* of compute, `corpus.BASE_WHEN["replan"]`)."""
    if not texts:
        return {"stopped_early_rate": None, "step_arithmetic_accuracy": None, "replan_rate": None}
    early, right, n_steps, replans, n_later = 0, 0, 0, 0, 0
    for t, p in zip(texts, problems):
        steps = _STEP.findall(t)
        early += len(steps) < p.n_ops
        sentences = re.split(r"(?<=\.)\s+", t.strip())
        later = [i for i, x in enumerate(sentences) if x.startswith("Step:")][1:]  # the steps after the first
        n_later += len(later)
        replans += sum(sentences[i - 1].startswith("Plan:") for i in later)
        for a, op, b, c in steps:
            n_steps += 1
            right += int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    return {"stopped_early_rate": round(early / len(texts), 4),
            "step_arithmetic_accuracy": round(right / n_steps, 4) if n_steps else None,
            "replan_rate": round(replans / n_later, 4) if n_later else None}


def model_dirs(weights: str | Path, thinking_dir: str | Path | None = None,
               base_dir: str | Path | None = None) -> dict[str, Path]:
    """{"thinking": folder, "base": folder}: the given folders, else ``weights/<kind>``."""
    given = {"thinking": thinking_dir, "base": base_dir}
    return {kind: Path(d) if d else Path(weights) / kind for kind, d in given.items()}


def evaluate_pair(weights: str | Path = WEIGHTS_DIR, n: int | None = None, split: str = "test", seed: int = 0,
                  batch_size: int = 64, thinking_dir: str | Path | None = None,
                  base_dir: str | Path | None = None) -> dict:
    """Accuracies of ``weights/thinking`` and ``weights/base`` (or of `thinking_dir` / `base_dir`) on the first
    ``n`` problems of ``split``."""
    dirs = model_dirs(weights, thinking_dir, base_dir)
    problems = make_splits(seed=seed, n_train=0)[split]
    problems = problems[:n] if n else problems
    t0 = time.time()
    thinking, tok = load(dirs["thinking"])
    base, btok = load(dirs["base"])
    out = {
        "split": split,
        "n": len(problems),
        "thinking": evaluate_thinking(thinking, tok, problems, batch_size=batch_size),
        "base": evaluate_base(base, btok, problems, batch_size=batch_size),
        "base_forced_plan": evaluate_base(base, btok, problems, prefix=FORCED_PREFIX, batch_size=batch_size),
    }
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv=None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(WEIGHTS_DIR))
    ap.add_argument("--thinking", default=None, help="the thinking model's folder (default: WEIGHTS/thinking)")
    ap.add_argument("--base", default=None, help="the base model's folder (default: WEIGHTS/base)")
    ap.add_argument("--n", type=int, default=None, help="number of problems (default: the whole split)")
    ap.add_argument("--split", default="test", choices=["train", "val", "test"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--metrics-out", default=None, help="also write a metrics.json summary here")
    ap.add_argument("--train-log", default=None, help="train_log.json of the run (seed, steps, train time)")
    args = ap.parse_args(argv)
    for kind, d in model_dirs(args.weights, args.thinking, args.base).items():
        if not (d / "config.json").is_file():  # one line, not the hub client's traceback about repo ids
            raise SystemExit(f"error: {d} holds no {kind} model (no config.json): pass --weights DIR with thinking/ "
                             f"and base/ in it, or --{kind} DIR")
    torch.set_num_threads(args.threads)
    res = evaluate_pair(args.weights, args.n, args.split, batch_size=args.batch_size, thinking_dir=args.thinking,
                        base_dir=args.base)
    print(json.dumps(res, indent=1))
    if args.metrics_out:
        write_metrics(res, args.metrics_out, args.train_log)
    return res


def write_metrics(res: dict, path: str | Path, train_log: str | Path | None = None) -> dict:
    """A compact ``metrics.json``: the three accuracies (and their details), plus the training run's facts."""
    metrics = {
        "split": res["split"],
        "n": res["n"],
        "decoding": "greedy",
        "thinking": round(res["thinking"]["accuracy"], 4),
        "base": round(res["base"]["accuracy"], 4),
        "base_forced_plan": round(res["base_forced_plan"]["accuracy"], 4),
        "details": {k: res[k] for k in ("thinking", "base", "base_forced_plan")},
    }
    if train_log:
        log = json.loads(Path(train_log).read_text())
        metrics["training"] = {
            "seed": log["seed"],
            "threads": log["threads"],
            "command": log.get("command"),
            "models": {
                kind: {
                    "steps": m["config"]["steps"],
                    "train_seconds": round(m["train_seconds"], 1),
                    "final_loss_ema": round(m["final_loss_ema"], 4),
                }
                for kind, m in log["models"].items()
            },
            "total_train_seconds": round(sum(m["train_seconds"] for m in log["models"].values()), 1),
        }
    Path(path).write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


if __name__ == "__main__":
    main()
