"""eval.second_opinion: the LLM judge beside math-verify, against the real loopback HTTP server of test_judges.py.

The server answers scripted verdicts for known (response, reference) pairs (a `CASE=<name>` marker in the response
picks the reply) and faults (timeout, 5xx, malformed JSON, 429, a hedged reply); the expected verdicts, agreements
and failures are written out by hand below and counted with plain loops, independently of the code under test.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import time

import pytest

from sae_reasoning import pipeline
from sae_reasoning.answer_judge import (MAX_REPLY_CHARS, SIDECAR, judge_records, make_answer_judge, parse_verdict,
                                        verdict_ask)
from sae_reasoning.cli import compose_config
from sae_reasoning.config import JudgeConfig, validate
from sae_reasoning.data import Question
from sae_reasoning.errors import ConfigError, UserError
from sae_reasoning.evaluate import grade_records, summarise
from sae_reasoning.judges import OpenAIJudge

from conftest import SHARED_DATA
from helpers import stories_with_chat_template
from test_judges import KEY_ENV, FakeOpenAI, api_key  # noqa: F401 - api_key: the autouse key fixture

GOLD = "18"
LONG = "I am certain: " + "x" * 400 + " CORRECT"  # ends with the word, but is not a one-word verdict

# case -> (boxed answer in the response, the server's reply, the verdict it means: True / False / None = a fault)
CASES = {
    "json-yes": ("18", '{"verdict": "CORRECT"}', True),
    "json-no": ("18", '{"verdict": "INCORRECT"}', False),  # the judge disagrees: math-verify says correct
    "word-yes": ("17", "CORRECT", True),  # the judge disagrees: math-verify says wrong
    "word-no": ("17", "incorrect.", False),
    "bold-yes": ("18.0", "**Verdict: CORRECT**", True),
    "think-no": ("17", "<think>The response says 17 but the reference is 18.</think>\nINCORRECT", False),
    "fenced-yes": ("\\frac{36}{2}", '```json\n{"verdict": "correct"}\n```', True),
    "500-then-ok": ("18", "CORRECT", True),  # a transient 5xx: retried, then answered
    "slow": ("18", "CORRECT", None),  # every attempt times out
    "500": ("18", "server error", None),
    "malformed": ("18", '{"verdict": "CORR', None),
    "429": ("17", "slow down", None),
    "hedge": ("17", "The answer is correct", None),  # not a strict verdict: invalid, retried, a failure
}
MATH_VERIFY = {case: boxed in ("18", "18.0", "\\frac{36}{2}") for case, (boxed, _, _) in CASES.items()}
MAX_RETRIES = 1
UNMARKED = ('{"verdict": "CORRECT"}', '{"verdict": "INCORRECT"}')


class VerdictServer(FakeOpenAI):
    """FakeOpenAI with verdict replies. `healed=True` turns every fault into a CORRECT verdict."""

    healed = False

    def script(self, body: dict, nth: int) -> tuple[int, dict, str, float]:
        text = body["messages"][-1]["content"]
        m = re.search(r"CASE=([\w-]+)", text)
        case = m.group(1) if m else "none"
        if case not in CASES:  # an unmarked response (the eval stage's): a verdict fixed by the request's length
            return 200, {}, UNMARKED[len(text) % 2], 0
        reply = CASES[case][1]
        if self.healed and CASES[case][2] is None:
            return 200, {}, "CORRECT", 0
        if case == "slow":
            return 200, {}, reply, 1.0
        if case == "500" or (case == "500-then-ok" and nth == 0):
            return 500, {}, reply, 0
        if case == "429":
            return 429, {"Retry-After": "0"}, reply, 0
        return 200, {}, reply, 0


@pytest.fixture
def server():
    s = VerdictServer()
    yield s
    s.close()


def judge_for(server, model="fake-model", **kw) -> OpenAIJudge:
    """No reply cache: every saved verdict a rerun reuses comes from the run folder's judge.jsonl."""
    kw = {"max_retries": MAX_RETRIES, "timeout_s": 0.3, "max_concurrency": 4, "backoff_s": 0.0, **kw}
    return OpenAIJudge(model, base_url=server.base_url, api_key_env=KEY_ENV, cache_dir=None, sleep=lambda s: None,
                       **kw)


