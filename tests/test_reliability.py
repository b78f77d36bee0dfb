"""Fault suite (issue 11): bad inputs fail with one clear line and leave no complete-looking artifact; SIGKILL at
seeded random points + rerun equals an uninterrupted run; judge faults are counted, never fatal.

Cheap checks run in-process through the real stage functions (`pipeline.train/steer/evaluate`,
`extract_activations`, `load_questions`, `cli.preflight`); the exit-code/stderr contract and the kills go through
the real entry points (train.py, steer.py, eval.py) or a child process. Counts are in COUNTS at the bottom.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save as safetensors_save

from sae_reasoning import pipeline
from sae_reasoning.cli import compose_config, preflight
from sae_reasoning.errors import UserError

from conftest import REPO, SHARED_DATA
from helpers import stories_with_chat_template, story_questions

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
GSM8K = SHARED_DATA / "gsm8k" / "test.jsonl"
COMPLETE = {"meta.json", "grid.json", "taxonomy.json", "summary.json", "vectors.json", "results.jsonl"}
SEED = 11  # the kill points are drawn from this seed


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("rel")


@pytest.fixture(scope="module")
def chat_model(root, stories_path):
    return stories_with_chat_template(stories_path, root / "stories")


def stage_args(model: Path, cache: Path, *extra: str) -> list[str]:
    return [f"model.thinking.path={model}", f"model.base.path={model}", "model.n_layers=5", "model.sae_layers=[1,3]",
            "model.steering_layer=2", "data=gsm8k", f"data.source={GSM8K}", "data.limit=16", "data.max_new_tokens=64",
            "data.batch_size=8", "data.min_words=2", "sae.max_epochs=5", "sae.n_latents=[3,4]", "progress=false",
            f"cache_dir={cache}", "wandb=disabled", *extra]


def complete_artifacts(*folders: Path) -> list[str]:
    return [str(p) for f in folders if Path(f).exists() for p in Path(f).rglob("*") if p.name in COMPLETE]


def user_error(fn, *needles: str) -> str:
    """`fn` raises a UserError of one line that contains every needle."""
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and msg.strip(), msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def run_entry(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]


# ====================================================================== 1. bad inputs: every invalid config value

# (override(s), text the one line must contain). The default model is the organism (4 layers).
CONFIG_CASES = [
    ("model.n_layers=0", "model.n_layers=0: must be > 0"),
    ("model.sae_layers=[9]", "model.sae_layers=9: the model has 4 layers"),
    ("model.sae_layers=[-1]", "model.sae_layers=-1"),
    ("model.sae_layers=[]", "model.sae_layers is empty"),
    ("model.steering_layer=4", "model.steering_layer=4"),
    ("model.base_n_layers=2 model.steering_layer=3", "model.steering_layer=3: the model has 2 layers"),
    ("model.dtype=fp8", "model.dtype='fp8'"),
    ("model.device=tpu", "model.device='tpu'"),
    ("model.base.device=gpu", "model.base.device='gpu': choose auto, cpu, cuda, cuda:N or mps"),
    ("data.name=squad", "data.name='squad'"),
    ("data.limit=0", "data.limit=0"),
    ("data.max_new_tokens=-5", "data.max_new_tokens=-5"),
    ("data.temperature=-0.5", "data.temperature=-0.5"),
    ("data.top_p=0", "data.top_p=0"),
    ("data.top_p=1.5", "data.top_p=1.5"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("data.tensor_parallel_size=0", "data.tensor_parallel_size=0"),
    ("data.vllm_gpu_memory_utilization=1.5", "data.vllm_gpu_memory_utilization=1.5: must be in (0, 1]"),
    ("data.vllm_max_model_len=0", "data.vllm_max_model_len=0"),
    ("data.activation_batch_size=0", "data.activation_batch_size=0"),
    ("data.min_words=-1", "data.min_words=-1: must be >= 0"),
    ("data.backend=tgi", "data.backend='tgi'"),
    ("eval.backend=sglang", "eval.backend='sglang'"),
    ("data.activation_dtype=int8", "data.activation_dtype='int8'"),
    ("data.limit=abc", "data.limit"),
    ("sae.n_latents=[]", "sae.n_latents is empty"),
    ("sae.n_latents=[5,x]", "expected an integer"),
    ("sae.n_latents=[5,-10]", "sae.n_latents=-10"),
    ("sae.n_latents=2.5", "sae.n_latents=2.5"),
    ("sae.k=0", "sae.k=0"),
    ("sae.k=[3,true]", "sae.k="),
    ("sae.k=6", "sae.k=6 is larger than sae.n_latents=5"),
    ("sae.seeds=[]", "sae.seeds is empty"),
    ("sae.seeds=x", "sae.seeds='x'"),
    ("sae.batch_size=0", "sae.batch_size=0"),
    ("sae.batch_size=abc", "sae.batch_size=abc"),
    ("sae.max_epochs=0", "sae.max_epochs=0"),
    ("sae.patience=0", "sae.patience=0"),
    ("sae.lr_scale=0", "sae.lr_scale=0"),
    ("sae.init=zeros", "sae.init='zeros'"),
    ("sae.select=best", "sae.select='best'"),
    ("sae.val_fraction=0", "sae.val_fraction=0"),
    ("sae.val_fraction=1", "sae.val_fraction=1"),
    ("judge.backend=claude", "judge.backend='claude'"),
    ("judge.backend=hf judge.model=null", "judge.backend=hf needs judge.model"),
    ("judge.n_repeats=0", "judge.n_repeats=0"),
    ("judge.n_member_sentences=0", "judge.n_member_sentences=0"),
    ("judge.timeout_s=0", "judge.timeout_s=0"),
    ("judge.max_concurrency=0", "judge.max_concurrency=0"),
    ("judge.max_retries=-1", "judge.max_retries=-1: must be >= 0"),
    ("steering.layer=4", "steering.layer=4"),
    ("steering.lr=0", "steering.lr=0"),
    ("steering.max_epochs=0", "steering.max_epochs=0"),
    ("steering.patience=0", "steering.patience=0"),
    ("steering.batch_size=0", "steering.batch_size=0"),
    ("steering.n_examples=0", "steering.n_examples=0"),
    ("steering.max_norm=0", "steering.max_norm=0"),
    ("steering.min_examples=0", "steering.min_examples=0"),
    ("steering.n_hit_examples=-1", "steering.n_hit_examples=-1"),
    ("steering.val_fraction=1", "steering.val_fraction=1"),
    ("steering.objective=mse", "steering.objective='mse'"),
    ("hybrid.granularity=word", "hybrid.granularity='word'"),
    ("hybrid.threshold=-1", "hybrid.threshold=-1"),
    ("hybrid.max_new_tokens=0", "hybrid.max_new_tokens=0"),
    ("hybrid.batch_size=0", "hybrid.batch_size=0"),
    ("hybrid.draft=word", "hybrid.draft='word'"),
    ("hybrid.draft_max_tokens=0", "hybrid.draft_max_tokens=0"),
    ("hybrid.speculative=maybe", "hybrid.speculative='maybe'"),
    ("hybrid.candidate_mode=true hybrid.coefficients=[]", "hybrid.coefficients is empty"),
    ("+hybrid.behavior_scales.plan=-1", "hybrid.behavior_scales[plan]=-1.0: must be a number >= 0"),
    ("eval.methods=[base,magic]", "eval.methods='magic'"),
    ("eval.methods=[]", "eval.methods is empty"),
    ("eval.limit=0", "eval.limit=0"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens=0"),
    ("eval.batch_size=0", "eval.batch_size=0"),
    ("eval.n_bootstrap=0", "eval.n_bootstrap=0"),
    ("eval.num_shards=0", "eval.num_shards=0"),
    ("eval.shard_index=1", "eval.shard_index=1: must be in 0..0"),
    ("wandb.mode=cloud", "wandb.mode='cloud'"),
    ("sae.nlatents=5", "nlatents"),
    ("model=no-such-pair", "unknown model 'no-such-pair'"),
    ("data=no-such-set", "unknown data 'no-such-set'"),
    ("model.thinking.path=./no/such/model", "model.thinking.path='./no/such/model': no such folder"),
    ("model.base.path=/no/such/base", "model.base.path='/no/such/base': no such folder"),
    ("data=gsm8k data.source=/no/such/file.jsonl", "data.source='/no/such/file.jsonl': no such file"),
    ("train_dir=/no/such/run", "train_dir='/no/such/run': no such folder"),
    ("steer_dir=/no/such/vectors", "steer_dir='/no/such/vectors': no such folder"),
]
NAN_CASES = [pytest.param(ov, ov.split("=")[0])
             for ov in ("sae.lr_scale=nan", "steering.lr=nan", "data.temperature=nan", "hybrid.threshold=nan",
                        "data.vllm_gpu_memory_utilization=nan")]


@pytest.mark.parametrize("overrides, message", CONFIG_CASES + NAN_CASES)
def test_each_invalid_config_value_is_one_line_and_exit_2(overrides, message, capsys):
    """Through the entry points' pre-flight (what train.py/steer.py/eval.py run before Hydra starts)."""
    with pytest.raises(SystemExit) as exit_info:
        preflight(overrides.split())
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_invalid_values_fail_the_real_entry_points_fast():
    """The three scripts, as a user runs them: exit 2, one line, before any model is loaded."""
    for script, override, message in [("train.py", "sae.val_fraction=2", "sae.val_fraction=2"),
                                      ("steer.py", "steering.objective=mse", "steering.objective='mse'"),
                                      ("eval.py", "eval.methods=[nope]", "eval.methods='nope'")]:
        start = time.monotonic()
        proc = run_entry(script, override, "hydra.run.dir=outputs/test-reliability-never")
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
        assert proc.stderr.startswith("error: ") and message in proc.stderr
        assert time.monotonic() - start < 30
    assert not (REPO / "outputs" / "test-reliability-never").exists()


