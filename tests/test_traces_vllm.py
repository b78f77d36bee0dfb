"""The vLLM trace backend (`data.backend=vllm`): same traces as the Hugging Face backend, generated in a child
process that ends before the pipeline loads the HF model, with what vLLM is told checked.

vLLM itself needs a CUDA GPU, so these tests put `tests/stand_ins/vllm` first on the path: a stand-in that keeps
vLLM's names and semantics for what the backend calls and generates with the HF model of the same folder (its
docstring says exactly what it mimics). Everything else (config, child process, prompts, shards, records,
pipeline order) is the real code.
"""

import json
import os

import pytest

from sae_reasoning import pipeline
from sae_reasoning.artifacts import read_jsonl
from sae_reasoning.cli import compose_config
from sae_reasoning.config import validate
from sae_reasoning.data import load_questions
from sae_reasoning.errors import UserError
from sae_reasoning.models import load_model, thinking_prompt
from sae_reasoning.traces import generate_traces, iter_traces
from sae_reasoning.traces_vllm import generate_traces_vllm

from conftest import REPO, SHARED_DATA
from helpers import stories_with_chat_template

STAND_INS = REPO / "tests" / "stand_ins"
N_QUESTIONS, BATCH, MAX_NEW = 6, 4, 20


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, stories_path):
    """stories260K with a chat template and "." as its eos: it never writes its own eos within a few hundred
    tokens, but it ends a sentence after 18-23 tokens on these prompts, so traces of both kinds of end exist."""
    model = stories_with_chat_template(stories_path, tmp_path_factory.mktemp("m") / "stories")
    dot = json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]["."]
    for name, key, value in (("tokenizer_config.json", "eos_token", "."), ("config.json", "eos_token_id", dot),
                             ("generation_config.json", "eos_token_id", dot)):
        cfg = json.loads((model / name).read_text())
        cfg[key] = value
        (model / name).write_text(json.dumps(cfg))
    return model


@pytest.fixture(scope="module")
def short_questions(tmp_path_factory):
    """The shortest GSM8K test questions: their base prompts fit stories260K's 512-token context too."""
    rows = [json.loads(line) for line in (SHARED_DATA / "gsm8k" / "test.jsonl").read_text().splitlines()]
    path = tmp_path_factory.mktemp("data") / "short.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: len(r["question"]))[:20]))
    return path