def problems() -> tuple[list[Question], list[dict]]:
    questions, records = [], []
    for i, (case, (boxed, _, _)) in enumerate(CASES.items()):
        questions.append(Question(id=f"q{i}", question=f"Problem {i}: what is 3 * 6?", gold=GOLD, kind="number"))
        completion = f"<think>Three sixes. Maybe 17?</think> Checked (CASE={case}). The answer is \\boxed{{{boxed}}}."
        records.append({"id": f"q{i}", "completion": completion, "n_new_tokens": 20 + i, "truncated": False})
    return questions, grade_records(records, questions)


def case_of(record: dict) -> str:
    return re.search(r"CASE=([\w-]+)", record["completion"]).group(1)


def test_verdicts_are_parsed_saved_and_summarised(server, tmp_path):
    questions, records = problems()
    assert [r["correct"] for r in records] == [MATH_VERIFY[case_of(r)] for r in records]  # the grading under test
    path = tmp_path / "generations" / "base" / SIDECAR
    t0 = time.perf_counter()
    counts = judge_records(records, questions, judge_for(server), path, chunk_size=5)
    assert time.perf_counter() - t0 < 5  # the slow case is cut by the 0.3 s timeout
    n_faults = sum(v is None for _, _, v in CASES.values())
    assert counts == {"reused": 0, "asked": len(CASES), "failed": n_faults, "skipped": 0}

    # per record: the verdict, the raw reply, and math-verify's decision untouched
    for r in records:
        case = case_of(r)
        assert r["judge_correct"] == CASES[case][2], case
        assert r["judge_reply"] == (None if CASES[case][2] is None else CASES[case][1][:MAX_REPLY_CHARS]), case
        assert r["correct"] == MATH_VERIFY[case]

    # the server saw each request 1 + max_retries times when it failed, twice for the transient 5xx, once otherwise
    hits = {}
    for body in server.requests:
        case = re.search(r"CASE=([\w-]+)", body["messages"][-1]["content"]).group(1)
        hits[case] = hits.get(case, 0) + 1
    assert hits == {case: 1 + MAX_RETRIES if v is None or case == "500-then-ok" else 1
                    for case, (_, _, v) in CASES.items()}

    # saved per problem: successes only, in problem order
    saved = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["id"] for e in saved] == [r["id"] for r in records if CASES[case_of(r)][2] is not None]

    # the summary against an independent count; math-verify stays the accuracy of record
    s = summarise({"base": records}, n_boot=50)["base"]
    assert s["accuracy"] == sum(MATH_VERIFY.values()) / len(CASES)
    answered = [(v, MATH_VERIFY[c]) for c, (_, _, v) in CASES.items() if v is not None]
    agree = 0
    for judge_says, verify_says in answered:
        if judge_says == verify_says:
            agree += 1
    so = s["second_opinion"]
    assert so["n_answered"] == len(answered) == 8 and so["failures"] == n_faults == 5
    assert so["agreement"] == agree / len(answered) == 6 / 8
    assert so["accuracy"] == sum(v for v, _ in answered) / len(answered)
    assert so["accuracy_math_verify"] == sum(m for _, m in answered) / len(answered)
    assert so["disagreements"] == ["q1", "q2"]  # json-no (verify correct), word-yes (verify wrong)
    assert (so["judge_only_correct"], so["math_verify_only_correct"]) == (1, 1)