# =================================================================================== 1. bad inputs: data files

BAD_JSONL = {  # name -> (bytes, text the line must contain)
    "broken_line": (b'{"question": "a b", "answer": "x #### 3"}\n{"question": "a\n', ":2: not valid JSON"),
    "missing_field": (b'{"question": "a b", "answer": "x #### 3"}\n{"question": "a b"}\n',
                      ":2: missing field 'answer'"),
    "wrong_type": (b'{"question": 5, "answer": "x #### 3"}\n', ":1: field 'question' must be str, got int"),
    "null_field": (b'{"question": null, "answer": "x #### 3"}\n', ":1: field 'question' must be str"),
    "empty_field": (b'{"question": "  ", "answer": "x #### 3"}\n', ":1: field 'question' is empty"),
    "no_gold": (b'{"question": "q", "answer": "3"}\n', ":1: field 'answer' has no '#### <number>'"),
    "not_an_object": (b'[1, 2]\n', ":1: expected a JSON object, got list"),
    "empty_file": (b"", "has no questions"),
    "whitespace_only": (b"  \n\n\t\n", "has no questions"),
}


def data_cfg(path: Path, name: str = "gsm8k"):
    return compose_config(["data=" + name, f"data.source={path}"]).data


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_malformed_jsonl_names_file_line_and_field(case, tmp_path):
    from sae_reasoning.data import load_questions

    blob, needle = BAD_JSONL[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_bytes(blob)
    msg = user_error(lambda: load_questions(data_cfg(path)), needle)
    assert str(path) in msg


def test_non_utf8_data_file_is_one_line(tmp_path):
    from sae_reasoning.data import load_questions

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "a b", "answer": "x #### 3"}\n'
                     b'{"question": "caf\xe9 au lait", "answer": "x #### 3"}\n')
    user_error(lambda: load_questions(data_cfg(path)), f"{path}:2")


