"""Trace generation: chat template, truncation flags, and resume after SIGKILL equals an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sae_reasoning.models import load_model, thinking_prompt
from sae_reasoning.traces import generate_traces, iter_traces

from conftest import REPO
from helpers import stories_with_chat_template, story_questions

N_QUESTIONS, BATCH, MAX_NEW = 24, 2, 48


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, stories_path):
    return stories_with_chat_template(stories_path, tmp_path_factory.mktemp("m") / "stories")


def test_traces_use_the_chat_template_and_flag_truncation(chat_model, tmp_path):
    lm = load_model(str(chat_model), dtype="float32", device="cpu")
    qs = story_questions(5)
    folder = generate_traces(lm, qs, tmp_path / "t", batch_size=2, max_new_tokens=12, progress=False)
    traces = list(iter_traces(folder))
    assert [t["id"] for t in traces] == [q.id for q in qs]
    for t, q in zip(traces, qs):
        assert t["prompt"] == thinking_prompt(lm.tokenizer, q.question) and t["prompt"].endswith("<think>\n")
        assert t["n_new_tokens"] == len(t["completion_ids"]) <= 12
        assert t["truncated"] == (lm.tokenizer.eos_token_id not in t["completion_ids"] and t["n_new_tokens"] == 12)
    # greedy: a second batch size gives the same first trace (same prompt, same model)
    again = generate_traces(lm, qs[:1], tmp_path / "t1", batch_size=1, max_new_tokens=12, progress=False)
    assert next(iter_traces(again))["completion_ids"] == traces[0]["completion_ids"]


SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from helpers import story_questions
from sae_reasoning.models import load_model
from sae_reasoning.traces import generate_traces
lm = load_model({model!r}, dtype="float32", device="cpu")
generate_traces(lm, story_questions({n}), sys.argv[1], batch_size={b}, max_new_tokens={m}, temperature=0.8,
                seed=3, progress=False)
"""


def test_killed_generation_resumes_to_the_same_traces(chat_model, tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests"), model=str(chat_model), n=N_QUESTIONS, b=BATCH,
                                    m=MAX_NEW))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run([sys.executable, str(script), str(clean)], check=True, env=env, timeout=300)

    kills = 0
    for target in (2, 5):  # kill twice, at different points
        proc = subprocess.Popen([sys.executable, str(script), str(killed)], env=env)
        deadline = time.monotonic() + 120
        while len(list(killed.glob("shard-*.jsonl"))) < target and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1, "generation finished before it could be killed; make it slower"
    assert not (killed / "meta.json").exists() or kills == 0
    subprocess.run([sys.executable, str(script), str(killed)], check=True, env=env, timeout=300)

    a, b = list(iter_traces(clean)), list(iter_traces(killed))
    assert len(b) == N_QUESTIONS and len({t["id"] for t in b}) == N_QUESTIONS  # nothing lost, nothing duplicated
    assert a == b  # sampled with per-batch seeds: identical, record for record


def test_shards_cut_with_another_batch_size_are_redone(tmp_path):
    """fill_shards (traces and eval generations): shard b holds batch b, so shards of another batch size would lose or
    repeat items; they are deleted and redone, while shards of the same settings are kept."""
    from sae_reasoning.artifacts import fill_shards, read_jsonl

    items = [f"q{i}" for i in range(7)]
    calls = []

    def make_lines(batch, b):
        calls.append((b, len(batch)))
        return [json.dumps({"item": x, "shard": b}) + "\n" for x in batch]

    def run(batch_size, stamp=None):
        paths = fill_shards(tmp_path / "s", items, batch_size, make_lines, stamp=stamp or {"k": 1}, desc="t",
                            progress=False)
        return [r["item"] for p in paths for r in read_jsonl(p)]

    assert run(2) == items and calls == [(0, 2), (1, 2), (2, 2), (3, 1)]
    (tmp_path / "s" / "shard-00001.jsonl").unlink()  # as if killed before shard 1 was written
    calls.clear()
    assert run(2) == items and calls == [(1, 2)]  # only the missing shard
    calls.clear()
    assert run(3) == items and calls == [(0, 3), (1, 3), (2, 1)]  # another batch size: all redone, none repeated
    calls.clear()
    assert run(3, {"k": 2}) == items and len(calls) == 3  # another stamp: redone