def config(chat_model, tmp_path, *extra, source=None):
    source = source or SHARED_DATA / "gsm8k" / "test.jsonl"
    return compose_config([f"model.thinking.path={chat_model}", f"model.base.path={chat_model}", "model.n_layers=5",
                           "model.sae_layers=[1]", "model.steering_layer=2", "model.dtype=float32",
                           "model.device=cpu", "data=gsm8k", f"data.source={source}",
                           f"data.limit={N_QUESTIONS}", f"data.max_new_tokens={MAX_NEW}", f"data.batch_size={BATCH}",
                           "data.backend=vllm", "data.min_words=2", f"cache_dir={tmp_path / 'cache'}",
                           "progress=false", *extra])


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """vLLM's stand-in on the path of this process and of the spawned child; returns its log's reader."""
    log = tmp_path / "vllm_calls.jsonl"
    monkeypatch.syspath_prepend(str(STAND_INS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(STAND_INS), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("VLLM_STAND_IN_LOG", str(log))
    return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_vllm_traces_equal_the_hf_backend_and_run_before_the_hf_model_loads(chat_model, tmp_path, stand_in,
                                                                           monkeypatch):
    cfg = config(chat_model, tmp_path)
    validate(cfg)
    loads = []  # (pid, vLLM calls logged so far) at each HF model load in this process
    real_load_thinking = pipeline.load_thinking

    def logged_load_thinking(cfg, weights=True):
        if weights:
            loads.append((os.getpid(), len(stand_in())))
        return real_load_thinking(cfg, weights)

    monkeypatch.setattr(pipeline, "load_thinking", logged_load_thinking)
    store = pipeline.sentence_activations(cfg)
    calls = stand_in()

    # one LLM, in a child process, done before the one HF model load of this process
    inits = [c for c in calls if c["event"] == "init"]
    assert len(inits) == 1 and inits[0]["pid"] != os.getpid()
    assert loads == [(os.getpid(), len(calls))]

    # the traces equal the HF backend's (greedy, the same questions, prompts and batches)
    lm = load_model(str(chat_model), dtype="float32", device="cpu")
    questions = load_questions(cfg.data)
    hf = list(iter_traces(generate_traces(lm, questions, tmp_path / "hf", batch_size=BATCH, max_new_tokens=MAX_NEW,
                                          progress=False)))
    ours = list(iter_traces(store.traces_dir))
    assert len(ours) == N_QUESTIONS
    keys = ("id", "prompt", "completion", "completion_ids", "n_new_tokens", "truncated")
    assert [{k: t[k] for k in keys} for t in ours] == [{k: t[k] for k in keys} for t in hf]
    assert any(t["truncated"] for t in ours) and any(not t["truncated"] for t in ours)  # both kinds of end

    # what vLLM was told: the model, its dtype, no second BOS, a KV cache planned for these prompts only
    prompts = [thinking_prompt(lm.tokenizer, q.question) for q in questions]
    ids = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert ids[0][0] == lm.tokenizer.bos_token_id and ids[0][1] != lm.tokenizer.bos_token_id
    init = inits[0]
    assert (init["model"], init["dtype"], init["revision"]) == (str(chat_model), "float32", None)
    assert init["gpu_memory_utilization"] == 0.9 and init["other"] == []
    assert init["max_model_len"] == max(map(len, ids)) + MAX_NEW
    gens = [c for c in calls if c["event"] == "generate"]
    assert [p for g in gens for p in g["prompt_token_ids"]] == ids
    assert [len(g["prompt_token_ids"]) for g in gens] == [BATCH, N_QUESTIONS - BATCH]  # one call per shard
    assert {(g["temperature"], g["max_tokens"]) for g in gens} == {(0.0, MAX_NEW)}
    assert len({g["seed"] for g in gens}) == 2  # a seed per shard, as the HF backend

    # a rerun finds the traces and the activations: nothing is generated again
    pipeline.sentence_activations(cfg)
    assert stand_in() == calls


def test_a_killed_vllm_process_resumes_to_the_same_traces(chat_model, tmp_path, stand_in, monkeypatch):
    cfg = config(chat_model, tmp_path)
    questions = load_questions(cfg.data)
    clean = list(iter_traces(generate_traces_vllm(cfg, questions, tmp_path / "clean")))
    n_clean = len(stand_in())
    monkeypatch.setenv("VLLM_STAND_IN_KILL_AT", "2")  # dies before the second shard
    with pytest.raises(UserError, match=r"the vLLM process died .* rerun the same command to resume"):
        generate_traces_vllm(cfg, questions, tmp_path / "killed")
    assert [p.name for p in (tmp_path / "killed").glob("shard-*.jsonl")] == ["shard-00000.jsonl"]
    assert not (tmp_path / "killed" / "meta.json").exists()
    monkeypatch.delenv("VLLM_STAND_IN_KILL_AT")
    resumed = list(iter_traces(generate_traces_vllm(cfg, questions, tmp_path / "killed")))
    assert resumed == clean  # nothing lost, nothing repeated
    calls = stand_in()[n_clean:]
    last_init = max(i for i, c in enumerate(calls) if c["event"] == "init")
    resumed_calls = [len(c["prompt_token_ids"]) for c in calls[last_init:] if c["event"] == "generate"]
    assert resumed_calls == [N_QUESTIONS - BATCH]  # the resumed run made the missing shard only


def test_vllm_settings_reach_vllm(chat_model, tmp_path, stand_in):
    cfg = config(chat_model, tmp_path, "data.vllm_gpu_memory_utilization=0.5", "data.vllm_max_model_len=200",
                 "data.limit=2", "data.temperature=0.7")
    validate(cfg)
    folder = generate_traces_vllm(cfg, load_questions(cfg.data), tmp_path / "traces")
    init = next(c for c in stand_in() if c["event"] == "init")
    assert (init["gpu_memory_utilization"], init["max_model_len"]) == (0.5, 200)
    assert [t["n_new_tokens"] <= MAX_NEW for t in iter_traces(folder)] == [True, True]


def test_vllm_missing_is_one_clear_line(chat_model, tmp_path):
    # (bad values of the vllm settings: tests/test_reliability.py's CONFIG_CASES)
    cfg = config(chat_model, tmp_path)
    with pytest.raises(UserError, match=r"^the vllm backend \(data.backend=vllm, eval.backend=vllm\) needs vLLM: "
                                        r"pip install vllm"):
        generate_traces_vllm(cfg, load_questions(cfg.data), tmp_path / "traces")
    assert not (tmp_path / "traces" / "meta.json").exists()


def test_a_prompt_longer_than_the_context_is_refused_in_the_child(chat_model, tmp_path, stand_in):
    cfg = config(chat_model, tmp_path)
    questions = load_questions(cfg.data)[:1]
    questions[0].question = "word " * 600  # stories260K's context is 512 tokens
    with pytest.raises(UserError, match=r"a prompt has \d+ tokens but .* has a context of 512"):
        generate_traces_vllm(cfg, questions, tmp_path / "traces")
    assert stand_in() == []  # refused before vLLM started


def shards(folder):
    return [r for path in sorted(folder.glob("shard-*.jsonl")) for r in read_jsonl(path)]


def test_eval_backend_vllm_writes_the_plain_methods_answers_without_loading_the_pair(chat_model, tmp_path, stand_in,
                                                                                    monkeypatch, short_questions):
    from sae_reasoning import models

    common = ["eval.methods=[base,thinking]", f"eval.batch_size={BATCH}", f"eval.max_new_tokens={MAX_NEW}",
              f"eval.limit={N_QUESTIONS}", "wandb=disabled"]
    hf_dir, vllm_dir = tmp_path / "hf", tmp_path / "vllm"
    pipeline.evaluate(config(chat_model, tmp_path, *common, "eval.backend=hf", source=short_questions), hf_dir)
    assert stand_in() == []
    real_load_pair = models.load_pair
    pair_loads = []
    monkeypatch.setattr(models, "load_pair", lambda *a, **k: pair_loads.append(1) or real_load_pair(*a, **k))
    cfg = config(chat_model, tmp_path, *common, "eval.backend=vllm", source=short_questions)
    validate(cfg)
    pipeline.evaluate(cfg, vllm_dir)
    calls = stand_in()

    assert pair_loads == []  # vLLM wrote both methods: the HF pair was never loaded
    inits = [c for c in calls if c["event"] == "init"]
    assert len(inits) == 2 and len({c["pid"] for c in inits} | {os.getpid()}) == 3  # one child per model
    keys = ("id", "completion", "completion_ids", "n_new_tokens", "truncated")
    for method in ("base", "thinking"):
        ours, hf = shards(vllm_dir / "generations" / method), shards(hf_dir / "generations" / method)
        assert len(ours) == N_QUESTIONS and [{k: r[k] for k in keys} for r in ours] == [{k: r[k] for k in keys}
                                                                                          for r in hf]
    assert json.loads((vllm_dir / "summary.json").read_text()) == json.loads((hf_dir / "summary.json").read_text())
    # the base method's prompts are the base prompt (no chat template), the thinking method's the chat template
    lm = load_model(str(chat_model), dtype="float32", device="cpu")
    questions = load_questions(cfg.data)  # the data.limit of config(): eval.limit is the same
    firsts = [g["prompt_token_ids"][0] for g in calls if g["event"] == "generate"]
    from sae_reasoning.models import base_model_prompt

    assert firsts[0] == lm.tokenizer(base_model_prompt(lm.tokenizer, questions[0].question),
                                     add_special_tokens=False)["input_ids"]
    assert firsts[2] == lm.tokenizer(thinking_prompt(lm.tokenizer, questions[0].question),
                                     add_special_tokens=False)["input_ids"]

    # a rerun reuses every shard (no vLLM call); the other backend's shards are never taken for these (the keys
    # differ for the plain methods only)
    pipeline.evaluate(cfg, vllm_dir)
    assert stand_in() == calls
    hf_cfg, ids = config(chat_model, tmp_path, *common, "eval.backend=hf", source=short_questions), [q.id for q in
                                                                                                     questions]
    for method in ("base", "thinking"):
        assert pipeline.generations_key(cfg, method, MAX_NEW, ids) != pipeline.generations_key(hf_cfg, method,
                                                                                               MAX_NEW, ids)