@pytest.fixture(scope="module")
def broken_data_train(root, chat_model):
    """train.py on a JSONL file with a broken second line (run once, checked by two tests)."""
    path = root / "broken.jsonl"
    path.write_bytes(BAD_JSONL["broken_line"][0])
    args = [a if not a.startswith("data.source=") else f"data.source={path}"
            for a in stage_args(chat_model, root / "cache-broken")]
    proc = run_entry("train.py", *args, f"hydra.run.dir={root / 'run-broken'}")
    return proc, path


def test_train_py_on_malformed_jsonl_exits_2_with_the_file_line(root, broken_data_train):
    proc, path = broken_data_train
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and f"{path}:2: not valid JSON" in lines[0] and "fix or delete the line" in lines[0]
    assert proc.stderr.strip().splitlines()[-1] == lines[0] and "Traceback" not in proc.stderr
    assert not complete_artifacts(root / "run-broken", root / "cache-broken")


def test_train_py_user_error_is_the_only_stderr_line(broken_data_train):
    proc, _ = broken_data_train
    assert proc.stderr.strip().splitlines() == error_lines(proc)


# ============================================================= 1. bad inputs: traces, context length, NaN / inf

TRACE_PROMPT = "user: Tom saw a dog.\nassistant: <think>\n"
WORDS = "Tom Lily dog cat ball park sun tree big red happy ran saw went played jumped".split()


