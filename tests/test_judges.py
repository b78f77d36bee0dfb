"""Judges: the openai backend against a real loopback HTTP server with scripted replies; the HF backend on the tiny
local model (garbage replies must be counted as failures); reply parsing."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sae_reasoning.errors import UserError
from sae_reasoning.judges import (Ask, HFJudge, Label, OfflineLabeller, OpenAIJudge, extract_json, make_labeller,
                                  membership_ask, parse_label, parse_list)

KEY_ENV = "SAE_REASONING_TEST_KEY"
VALID = json.dumps({"title": "Checking a result", "description": "Re-computes a step to verify it."})


class FakeOpenAI:
    """`POST /v1/chat/completions` on 127.0.0.1:<free port>. The reply is scripted by the `CASE=<name>` marker in
    the last message and by how often that exact request was seen (so retries can get a different answer)."""

    def __init__(self, delay_s: float = 0.0, reject_response_format: bool = False):
        self.requests: list[dict] = []
        self.seen: dict[str, int] = {}
        self.in_flight = self.max_in_flight = 0
        self.delay_s, self.reject_response_format = delay_s, reject_response_format
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def script(self, body: dict, nth: int) -> tuple[int, dict, str, float]:
        """(status, headers, assistant content or error body, delay) for the nth time this request is seen."""
        text = body["messages"][-1]["content"]
        case = m.group(1) if (m := re.search(r"CASE=([\w-]+)", text)) else "valid"
        if self.reject_response_format and "response_format" in body:
            return 400, {}, "response_format is not supported", 0
        if case == "malformed":
            return 200, {}, '{"title": "unterminated', 0
        if case == "wrong-schema":
            return 200, {}, json.dumps({"name": "no title key"}), 0
        if case == "500-then-ok" and nth == 0:
            return 500, {}, "boom", 0
        if case.startswith("429") and nth == 0:
            return 429, {"Retry-After": case.split("-")[1]}, "slow down", 0
        if case == "slow":
            return 200, {}, VALID, 1.0
        if case == "unauthorised":
            return 401, {}, "bad key", 0
        if case == "membership":
            n = len(re.findall(r"^\d+\. ", text, re.M))
            return 200, {}, json.dumps({"decisions": [True] * n}), 0
        return 200, {}, f"```json\n{VALID}\n```" if case == "fenced" else VALID, 0

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = json.dumps(body["messages"], sort_keys=True)
                with fake.lock:
                    fake.requests.append(body)
                    nth = fake.seen.get(key, 0)
                    fake.seen[key] = nth + 1
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                counted = True
                try:
                    status, headers, content, delay = fake.script(body, nth)
                    time.sleep(max(delay, fake.delay_s))
                    # the request leaves the count BEFORE its response is sent: once the client has the response it
                    # may send its next request at once, which the count must not see overlap with this one
                    with fake.lock:
                        fake.in_flight -= 1
                        counted = False
                    if status == 200:
                        payload = {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": content}}]}
                    else:
                        payload = {"error": {"message": content, "type": "test", "code": status}}
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass
                finally:
                    if counted:
                        with fake.lock:
                            fake.in_flight -= 1

        return Handler


@pytest.fixture
def server():
    s = FakeOpenAI()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")


def judge_for(server, tmp_path=None, sleeps=None, **kw) -> OpenAIJudge:
    kw = {"max_retries": 2, "timeout_s": 0.4, "max_concurrency": 4, "backoff_s": 0.01, **kw}
    return OpenAIJudge("fake-model", base_url=server.base_url, api_key_env=KEY_ENV,
                       cache_dir=None if tmp_path is None else tmp_path / "cache",
                       sleep=(sleeps.append if sleeps is not None else time.sleep), **kw)


def ask(case: str) -> Ask:
    return Ask([{"role": "system", "content": "Reply in JSON."}, {"role": "user", "content": f"CASE={case}"}],
               parse_label)


def test_valid_reply_is_parsed_with_structured_output(server):
    judge = judge_for(server)
    assert judge.ask(ask("valid")) == json.loads(VALID)
    assert judge.ask(ask("fenced")) == json.loads(VALID)
    assert len(server.requests) == 2
    assert server.requests[0]["response_format"] == {"type": "json_object"}
    assert judge.stats() == {"calls": 2, "cache_hits": 0, "retries": 0, "failures": 0, "parse_errors": 0}


@pytest.mark.parametrize("case", ["malformed", "wrong-schema"])
def test_invalid_reply_is_retried_then_counted_as_failure(server, case):
    judge = judge_for(server, max_retries=2)
    assert judge.ask(ask(case)) is None
    assert len(server.requests) == 3  # 1 + max_retries
    s = judge.stats()
    assert (s["calls"], s["retries"], s["failures"], s["parse_errors"]) == (3, 2, 1, 3)
    assert "invalid reply" in judge.last_errors[-1]


def test_server_error_is_retried_with_backoff(server):
    sleeps: list[float] = []
    judge = judge_for(server, sleeps=sleeps)
    assert judge.ask(ask("500-then-ok")) == json.loads(VALID)
    assert len(server.requests) == 2
    assert sleeps == [pytest.approx(0.01)]
    assert judge.stats()["retries"] == 1 and judge.stats()["failures"] == 0


def test_retry_after_is_honoured_and_capped(server):
    sleeps: list[float] = []
    judge = judge_for(server, sleeps=sleeps, retry_after_cap_s=5.0)
    assert judge.ask(ask("429-2")) == json.loads(VALID)
    assert judge.ask(ask("429-1000")) == json.loads(VALID)
    assert sleeps == [2.0, 5.0]
    assert len(server.requests) == 4


def test_slow_reply_times_out_and_counts_as_failure(server):
    judge = judge_for(server, max_retries=1, timeout_s=0.3)
    t0 = time.perf_counter()
    assert judge.ask(ask("slow")) is None
    assert time.perf_counter() - t0 < 1.8  # two attempts cut at 0.3 s, not two full 1 s replies
    assert len(server.requests) == 2
    assert judge.stats()["failures"] == 1 and "timeout" in judge.last_errors[-1]


def test_cache_makes_a_rerun_free_and_keeps_failures_out(server, tmp_path):
    asks = [ask("valid"), ask("fenced"), ask("malformed")]
    first = judge_for(server, tmp_path, max_retries=0).ask_many(asks)
    assert first[2] is None and len(server.requests) == 3
    again = judge_for(server, tmp_path, max_retries=0)
    assert again.ask_many(asks) == first
    assert len(server.requests) == 4  # only the failure is asked again
    assert again.stats()["cache_hits"] == 2 and again.stats()["calls"] == 1


def test_concurrency_is_bounded():
    slow = FakeOpenAI(delay_s=0.1)
    try:
        judge = judge_for(slow, max_concurrency=3)
        asks = [Ask([{"role": "user", "content": f"CASE=valid {i}"}], parse_label) for i in range(9)]
        assert all(r is not None for r in judge.ask_many(asks))
        assert len(slow.requests) == 9
        assert slow.max_in_flight == 3
    finally:
        slow.close()


def test_server_without_response_format_falls_back_to_prompt_json():
    s = FakeOpenAI(reject_response_format=True)
    try:
        judge = judge_for(s)
        assert judge.ask(ask("valid")) == json.loads(VALID)
        assert judge.ask(ask("fenced")) == json.loads(VALID)
        assert ["response_format" in r for r in s.requests] == [True, False, False]
        assert judge.json_mode is False and judge.stats()["failures"] == 0
    finally:
        s.close()


def test_rejected_key_and_missing_key_are_user_errors(server, monkeypatch):
    with pytest.raises(UserError, match=KEY_ENV):
        judge_for(server).ask(ask("unauthorised"))
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(UserError, match=KEY_ENV):
        judge_for(server)


def test_llm_labels_repeat_and_merge(server, tmp_path):
    from sae_reasoning.interpret import LatentMembers

    members = [LatentMembers(0, 3, 0.5, ["Check: 1 + 2 = 3.", "Check: 2 + 2 = 4.", "Check: 5 + 1 = 6."],
                             [3.0, 2.0, 1.0], [0, 1, 2], 3),
               LatentMembers(1, 0, 0.0, [], [], [], 0),
               LatentMembers(2, 2, 0.5, ["CASE=malformed", "CASE=malformed too"], [1.0, 1.0], [3, 4], 2)]
    judge = judge_for(server, tmp_path, n_repeats=3, max_retries=0)
    labels = judge.label(members)
    assert [lab.source for lab in labels] == ["llm", "empty", "offline-fallback"]
    assert labels[0].title == "Checking a result" and labels[0].titles == ["Checking a result"] * 3
    assert labels[2].n_failed == 3
    assert len(server.requests) == 6  # 3 repeats x 2 live latents; repeats shuffle the sentences


def test_membership_question_round_trip(server):
    lab = Label(0, "CASE=membership", "verification")
    reply = judge_for(server).ask(membership_ask(lab, ["a b c", "d e f", "g h i"]))
    assert reply == [True, True, True]


def test_parsers():
    assert extract_json('<think>{"x": 1}</think> sure: {"title": "t"}') == {"title": "t"}
    assert parse_label('{"title": " A  B ", "description": "d", "excludes": "e"}') == {
        "title": "A B", "description": "d Excludes: e"}
    for bad in ["no json", "[1, 2]", '{"title": ""}', '{"title": 3, "description": "d"}']:
        with pytest.raises(ValueError):
            parse_label(bad)
    scores = parse_list("scores", 2, "score")
    assert scores('{"scores": [0, 9.5]}') == [0.0, 9.5]
    for bad in ['{"scores": [1]}', '{"scores": [1, 11]}', '{"scores": [true, 1]}']:
        with pytest.raises(ValueError):
            scores(bad)
    with pytest.raises(ValueError):
        parse_list("decisions", 1, "bool")('{"decisions": ["yes"]}')


def test_make_labeller(server):
    from sae_reasoning.config import JudgeConfig

    assert isinstance(make_labeller(JudgeConfig()), OfflineLabeller)
    judge = make_labeller(JudgeConfig(backend="openai", model="m", base_url=server.base_url, api_key_env=KEY_ENV,
                                      max_concurrency=2, max_retries=1))
    assert isinstance(judge, OpenAIJudge) and judge.max_concurrency == 2 and judge.max_retries == 1


def test_hf_judge_counts_garbage_as_failures(stories_path, tmp_path):
    from helpers import stories_with_chat_template

    path = stories_with_chat_template(stories_path, tmp_path / "stories")
    judge = HFJudge(str(path), max_new_tokens=12, max_retries=1, device="cpu", dtype="float32",
                    cache_dir=tmp_path / "cache")
    assert judge._lm is None  # lazily loaded
    replies = judge.ask_many([ask("valid"), membership_ask(Label(0, "t", "d"), ["Once upon a time."])])
    assert replies == [None, None]
    s = judge.stats()
    assert (s["calls"], s["retries"], s["failures"], s["parse_errors"]) == (4, 2, 2, 4)
    assert not list((tmp_path / "cache").rglob("*.json"))  # failures are never cached