def test_a_rerun_asks_only_for_problems_without_a_verdict(server, tmp_path):
    questions, records = problems()
    path = tmp_path / SIDECAR
    judge_records(copy.deepcopy(records), questions, judge_for(server), path)
    first = len(server.requests)

    again = copy.deepcopy(records)
    judge = judge_for(server)
    counts = judge_records(again, questions, judge, path)
    n_faults = sum(v is None for _, _, v in CASES.values())
    assert counts == {"reused": len(CASES) - n_faults, "asked": n_faults, "failed": n_faults, "skipped": 0}
    assert len(server.requests) - first == n_faults * (1 + MAX_RETRIES)  # only the failures are asked again
    assert [r["judge_correct"] for r in again] == [CASES[case_of(r)][2] for r in again]

    server.healed = True  # the judge is back: the failures get verdicts, nothing else is asked
    before = len(server.requests)
    healed = copy.deepcopy(records)
    assert judge_records(healed, questions, judge_for(server), path)["asked"] == n_faults
    assert len(server.requests) - before == n_faults
    assert all(r["judge_correct"] is not None for r in healed)

    before = len(server.requests)
    judge = judge_for(server)
    done = copy.deepcopy(records)
    assert judge_records(done, questions, judge, path)["reused"] == len(CASES)
    assert len(server.requests) == before and judge.stats()["calls"] == 0
    assert [r["judge_correct"] for r in done] == [r["judge_correct"] for r in healed]

    # a changed response, or another judge model, is a different request: asked afresh (the file keeps the
    # verdicts of the latest run's requests; the pipeline's reply cache makes switching back free)
    changed = copy.deepcopy(records)
    changed[0]["completion"] += " Or 19."
    assert judge_records(changed, questions, judge_for(server), path)["asked"] == 1
    assert len(server.requests) == before + 1
    assert judge_records(copy.deepcopy(records), questions, judge_for(server, model="other-model"),
                         path)["asked"] == len(CASES)
    assert len(server.requests) == before + 1 + len(CASES)


def test_an_outage_is_counted_and_stops_asking(tmp_path):
    down = VerdictServer()
    down.close()  # nothing listens on the port any more: connection refused
    questions, records = problems()
    records = [dict(r, id=f"{r['id']}-{k}") for k in range(3) for r in records]
    questions = [Question(r["id"], "What is 3 * 6?", GOLD, "number") for r in records]
    kept = copy.deepcopy(records)
    judge = judge_for(down)
    counts = judge_records(records, questions, judge, tmp_path / SIDECAR, chunk_size=4, outage_after=4)
    assert counts == {"reused": 0, "asked": 4, "failed": 4, "skipped": len(records) - 4}
    assert judge.stats()["calls"] == 4 * (1 + MAX_RETRIES) and judge.stats()["failures"] == 4
    assert all(r["judge_correct"] is None and r["judge_reply"] is None for r in records)
    assert [{k: r[k] for k in kept[0]} for r in records] == kept  # generations and grades untouched
    so = summarise({"base": records}, n_boot=20)["base"]["second_opinion"]
    assert so["failures"] == len(records) and so["n_answered"] == 0
    assert so["agreement"] is None and so["accuracy"] is None and so["disagreements"] == []
    assert not (tmp_path / SIDECAR).read_text()


def test_parse_verdict_is_strict():
    for raw, verdict in [('{"verdict": "CORRECT"}', True), ('{"verdict": "incorrect"}', False), ("CORRECT", True),
                         ("Incorrect.", False), ("**INCORRECT**", False), ("Verdict: correct", True),
                         ("`CORRECT`", True), ('<think>is 0.5 = 1/2? yes</think>\n\nCORRECT\n', True),
                         ('```json\n{"verdict": "INCORRECT"}\n```', False), ('"CORRECT"', True)]:
        assert parse_verdict(raw) == {"correct": verdict, "reply": raw}, raw
    for raw in ["The answer is correct", "NOT CORRECT", "CORRECT or INCORRECT", "", "yes", '{"verdict": true}',
                '{"answer": "CORRECT"}', '{"verdict": "CORR', "INCORRECTLY", LONG]:
        with pytest.raises(ValueError):
            parse_verdict(raw)
    assert parse_verdict("CORRECT" + " " * 500)["reply"] == ("CORRECT" + " " * 500)[:MAX_REPLY_CHARS]