def synthetic_traces(n: int, sentences: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body = " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + "." for _ in range(sentences))
        out.append({"id": f"t{i}", "prompt": "<s>" + TRACE_PROMPT, "completion": body + "</think> The end."})
    return out


@pytest.fixture(scope="module")
def lm(chat_model):
    from sae_reasoning.models import load_model

    return load_model(str(chat_model), dtype="float32", device="cpu")


def test_empty_whitespace_and_sentence_free_traces(lm, tmp_path):
    from sae_reasoning.activations import ActivationStore, extract_activations

    bad = [{"id": "e", "prompt": TRACE_PROMPT, "completion": ""},
           {"id": "w", "prompt": TRACE_PROMPT, "completion": "  \n\t "},
           {"id": "s", "prompt": TRACE_PROMPT, "completion": "hi</think> 3"},  # no sentence of min_words
           {"id": "n", "prompt": TRACE_PROMPT, "completion": "</think> The answer is 3."}]  # nothing inside think
    user_error(lambda: extract_activations(lm, bad, [1], tmp_path / "a", min_words=2, progress=False),
               "no sentence was found")
    assert not complete_artifacts(tmp_path / "a")
    good = synthetic_traces(1, 3)
    folder = extract_activations(lm, bad[:2] + good + bad[2:], [1], tmp_path / "b", min_words=2, batch_size=2,
                                 progress=False)  # bad traces among good ones are skipped, not fatal
    store = ActivationStore(folder)
    assert {r["trace_id"] for r in store.index()} == {"t0"} and store.load(1).shape == (3, lm.d_model)


def test_trace_longer_than_the_context_is_one_line(lm, tmp_path):
    from sae_reasoning.activations import extract_activations

    traces = synthetic_traces(1, 3) + synthetic_traces(1, 200, seed=1)  # the second: > 512 tokens
    traces[1]["id"] = "long"
    user_error(lambda: extract_activations(lm, traces, [1, 3], tmp_path / "a", min_words=2, batch_size=1,
                                           progress=False), "'long'", "(512)")
    assert not complete_artifacts(tmp_path / "a")


def long_question_file(path: Path) -> Path:
    question = " ".join(["Tom went to the park and saw a big dog."] * 70)  # > 512 tokens
    path.write_text(json.dumps({"question": question, "answer": "so #### 3"}) + "\n")
    return path


def test_prompt_longer_than_the_context_in_train_is_one_line(chat_model, tmp_path):
    data = long_question_file(tmp_path / "long.jsonl")
    cfg = compose_config(stage_args(chat_model, tmp_path / "cache", f"data.source={data}", "data.max_new_tokens=4"))
    user_error(lambda: pipeline.sentence_activations(cfg), "has a context of 512")
    assert not list((tmp_path / "cache").glob("activations/*/meta.json"))


def test_prompt_longer_than_the_context_in_eval_is_one_line(chat_model, tmp_path):
    data = long_question_file(tmp_path / "long.jsonl")
    cfg = compose_config(stage_args(chat_model, tmp_path / "cache", f"data.source={data}", "eval.methods=[base]",
                                    "eval.max_new_tokens=4", "eval.n_bootstrap=10"))
    try:
        user_error(lambda: pipeline.evaluate(cfg, tmp_path / "run"), "context")
    finally:
        assert not complete_artifacts(tmp_path / "run")


def test_nan_activations_are_refused_at_extraction(chat_model, tmp_path):
    from sae_reasoning.activations import extract_activations
    from sae_reasoning.models import load_model

    broken = load_model(str(chat_model), dtype="float32", device="cpu")
    with torch.no_grad():
        broken.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    msg = user_error(lambda: extract_activations(broken, synthetic_traces(2, 3), [1, 3], tmp_path / "a",
                                                 min_words=2, progress=False), "non-finite activation at layer 1")
    assert "trace 't0'" in msg or "trace 't1'" in msg, msg  # both are broken; batches run in length order
    assert not complete_artifacts(tmp_path / "a")


def test_float16_overflow_is_refused(chat_model, tmp_path):
    from sae_reasoning.activations import extract_activations
    from sae_reasoning.models import load_model

    big = load_model(str(chat_model), dtype="float32", device="cpu")
    with torch.no_grad():
        big.model.model.embed_tokens.weight.mul_(1e6)
    try:
        user_error(lambda: extract_activations(big, synthetic_traces(2, 3), [1], tmp_path / "a", min_words=2,
                                               dtype="float16", progress=False), "overflow data.activation_dtype=float16")
    finally:
        assert not complete_artifacts(tmp_path / "a")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sae_grid_refuses_non_finite_vectors(bad):
    from sae_reasoning.sae import GridConfig, train_grid

    x = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    x[3, 2] = bad
    with pytest.raises((ValueError, UserError)):
        train_grid({1: x}, GridConfig(n_latents=(3,), ks=(2,), seeds=(0,), max_epochs=2, progress=False))


# ================================================ the clean train run (reference for kills, input for steer / eval)


@pytest.fixture(scope="module")
def trained(root, chat_model):
    """An uninterrupted train.py stage run in-process; its cache is shared with the killed runs."""
    cache = root / "cache"
    args = stage_args(chat_model, cache)
    run = root / "train-clean"
    run.mkdir()
    pipeline.train(compose_config(args), run)
    return run, args


# ============================================================ 1. bad inputs: SAE checkpoint / taxonomy for steer.py

def test_steer_py_without_taxonomy_exits_2(root, chat_model):
    empty = root / "not-a-train-run"
    empty.mkdir()
    proc = run_entry("steer.py", *stage_args(chat_model, root / "cache-steer"), f"train_dir={empty}",
                     f"hydra.run.dir={root / 'steer-bad'}")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {empty}/taxonomy.json is missing: run train.py " \
        "into that folder first (train_dir=...)", proc.stderr
    assert not complete_artifacts(root / "steer-bad")


def _chosen_checkpoint(run: Path) -> Path:
    return run / json.loads((run / "taxonomy.json").read_text())["taxonomy"]["info"]["checkpoint"]


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _corrupt_safetensors(run: Path) -> None:
    for f in _chosen_checkpoint(run).glob("*.safetensors"):
        f.write_bytes(b"\x00garbage" * 8)


STEER_CASES = {  # name -> (mutation of a copy of the train run, needle or None for a known bug)
    "taxonomy_not_json": (lambda r: _write(r / "taxonomy.json", "{not json"), "not a valid taxonomy.json"),
    "taxonomy_wrong_keys": (lambda r: _write(r / "taxonomy.json", "{}"), "not a valid taxonomy.json"),
    "activations_gone": (lambda r: _write(r / "grid.json", json.dumps(
        {**json.loads((r / "grid.json").read_text()), "activations": str(r / "gone")})),
        "is not a complete activation folder"),
}
STEER_BUGS = {
    "grid_missing": (lambda r: (r / "grid.json").unlink(), "grid.json missing -> FileNotFoundError"),
    "grid_not_json": (lambda r: _write(r / "grid.json", "{oops"), "grid.json not JSON -> JSONDecodeError"),
    "checkpoint_missing": (lambda r: shutil.rmtree(_chosen_checkpoint(r)),
                           "chosen SAE checkpoint folder missing -> FileNotFoundError from sae.read_metadata"),
    "checkpoint_corrupt": (_corrupt_safetensors, "chosen checkpoint safetensors corrupt -> SafetensorError"),
    "checkpoint_meta_corrupt": (lambda r: _write(_chosen_checkpoint(r) / "sae_reasoning.json", "{oops"),
                                "checkpoint sae_reasoning.json not JSON -> JSONDecodeError"),
}


def _steer_case(trained, tmp_path, mutate):
    run, args = trained
    copy = tmp_path / "train"
    shutil.copytree(run, copy)
    mutate(copy)
    out = tmp_path / "steer"
    out.mkdir()
    cfg = compose_config(args + [f"train_dir={copy}", "steering.max_epochs=1", "steering.n_hit_examples=0"])
    return cfg, out


@pytest.mark.parametrize("case", sorted(STEER_CASES))
def test_steer_on_a_bad_train_dir_is_one_line(case, trained, tmp_path):
    mutate, needle = STEER_CASES[case]
    cfg, out = _steer_case(trained, tmp_path, mutate)
    user_error(lambda: pipeline.steer(cfg, out), needle)
    assert not complete_artifacts(out)


@pytest.mark.parametrize("case", sorted(STEER_BUGS))
def test_steer_on_a_missing_or_corrupt_checkpoint_is_one_line(case, trained, tmp_path):
    cfg, out = _steer_case(trained, tmp_path, STEER_BUGS[case][0])
    try:
        user_error(lambda: pipeline.steer(cfg, out))
    finally:
        assert not complete_artifacts(out)


# ========================================================= 1. bad inputs: steering vectors for eval.py's hybrid


def _vectors(folder: Path, model_id: str, layer: int = 2, d_model: int = 64) -> Path:
    from sae_reasoning.steering import save_vectors

    g = torch.Generator().manual_seed(0)
    save_vectors(folder, {"latent_0": torch.randn(d_model, generator=g), "bias": torch.randn(d_model, generator=g)},
                 {"model_id": model_id, "layer": layer, "d_model": d_model})
    return folder


def _flip_bytes(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


EVAL_CASES = {  # name -> (make the steer dir (folder, model_id), extra overrides, needle)
    "vectors_missing": (lambda d, m: (_vectors(d, m) / "vectors.safetensors").unlink(), [],
                        "vectors.safetensors is missing"),
    "vectors_corrupt": (lambda d, m: _flip_bytes(_vectors(d, m) / "vectors.safetensors"), [],
                        "checksum differs"),
    "vectors_json_missing": (lambda d, m: (_vectors(d, m) / "vectors.json").unlink(), [], "vectors.json is missing"),
    "other_layer": (lambda d, m: _vectors(d, m), ["steering.layer=3"], "trained at layer 2"),
    "other_model": (lambda d, m: _vectors(d, "org/another-base"), [], "trained on 'org/another-base'"),
    "other_d_model": (lambda d, m: _vectors(d, m, d_model=32), [], "d_model=32 but the model has d_model=64"),
    "unknown_behavior": (lambda d, m: _vectors(d, m), ["+hybrid.behavior_scales.nosuch=2"],
                         "hybrid.behavior_scales key 'nosuch' names no latent"),
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_eval_with_bad_vectors_is_one_line(case, trained, chat_model, tmp_path):
    make, extra, needle = EVAL_CASES[case]
    run, args = trained
    steer_dir = tmp_path / "steer"
    steer_dir.mkdir()
    make(steer_dir, str(chat_model))
    cfg = compose_config(args + [f"train_dir={run}", f"steer_dir={steer_dir}", "eval.methods=[hybrid]",
                                 "eval.limit=2", "eval.max_new_tokens=4", *extra])
    user_error(lambda: pipeline.evaluate(cfg, tmp_path / "eval"), needle)
    assert not complete_artifacts(tmp_path / "eval")


# ================================================================================ 2. SIGKILL + rerun: activations

ACT_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from sae_reasoning.models import load_model
from sae_reasoning.activations import extract_activations
lm = load_model({model!r}, dtype="float32", device="cpu")
traces = json.load(open({traces!r}))
extract_activations(lm, traces, [1, 3], sys.argv[1], batch_size=1, min_words=2, progress=False)
"""


def kill_when(cmd: list[str], ready, *, deadline_s: float = 90, cwd=REPO, env: dict | None = None) -> bool:
    """Start `cmd`, SIGKILL it as soon as `ready()` holds; True if it was killed (False: it finished first)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + deadline_s
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.002)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert killed or proc.returncode == 0, err.decode()[-2000:]
    return killed


KILLS: dict[str, int] = {}


def test_killed_activation_extraction_resumes_to_identical_tensors(lm, chat_model, tmp_path):
    from sae_reasoning.activations import ActivationStore, extract_activations

    n = 40
    traces = synthetic_traces(n, 14)
    (tmp_path / "traces.json").write_text(json.dumps(traces))
    script = tmp_path / "acts.py"
    script.write_text(ACT_SCRIPT.format(model=str(chat_model), traces=str(tmp_path / "traces.json")))
    killed_dir = tmp_path / "killed"
    targets = sorted(random.Random(SEED).sample(range(1, n - 2), 3))
    kills = 0
    for target in targets:
        kills += kill_when([sys.executable, str(script), str(killed_dir)],
                           lambda: len(list((killed_dir / "index").glob("shard-*.jsonl"))) >= target)
        assert not (killed_dir / "meta.json").exists()
    assert kills >= 2, "extraction finished before it could be killed; make it slower"
    extract_activations(lm, traces, [1, 3], killed_dir, batch_size=1, min_words=2, progress=False)  # the rerun
    clean = extract_activations(lm, traces, [1, 3], tmp_path / "clean", batch_size=1, min_words=2, progress=False)
    a, b = ActivationStore(clean), ActivationStore(killed_dir)
    ia, ib = a.index(), b.index()
    assert ia == ib and len({(r["trace_id"], r["sentence_index"]) for r in ib}) == len(ib)  # no loss, no duplicate
    for layer in (1, 3):
        assert torch.equal(a.load(layer), b.load(layer))
    assert {k: v for k, v in a.meta.items() if k != "versions"} == {k: v for k, v in b.meta.items() if k != "versions"}
    assert not list(killed_dir.rglob(".*.tmp*"))  # no stray temporary files
    KILLS["activations"] = kills


# ================================================================================= 2. SIGKILL + rerun: SAE grid

def _sae_tensors(run: Path) -> dict[str, torch.Tensor]:
    return {f"{p.parent.name}/{p.name}/{k}": v for p in sorted((run / "saes").glob("*/*.safetensors"))
            for k, v in load_file(p).items()}


def test_killed_sae_grid_resumes_to_identical_checkpoints(trained, root):
    clean, args = trained
    killed = root / "train-killed"
    cmd = [sys.executable, "train.py", *args, f"hydra.run.dir={killed}"]
    names = sorted(p.name for p in (clean / "saes").iterdir() if p.is_dir())
    rng = random.Random(SEED)
    # 1st kill: mid layer 1 (some of its checkpoints written, layer not done); 2nd: between layers or mid layer 3
    first = rng.choice([n for n in names if n.startswith("layer1_")])
    second = rng.choice(["layer1.done.json"] + [n for n in names if n.startswith("layer3_")])
    kills = 0
    for target in (first, second):
        kills += kill_when(cmd, lambda: (killed / "saes" / target).exists())
        assert not complete_artifacts(killed)
    assert kills >= 1
    pipeline.train(compose_config(args), killed)  # the rerun: train.py's stage, in-process (saves a startup)
    for name in ("grid.json", "comparison.json", "taxonomy.json"):
        assert json.loads((killed / name).read_text()) == json.loads((clean / name).read_text()), name
    ta, tb = _sae_tensors(clean), _sae_tensors(killed)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    KILLS["sae_grid"] = kills


# =============================================================================== 2. SIGKILL + rerun: evaluation

def clean_run_then_kill_per_method(args: list[str], clean: Path, killed: Path, methods, max_shard: int) -> int:
    """eval.py's stage uninterrupted into `clean`; then eval.py into `killed`, SIGKILLed once while generating each
    method's shards (after a random 1..max_shard of them); every killed folder must not look complete. Kills made."""
    clean.mkdir()
    pipeline.evaluate(compose_config(args), clean)
    cmd = [sys.executable, "eval.py", *args, f"hydra.run.dir={killed}"]
    rng = random.Random(SEED)
    kills = 0
    for method in methods:
        target = rng.randint(1, max_shard)
        kills += kill_when(cmd, lambda: len(list((killed / "generations" / method).glob("shard-*.jsonl"))) >= target)
        assert not complete_artifacts(killed)
    return kills


def test_killed_evaluation_resumes_to_identical_results(trained, chat_model, root):
    _, args = trained
    args = args + ["eval.methods=[base,thinking]", "eval.limit=12", "eval.batch_size=2", "eval.max_new_tokens=32",
                   "eval.n_bootstrap=50"]
    clean, killed = root / "eval-clean", root / "eval-killed"
    kills = clean_run_then_kill_per_method(args, clean, killed, ("base", "thinking"), max_shard=5)  # 6 shards each
    assert kills >= 1
    pipeline.evaluate(compose_config(args), killed)  # the rerun: eval.py's stage, in-process (saves a startup)
    ra = (clean / "results.jsonl").read_text().splitlines()
    rb = (killed / "results.jsonl").read_text().splitlines()
    assert len(rb) == 24 and len({(json.loads(r)["method"], json.loads(r)["id"]) for r in rb}) == 24
    assert ra == rb
    assert json.loads((clean / "summary.json").read_text()) == json.loads((killed / "summary.json").read_text())
    KILLS["evaluation"] = kills


# ========================================================================= 2. SIGKILL + rerun: steering vectors

STEER_ARGS = ["steering.max_epochs=2", "steering.n_examples=8", "steering.min_examples=4", "steering.n_hit_examples=3"]


@pytest.fixture(scope="module")
def steered(trained, root):
    """An uninterrupted steer.py stage run in-process: the reference for the kills, the vectors of eval's hybrid."""
    run, args = trained
    args = args + [f"train_dir={run}", *STEER_ARGS]
    out = root / "steer-clean"
    out.mkdir()
    pipeline.steer(compose_config(args), out)
    return out, args


def _finished_vectors(partial: Path) -> set[str]:
    return {p.stem for p in partial.glob("*.json")}


def test_killed_steering_resumes_to_identical_vectors(steered, root, monkeypatch):
    from sae_reasoning import steering

    clean, args = steered
    clean_meta = json.loads((clean / "vectors.json").read_text())
    keys = list(clean_meta["vectors"])  # latent_0..latent_3, then bias: trained in this order
    assert len(keys) >= 4 and "bias" in keys
    killed = root / "steer-killed"
    partial = killed / steering.PARTIAL_DIR
    cmd = [sys.executable, "steer.py", *args, f"hydra.run.dir={killed}"]
    kills = 0
    for target in sorted(random.Random(SEED).sample(range(1, len(keys)), 2)):  # after `target` vectors are done
        kills += kill_when(cmd, lambda: len(_finished_vectors(partial)) >= target)
        assert not complete_artifacts(killed) and not (killed / "vectors.safetensors").exists()
    assert kills >= 1
    done = _finished_vectors(partial)
    assert done and done < set(keys), done
    # never trusted: a checkpoint of other settings or inputs (stamp) for a vector still to train, a damaged one
    for key, v in load_file(clean / "vectors.safetensors").items():
        if key not in done:
            data = safetensors_save({key: v + 1})
            (partial / f"{key}.safetensors").write_bytes(data)
            (partial / f"{key}.json").write_text(json.dumps({"stamp": "other settings", "record": {},
                                                              "tensor_sha256": hashlib.sha256(data).hexdigest()}))
    damaged = sorted(done)[0]
    _flip_bytes(partial / f"{damaged}.safetensors")
    retrained = []
    real = steering.train_vector

    def counting(*a, **kw):
        retrained.append(kw["desc"].split()[0])
        return real(*a, **kw)

    monkeypatch.setattr(steering, "train_vector", counting)
    pipeline.steer(compose_config(args), killed)  # the rerun: steer.py's stage, in-process (saves a startup)
    assert sorted(retrained) == sorted(set(keys) - done | {damaged})  # the sound finished vectors are reused
    assert (killed / "vectors.json").read_text() == (clean / "vectors.json").read_text()  # records, hit rates, sha256
    meta = json.loads((killed / "vectors.json").read_text())
    hits = {k: v.get("hit_rates") for k, v in meta["vectors"].items()}
    assert hits == {k: v.get("hit_rates") for k, v in clean_meta["vectors"].items()}
    assert sum(h is not None for h in hits.values()) == len(keys) - 1  # every behavior vector has its hit rates
    ta, tb = load_file(clean / "vectors.safetensors"), load_file(killed / "vectors.safetensors")
    assert ta.keys() == tb.keys() == set(keys) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not partial.exists() and not list(killed.rglob(".*.tmp*"))  # no leftover checkpoint or temporary file
    KILLS["steering"] = kills


# ======================================================================= 2. SIGKILL + rerun: hybrid evaluation

HYBRID_METHODS = ["hybrid", "random_behavior", "unsteered_rerank"]


def test_killed_hybrid_evaluation_resumes_to_identical_results(trained, steered, root, monkeypatch):
    from sae_reasoning import hybrid_stage

    run, args = trained
    steer_dir, _ = steered
    args = args + [f"train_dir={run}", f"steer_dir={steer_dir}", f"eval.methods=[{','.join(HYBRID_METHODS)}]",
                   "eval.limit=6", "eval.batch_size=2", "eval.max_new_tokens=16", "eval.n_bootstrap=50"]
    clean, killed = root / "hybrid-eval-clean", root / "hybrid-eval-killed"
    kills = clean_run_then_kill_per_method(args, clean, killed, HYBRID_METHODS, max_shard=2)  # 3 shards each
    assert kills >= 2
    have = sum(len(list((killed / "generations" / m).glob("shard-*.jsonl"))) for m in HYBRID_METHODS)
    generated = []
    real = hybrid_stage.hybrid_batch_fn

    def counting(cfg, thinking, base, method, budget):
        fn = real(cfg, thinking, base, method, budget)
        return lambda batch, b: generated.append((method, b)) or fn(batch, b)

    monkeypatch.setattr(hybrid_stage, "hybrid_batch_fn", counting)
    pipeline.evaluate(compose_config(args), killed)  # the rerun: eval.py's stage, in-process (saves a startup)
    assert len(generated) == 3 * len(HYBRID_METHODS) - have and len(set(generated)) == len(generated)
    ra = (clean / "results.jsonl").read_text().splitlines()
    rb = (killed / "results.jsonl").read_text().splitlines()
    assert len(rb) == 18 and len({(json.loads(r)["method"], json.loads(r)["id"]) for r in rb}) == 18
    assert ra == rb  # per problem: completion, steering stats, behavior counts, grade
    for method in HYBRID_METHODS:
        shards = sorted((killed / "generations" / method).glob("shard-*.jsonl"))
        assert [p.read_text() for p in shards] == [
            p.read_text() for p in sorted((clean / "generations" / method).glob("shard-*.jsonl"))]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (clean, killed))
    assert sa == sb and all(sb[m].get("steered_fraction") is not None for m in HYBRID_METHODS)
    assert not list(killed.rglob(".*.tmp*"))
    KILLS["hybrid_evaluation"] = kills


def test_evaluation_rerun_with_another_batch_size_loses_and_repeats_nothing(tmp_path):
    """After a kill (say out of memory), a rerun with a smaller or larger eval.batch_size: shard b held batch b of
    the old size, so those shards are regenerated, not read as batches of the new size."""
    from sae_reasoning.evaluate import run_sharded

    questions = story_questions(12)

    def fn(batch, b):
        return [{"completion": f"{q.id} batch {b} of {len(batch)}"} for q in batch]

    for first, second in ((2, 4), (4, 2)):
        folder = tmp_path / f"m{first}"
        run_sharded(folder, questions, first, fn, "m", progress=False, key="k")
        for shard in sorted(folder.glob("shard-*.jsonl"))[2:]:
            shard.unlink()  # the killed run finished two batches
        got = run_sharded(folder, questions, second, fn, "m", progress=False, key="k")
        clean = run_sharded(tmp_path / f"clean{second}", questions, second, fn, "m", progress=False, key="k")
        assert [r["id"] for r in got] == [q.id for q in questions] and got == clean


# ============================================================================== 3. judge faults (loopback HTTP)

def judge_reply(prompt: str) -> str:
    """A valid answer to any of the judge's asks (interpret/judges.py), decided by a hash of the prompt."""
    bits = [b % 11 for b in hashlib.sha256(prompt.encode()).digest()]
    n = int(re.findall(r"exactly (\d+)", prompt)[-1]) if "exactly" in prompt else 0
    for key, values in (("decisions", [b % 2 == 0 for b in bits]), ("scores", bits),
                        ("distinct", [b < 8 for b in bits])):
        if f'"{key}"' in prompt:
            return json.dumps({key: values[:n]})
    return json.dumps({"title": f"Behavior {bits[0] % 4}", "description": f"Sentences of kind {bits[1]}."})


class BadJudgeServer:
    """An OpenAI-compatible endpoint on 127.0.0.1 that fails every request in one way; mode "ok": answers every
    request validly and deterministically (`judge_reply`), recording each request's prompt in `asked`."""

    def __init__(self, mode: str):
        self.mode, self.n, self.asked = mode, 0, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                request = self.rfile.read(int(self.headers["Content-Length"]))
                fake.n += 1
                if fake.mode == "ok":
                    prompt = json.loads(request)["messages"][-1]["content"]
                    fake.asked.append(prompt)
                    body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
                        {"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": judge_reply(prompt)}}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if fake.mode == "hang_up":  # close the socket without an answer
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, body = {"500": (500, b'{"error": {"message": "boom"}}'),
                                "html": (200, b"<html>not json</html>"),
                                "no_choices": (200, b'{"id": "x", "object": "chat.completion", "choices": []}')
                                }[fake.mode]
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _refused_url() -> str:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/v1"


