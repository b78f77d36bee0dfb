"""An LLM judge as an optional second opinion on graded answers (issue 9; ``eval.second_opinion=true``).

math-verify (:mod:`sae_reasoning.grading`) is the decision of record: ``correct`` and every accuracy, CI and gap
recovered come from it alone. With ``eval.second_opinion=true``, eval.py also asks the configured judge (the
``judge`` group: backend, model, base_url, API key variable, timeouts, retries, concurrency, exactly as for latent
labels) whether each response's final answer is equivalent to the reference answer, and reports how often the two
graders agree, so that a grading problem (an extraction rule missing an answer format, a gold math-verify cannot
compare) shows up as a list of problem ids to read.

What the judge sees: the question, the reference answer and the end of the response (the text after the last
``</think>``, or the whole text if the thinking never closed; its last ``MAX_RESPONSE_CHARS`` characters). It
does not see math-verify's extracted answer, so it can catch extraction mistakes. It is asked for a strict
one-word verdict, ``{"verdict": "CORRECT"}`` or ``{"verdict": "INCORRECT"}`` (JSON, so that the openai backend's
structured-output mode works); :func:`parse_verdict` also accepts the bare word (any case, in markdown bold,
quotes or a code fence, after a ``<think>`` preamble, optionally after ``Verdict:``). Anything else (e.g. "The
answer is correct", which could hide a "not") is an invalid reply: retried, then a failure.

Per problem, each record gains ``judge_correct`` (True / False, or None when the judge failed) and
``judge_reply`` (the raw reply, first ``MAX_REPLY_CHARS`` characters). Verdicts are saved, successes only, in
``generations/<method>/judge.jsonl`` beside the generation shards, keyed by a hash of the exact request (judge
backend, model, parameters and messages): a rerun asks only for problems without a saved verdict (failures are
asked again), a different judge model or a regenerated response is asked afresh, and regenerated generations
(another configuration) take their verdicts with them. The file is rewritten atomically after every chunk of
requests, so an interrupted run keeps what it was told.

A judge outage never costs the generations or the math-verify results: a request that still fails after the
judge's bounded retries is a counted failure (verdict None); after ``OUTAGE_AFTER`` consecutive failures the
judge is taken to be down and the method's remaining problems are not asked (also verdict None, counted), so a
dead endpoint costs minutes, not hours. A rejected API key or an unknown model (HTTP 401/403/404) is a
configuration mistake and stops the run with one line, after every generation has been saved.

The offline judge (``judge=offline``, the default) labels latents with keywords and cannot read an answer; it is
refused for second opinions (one line at validation) rather than echoing math-verify, which would report a
meaningless 100% agreement.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from sae_reasoning.artifacts import atomic_write_text
from sae_reasoning.config import SECOND_OPINION_NEEDS_LLM
from sae_reasoning.data import Question
from sae_reasoning.errors import UserError
from sae_reasoning.grading import answer_part
from sae_reasoning.judges import Ask, LLMJudge, extract_json, make_labeller

SIDECAR = "judge.jsonl"
MAX_QUESTION_CHARS = 3000
MAX_RESPONSE_CHARS = 3000
MAX_REPLY_CHARS = 200
OUTAGE_AFTER = 32  # consecutive failed problems: the judge is down, the rest of the method is not asked
SYSTEM = ("You check the final answers of a model to math problems against reference answers. "
          "Answer with one JSON object and nothing else.")
OFFLINE_REFUSED = SECOND_OPINION_NEEDS_LLM  # validate() refuses the same configuration with the same line


# ------------------------------------------------------------------------------------------------ request / reply


def response_tail(text: str, max_chars: int = MAX_RESPONSE_CHARS) -> str:
    """The part of a response that holds its final answer: after the last </think>, its last `max_chars`."""
    part = answer_part(text if isinstance(text, str) else "").strip()
    return part if len(part) <= max_chars else "[...] " + part[-max_chars:]


def verdict_ask(question: str, response: str, gold: str) -> Ask:
    """One request: is the final answer of `response` equivalent to `gold`? Parsed by `parse_verdict`."""
    q = " ".join(str(question).split())
    q = q if len(q) <= MAX_QUESTION_CHARS else q[:MAX_QUESTION_CHARS] + " [...]"
    user = (f"Problem:\n{q}\n\nReference answer: {gold}\n\nEnd of the model's response:\n<<<\n"
            f"{response_tail(response)}\n>>>\n\nIs the final answer of the response mathematically equivalent to the "
            "reference answer? Judge only the final answer, not the working; ignore formatting, units and equivalent "
            "notation (0.5 = 1/2). A response without a final answer, or with several different final answers, is "
            "INCORRECT. Reply as JSON: {\"verdict\": \"CORRECT\"} or {\"verdict\": \"INCORRECT\"}.")
    return Ask([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}], parse_verdict)


# The whole (post-JSON) reply must be one of the two words, give or take markup and a "Verdict:" prefix.
_WORD = re.compile(r"[\s*_`\"'>#]*(?:verdict\s*[:=\-]?[\s*_`\"']*)?(CORRECT|INCORRECT)[\s*_`\"'.!]*",
                   re.IGNORECASE)


def parse_verdict(raw: str) -> dict:
    """``{"correct": bool, "reply": raw[:MAX_REPLY_CHARS]}``; ValueError unless the reply is a strict verdict."""
    if not isinstance(raw, str):
        raise ValueError("reply is not text")
    text = raw.split("</think>")[-1]
    if "{" in text:
        word = extract_json(text).get("verdict")
        if not isinstance(word, str):
            raise ValueError('reply needs "verdict": "CORRECT" or "INCORRECT"')
    else:
        word = text
    m = _WORD.fullmatch(word.strip())
    if not m:
        raise ValueError(f"verdict {word.strip()[:60]!r} is neither CORRECT nor INCORRECT")
    return {"correct": m.group(1).upper() == "CORRECT", "reply": raw[:MAX_REPLY_CHARS]}


# ------------------------------------------------------------------------------------------------ the judge


def make_answer_judge(judge_cfg: Any, cache_dir: str | Path | None = None, seed: int = 0) -> LLMJudge:
    """The LLM judge a `JudgeConfig` names (the same client as for latent labels); the offline one is refused."""
    if judge_cfg.backend == "offline":
        raise UserError(OFFLINE_REFUSED)
    judge = make_labeller(judge_cfg, cache_dir=cache_dir, seed=seed)
    assert isinstance(judge, LLMJudge)
    return judge


def judge_name(judge: LLMJudge) -> str:
    return f"{judge.backend}:{judge.model}"


def _read_saved(path: Path) -> dict[str, dict]:
    saved: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                saved[str(entry["id"])] = entry
            except (ValueError, KeyError, TypeError):
                continue  # the file is written atomically; a bad line is someone's edit, not ours to trust
    return saved


def judge_records(records: list[dict], questions: Sequence[Question], judge: LLMJudge, path: str | Path, *,
                  chunk_size: int | None = None, outage_after: int = OUTAGE_AFTER, desc: str = "") -> dict[str, int]:
    """Add ``judge_correct`` / ``judge_reply`` to every record (in place), asking only for problems without a
    saved verdict in `path`. Returns counts: reused, asked, failed (asked, no verdict), skipped (not asked after an
    outage). Never raises for a failing judge (only for a configuration mistake, as `LLMJudge.ask`)."""
    path = Path(path)
    by_id = {q.id: q for q in questions}
    asks = {r["id"]: verdict_ask(by_id[r["id"]].question, r["completion"], by_id[r["id"]].gold) for r in records}
    keys = {i: judge.cache_key(a.messages) for i, a in asks.items()}
    saved = {i: e for i, e in _read_saved(path).items() if keys.get(i) == e.get("key")}
    todo = [r["id"] for r in records if r["id"] not in saved]
    counts = {"reused": len(records) - len(todo), "asked": 0, "failed": 0, "skipped": 0}
    chunk = chunk_size or max(4 * judge.max_concurrency, 16)
    streak = 0
    for start in range(0, len(todo), chunk):
        if streak >= outage_after:
            counts["skipped"] = len(todo) - start
            last = judge.last_errors[-1] if judge.last_errors else "unknown"
            print(f"second opinion{' for ' + desc if desc else ''}: the judge looks down ({streak} failures in a row; "
                  f"last error: {last}); {counts['skipped']} problems left without a verdict - rerun the same "
                  "command to ask again")
            break
        ids = todo[start:start + chunk]
        replies = judge.ask_many([asks[i] for i in ids])
        for i, reply in zip(ids, replies):
            counts["asked"] += 1
            if reply is None:
                counts["failed"] += 1
                streak += 1
                continue
            streak = 0
            saved[i] = {"id": i, "key": keys[i], "judge_correct": bool(reply["correct"]), "judge_reply": reply["reply"]}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(saved[r["id"]], ensure_ascii=False) + "\n" for r in records
                                        if r["id"] in saved))
    for r in records:
        entry = saved.get(r["id"])
        r["judge_correct"] = None if entry is None else entry["judge_correct"]
        r["judge_reply"] = None if entry is None else entry["judge_reply"]
    return counts


# ------------------------------------------------------------------------------------------------ summary


def summarise_second_opinion(records: Sequence[dict]) -> dict[str, Any]:
    """The judge against math-verify, over the problems the judge answered (verdict not None)."""
    answered = [r for r in records if r.get("judge_correct") is not None]
    judge_yes = [bool(r["judge_correct"]) for r in answered]
    verify_yes = [bool(r["correct"]) for r in answered]
    n = len(answered)
    pairs = list(zip(judge_yes, verify_yes))
    return {
        "n_answered": n,
        "failures": len(records) - n,
        "accuracy": sum(judge_yes) / n if n else None,  # the judge's, over answered problems
        "accuracy_math_verify": sum(verify_yes) / n if n else None,  # math-verify's, on the same problems
        "agreement": sum(j == v for j, v in pairs) / n if n else None,
        "judge_only_correct": sum(j and not v for j, v in pairs),
        "math_verify_only_correct": sum(v and not j for j, v in pairs),
        "disagreements": [r["id"] for r, j, v in zip(answered, judge_yes, verify_yes) if j != v],
    }


def format_second_opinion(summary: dict[str, Any]) -> str:
    """Lines for eval.py's printout: one per method that has a second opinion ('' when none has)."""
    rows = [(m, s["second_opinion"]) for m, s in summary.items() if s.get("second_opinion")]
    if not rows:
        return ""
    judge = rows[0][1].get("judge", "the judge")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"second opinion ({judge}; math-verify stays the decision of record):",
             f"{'method':<18}{'judge acc.':>11}{'agreement':>11}{'answered':>10}{'failures':>10}  disagreements"]
    for m, so in rows:
        ids = so["disagreements"]
        shown = ", ".join(map(str, ids[:5])) + (f" (+{len(ids) - 5})" if len(ids) > 5 else "")
        lines.append(f"{m:<18}{fmt(so['accuracy']):>11}{fmt(so['agreement']):>11}{so['n_answered']:>10}"
                     f"{so['failures']:>10}  {shown or '-'}")
    return "\n".join(lines)