def test_the_judge_sees_the_final_answer_part_not_the_thinking():
    text = "<think>" + "maybe 17. " * 1000 + "</think>" + "So " * 2000 + "the answer is \\boxed{18}."
    user = verdict_ask("What is 3 * 6?", text, "18").messages[-1]["content"]
    assert "Reference answer: 18" in user and "What is 3 * 6?" in user and "maybe 17" not in user
    assert "\\boxed{18}.\n>>>" in user and "[...]" in user and len(user) < 4500
    assert '{"verdict": "CORRECT"}' in user and "JSON" in user  # the openai backend's JSON mode needs the word


def test_off_by_default_and_the_offline_judge_is_refused(server):
    assert compose_config([]).eval.second_opinion is False
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["eval.second_opinion=true"]))
    assert "\n" not in str(info.value) and "judge=openai" in str(info.value)
    validate(compose_config(["eval.second_opinion=true", "judge=openai"]))
    with pytest.raises(UserError, match="judge=openai"):
        make_answer_judge(JudgeConfig())
    judge = make_answer_judge(JudgeConfig(backend="openai", model="m", base_url=server.base_url, api_key_env=KEY_ENV,
                                          max_retries=0, max_concurrency=2))
    assert isinstance(judge, OpenAIJudge) and judge.max_retries == 0 and judge.max_concurrency == 2


def test_eval_stage_saves_the_second_opinion_and_resumes_without_asking(server, tmp_path, stories_path):
    model = stories_with_chat_template(stories_path, tmp_path / "stories")
    cache = tmp_path / "cache"
    args = [f"model.thinking.path={model}", f"model.base.path={model}", "model.n_layers=5", "model.sae_layers=[1]",
            "model.steering_layer=2", "data=gsm8k", f"data.source={SHARED_DATA / 'gsm8k' / 'test.jsonl'}",
            "eval.methods=[base,thinking]", "eval.limit=4", "eval.batch_size=2", "eval.max_new_tokens=6",
            "eval.n_bootstrap=20", "progress=false", "wandb=disabled", f"cache_dir={cache}", "judge=openai",
            "judge.model=fake-model", f"judge.base_url={server.base_url}", f"judge.api_key_env={KEY_ENV}",
            "judge.max_retries=0", "eval.second_opinion=true"]
    cfg = compose_config(args)
    validate(cfg)
    run = tmp_path / "run"
    pipeline.evaluate(cfg, run)
    assert len(server.requests) == 8  # 4 problems x 2 methods
    results = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert len(results) == 8 and all(r["judge_reply"] in UNMARKED for r in results)
    assert all(r["judge_correct"] == (r["judge_reply"] == UNMARKED[0]) for r in results)
    assert {r["judge_correct"] for r in results} == {True, False}  # so that some problems disagree
    summary = json.loads((run / "summary.json").read_text())
    for method in ("base", "thinking"):
        so = summary[method]["second_opinion"]
        rows = [r for r in results if r["method"] == method]
        assert so["judge"] == "openai:fake-model" and so["n_answered"] == 4 and so["failures"] == 0
        assert so["agreement"] == sum(r["judge_correct"] == r["correct"] for r in rows) / 4
        assert so["disagreements"] == [r["id"] for r in rows if r["judge_correct"] != r["correct"]]
        assert summary[method]["accuracy"] == sum(r["correct"] for r in rows) / 4  # math-verify's, never the judge's
        assert len((run / "generations" / method / SIDECAR).read_text().splitlines()) == 4

    shutil.rmtree(cache / "judge")  # no reply cache to fall back on: the run folder's verdicts must be enough
    pipeline.evaluate(compose_config(args), run)
    assert len(server.requests) == 8
    assert json.loads((run / "summary.json").read_text()) == summary