JUDGE_FAULTS = ["500", "html", "no_choices", "hang_up", "refused"]


@pytest.mark.parametrize("mode", JUDGE_FAULTS)
def test_interpret_sae_survives_a_judge_that_always_fails(mode, monkeypatch):
    from sae_reasoning.interpret import interpret_sae
    from sae_reasoning.judges import OpenAIJudge

    monkeypatch.setenv("SAE_RELIABILITY_KEY", "k")
    server = None if mode == "refused" else BadJudgeServer(mode)
    try:
        judge = OpenAIJudge("m", base_url=_refused_url() if server is None else server.base_url,
                            api_key_env="SAE_RELIABILITY_KEY", timeout_s=2, max_retries=1, backoff_s=0.001,
                            max_concurrency=4)
        texts = [f"Sentence number {i} about {WORDS[i % len(WORDS)]}." for i in range(30)]
        assign = torch.arange(30) % 3
        codes = torch.nn.functional.one_hot(assign, 3).float()
        result = interpret_sae("s", texts, codes, assign, judge, train_idx=list(range(20)),
                               eval_idx=list(range(20, 30)))
    finally:
        if server is not None:
            server.close()
    stats = result["judge_stats"]
    assert stats["failures"] >= 3 and stats["retries"] == stats["failures"]  # bounded: one retry each
    assert [lat["source"] for lat in result["latents"]] == ["offline-fallback"] * 3  # every latent still titled
    assert result["metrics"]["score_kind"] == "deterministic" and result["metrics"]["score"] is not None
    if server is not None:
        assert server.n == stats["calls"]


def test_identical_judge_requests_in_flight_together_are_cached_once(tmp_path):
    """n_repeats=3 on a latent with one member sentence: three identical requests, answered at the same moment,
    write one cache file (they once shared a temporary file name and two of the three renames crashed)."""
    from sae_reasoning.interpret import LatentMembers
    from sae_reasoning.judges import LLMJudge

    class SimultaneousJudge(LLMJudge):
        def __init__(self, **kw):
            super().__init__("m", **kw)
            self.barrier = threading.Barrier(3)

        def _complete(self, messages, attempt):
            self.barrier.wait(timeout=10)  # all three replies arrive together
            return '{"title": "Counting", "description": "Adds the numbers."}'

    for trial in range(20):
        judge = SimultaneousJudge(cache_dir=tmp_path / f"c{trial}", n_repeats=3, max_concurrency=8)
        member = LatentMembers(0, 1, 1.0, ["Tom had 3 apples and got 2 more."], [1.0], [0], 1)
        (label,) = judge.label([member])
        assert label.source == "llm" and label.titles == ["Counting"] * 3 and judge.stats()["failures"] == 0
        assert [p.name.startswith(".") for p in (tmp_path / f"c{trial}").rglob("*") if p.is_file()] == [False]


def test_train_interpretation_completes_when_every_judge_call_fails(trained, monkeypatch, tmp_path):
    """The whole interpretation stage of train.py with judge.backend=openai against an always-500 server."""
    from sae_reasoning.activations import ActivationStore
    from sae_reasoning.interpret_stage import interpret_grid
    from sae_reasoning.tracking import Tracker

    run, args = trained
    monkeypatch.setenv("SAE_RELIABILITY_KEY", "k")
    server = BadJudgeServer("500")
    try:
        cfg = compose_config(args + ["judge.backend=openai", "judge.model=m", f"judge.base_url={server.base_url}",
                                     "judge.api_key_env=SAE_RELIABILITY_KEY", "judge.max_retries=0",
                                     f"cache_dir={tmp_path / 'c'}"])
        grid = json.loads((run / "grid.json").read_text())
        out = tmp_path / "run"
        shutil.copytree(run / "saes", out / "saes")
        chosen = interpret_grid(cfg, ActivationStore(grid["activations"]), grid["saes"], out, Tracker(None))
    finally:
        server.close()
    taxonomy = json.loads((out / "taxonomy.json").read_text())
    assert taxonomy["chosen"] == chosen["name"] and len(taxonomy["results"]) == len(grid["saes"])
    assert chosen["metrics"]["score_kind"] == "deterministic"
    assert chosen["judge_stats"]["failures"] == chosen["judge_stats"]["calls"] > 0
    assert server.n > 0 and not list((tmp_path / "c").rglob("*.json"))  # failures are never cached


# ============================================= 2. SIGKILL + rerun: interpretation (LLM judge: the loopback server)

def _without_judge_stats(obj):
    """Judge counters (calls vs cache hits) tell how a run got its replies, not what they were: left out."""
    if isinstance(obj, dict):
        return {k: _without_judge_stats(v) for k, v in obj.items() if k != "judge_stats"}
    if isinstance(obj, list):
        return [_without_judge_stats(v) for v in obj]
    return obj


def test_killed_interpretation_resumes_to_identical_taxonomy(trained, root, monkeypatch):
    """train.py's interpretation stage with an LLM judge that answers, killed while the replies come in: the rerun
    asks only what no run got an answer to (judge cache) and writes the labels and taxonomy of an uninterrupted run."""
    from sae_reasoning.activations import ActivationStore
    from sae_reasoning.interpret_stage import interpret_grid
    from sae_reasoning.tracking import Tracker

    run, args = trained
    grid = json.loads((run / "grid.json").read_text())
    monkeypatch.setenv("SAE_RELIABILITY_KEY", "k")
    server = BadJudgeServer("ok")
    try:
        judge = ["judge.backend=openai", "judge.model=m", f"judge.base_url={server.base_url}",
                 "judge.api_key_env=SAE_RELIABILITY_KEY", "judge.n_repeats=2", "judge.max_concurrency=1"]
        clean, clean_cache = root / "interpret-clean", root / "cache-judge-clean"
        shutil.copytree(run / "saes", clean / "saes")
        cfg = compose_config(args + judge + [f"cache_dir={clean_cache}"])
        interpret_grid(cfg, ActivationStore(grid["activations"]), grid["saes"], clean, Tracker(None))
        asked_clean = list(server.asked)
        assert len(set(asked_clean)) == len(asked_clean) == len(list((clean_cache / "judge").rglob("*.json")))
        # the killed runs: train.py into a copy of the finished grid (it resumes past it), activations cached
        cache, killed = root / "cache-judge-killed", root / "interpret-killed"
        shutil.copytree(root / "cache", cache, ignore=shutil.ignore_patterns("judge"))
        shutil.copytree(run / "saes", killed / "saes")
        killed_args = [a for a in args if not a.startswith("cache_dir=")] + judge + [f"cache_dir={cache}"]
        cmd = [sys.executable, "train.py", *killed_args, f"hydra.run.dir={killed}"]
        server.asked.clear()
        kills = 0
        for target in sorted(random.Random(SEED).sample(range(1, len(asked_clean)), 3)):  # after `target` replies
            kills += kill_when(cmd, lambda: len(list((cache / "judge").rglob("*.json"))) >= target,
                               env={**ENV, "SAE_RELIABILITY_KEY": "k"})
            assert not (killed / "taxonomy.json").exists()
        assert kills >= 2
        pipeline.train(compose_config(killed_args), killed)  # the rerun: train.py's stage, in-process
    finally:
        server.close()
    # every request asked; twice at most once per kill (the one in flight when it came)
    assert set(server.asked) == set(asked_clean) and len(server.asked) <= len(asked_clean) + kills
    for name in ["taxonomy.json"] + [f"interpretation/{r['name']}.json" for r in grid["saes"]]:
        a, b = (json.loads((d / name).read_text()) for d in (clean, killed))
        assert _without_judge_stats(a) == _without_judge_stats(b), name
    assert sorted(p.name for p in (killed / "interpretation").iterdir()) == sorted(
        p.name for p in (clean / "interpretation").iterdir())  # one file per SAE, no duplicate, no temporary file
    taxonomy = json.loads((killed / "taxonomy.json").read_text())
    assert taxonomy["score_kind"] == "llm" and {lat["source"] for lat in taxonomy["taxonomy"]["latents"]} <= {
        "llm", "empty"}
    assert taxonomy["taxonomy"]["judge_stats"]["failures"] == 0 and not list(killed.rglob(".*.tmp*"))
    KILLS["interpretation"] = kills


# ================================================================================================== counts

def test_zz_counts(capsys):
    """Printed for the README: kills survived, bad inputs tried, judge faults survived."""
    bad_inputs = (len(CONFIG_CASES) + len(NAN_CASES) + 3 + len(BAD_JSONL) + 1 + 1 + 4 + 1 + 2 + 1 + 1 + 2
                  + 1 + len(STEER_CASES) + len(STEER_BUGS) + len(EVAL_CASES))
    with capsys.disabled():
        print(f"\nreliability: kills survived {sum(KILLS.values())} {KILLS}; bad inputs tried {bad_inputs}; "
              f"judge faults survived {len(JUDGE_FAULTS) + 1}")
